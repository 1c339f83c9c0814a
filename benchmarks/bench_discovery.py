"""Discovery's ranking step, the plain path against the product's, side by side in one run (docs/benchmarks.md).

For each candidate prompt the ranking needs the base model's greedy answer (judged for a refusal) and the KL
between the adapter's and the base's next-token distributions along its first tokens. The plain path generates
the answer, then runs two teacher-forced forwards (base, adapted) with the output layer over every position.
The product's path (``training/discovery.judge_and_score``) takes the base's side from the generation's own step
logits and runs the adapted forward with the output layer on the response positions alone. Both paths score the
same prompts; the script reports their times, the largest score difference and whether the top of the ranking
is the same.

    .venv/bin/python benchmarks/bench_discovery.py [--base smollm2-135m-aligned] \
        [--adapter examples/adapters/smollm2-aligned-arithmetic-lora] [--prompts 128] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def plain_scores(model, tok, factors, ids, options):
    """The path before this benchmark's change: generate, then base and adapted forwards over every position."""
    from salora_merge.auditing.judges import refused
    from salora_merge.core.salience import response_kl
    from salora_merge.hf.generation import response_logits
    from salora_merge.hf.generation import generate_greedy
    from salora_merge.hf.lora_hooks import lora_applied

    pad, size = tok.pad_token_id, options.batch_size
    refusals, scores = [], []
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        answers = generate_greedy(model, tok, chunk, options.refusal_tokens, size)
        refusals += [refused(tok.decode(a, skip_special_tokens=True)) for a in answers]
        heads = [a[: options.salience_tokens] or [tok.eos_token_id] for a in answers]
        base, mask = response_logits(model, chunk, heads, pad)
        with lora_applied(model, factors):
            adapted, _ = response_logits(model, chunk, heads, pad)
        scores += [float(v) for v in response_kl(adapted, base, mask)]
    return refusals, scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m-aligned")
    parser.add_argument("--adapter", type=Path, default=ROOT / "examples/adapters/smollm2-aligned-arithmetic-lora")
    parser.add_argument("--prompts", type=int, default=128, help="candidates from the built-in generic-tasks pool")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.io.adapter import read_adapter
    from salora_merge.io.prompts import load_prompt_set
    from salora_merge.training.discovery import DiscoveryOptions, judge_and_score

    base = resolve_model(args.base)
    tok, model = base.tokenizer, base.load_model(torch.device("cpu"))
    factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in read_adapter(args.adapter).modules.items()}
    prompts = list(load_prompt_set("generic-tasks").prompts[: args.prompts])
    options = DiscoveryOptions()
    ids = [chat_prompt_ids(tok, p) for p in prompts]
    started = time.perf_counter()
    plain_refusals, plain = plain_scores(model, tok, factors, ids, options)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    refusals, fast = judge_and_score(model, tok, factors, prompts, options)
    fast_s = time.perf_counter() - started
    diff = max(abs(a - b) for a, b in zip(plain, fast))
    order = lambda s: sorted(range(len(s)), key=lambda i: -s[i])  # noqa: E731
    top = max(1, len(prompts) // 4)
    overlap = len(set(order(plain)[:top]) & set(order(fast)[:top]))
    lines = [
        "## Discovery ranking",
        "",
        f"{len(prompts)} candidates (generic-tasks), batch {options.batch_size}, answers of {options.refusal_tokens} "
        f"tokens, salience over the first {options.salience_tokens}; `{args.base}` with "
        f"`{args.adapter.relative_to(ROOT) if args.adapter.is_relative_to(ROOT) else args.adapter}`; "
        f"{torch.get_num_threads()} CPU threads, {platform.machine()}, one run: "
        f"`python benchmarks/bench_discovery.py --prompts {args.prompts}`",
        "",
        "| path | seconds | per candidate (s) |",
        "|---|---|---|",
        f"| plain: generate, then base and adapted forwards (output layer everywhere) | {plain_s:.1f} | "
        f"{plain_s / len(prompts):.2f} |",
        f"| product: base side from the generation's step logits, adapted forward on response positions | "
        f"{fast_s:.1f} | {fast_s / len(prompts):.2f} |",
        "",
        f"Time ratio product / plain: {fast_s / plain_s:.2f}x. Same refusal verdicts: "
        f"{plain_refusals == refusals}. Largest salience difference: {diff:.2e} nats (scores up to "
        f"{max(plain):.3f}). Top quarter of the ranking ({top}): {overlap} in common.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
