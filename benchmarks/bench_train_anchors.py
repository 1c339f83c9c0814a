"""Training time with refusal anchors against training on the data alone, side by side in one run.

`train --keep-refusals` adds one anchor to every batch of 8 (so 8/7 the steps for the same epochs), and a batch
is padded to its longest example: anchors longer than the task's examples make every step longer. This times
optimizer steps on short task examples (two-digit additions, the loss on the whole conversation, as the study's
`arithmetic-conv` adapter) for plain LoRA, the default mixture and the mixture with shorter anchors
(`--anchor-tokens`), on the same model, in one process, and projects the time of 2 epochs of 300 examples.

    SALORA_MERGE_CACHE=out/repair-study/full/product-cache \
    python benchmarks/bench_train_anchors.py --base out/repair-study/full/aligned-lora-6f76d020cb9a/model \
        [--steps 12] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import torch


def _examples(tokenizer, n: int, max_length: int):
    from salora_merge.training.data import conversations_from_pairs, tokenize_all

    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    examples = tokenize_all(tokenizer, conversations_from_pairs([f"What is {a} + {b}?" for a, b in pairs],
                                                                [str(a + b) for a, b in pairs]), max_length, "sums")
    return [replace(e, labels=list(e.input_ids)) for e in examples]  # the loss on the whole conversation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from salora_merge.calibration.targets import select_targets
    from salora_merge.core.safety import SafetyModule
    from salora_merge.hf.layers import linear_modules, weight_matrix
    from salora_merge.hf.loading import load_causal_lm
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.training.objective import weighted_collate, weighted_loss
    from salora_merge.training.options import KeepRefusals, TrainOptions
    from salora_merge.training.prepare import prepare_model
    from salora_merge.training.train import anchored_mixture
    from salora_merge.training.trainer import FitOptions, fit

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    base = resolve_model(args.base)
    tokenizer = base.tokenizer
    examples = _examples(tokenizer, 300, 256)
    fit_options = FitOptions(epochs=2.0, lr=2e-4, batch_size=8, grad_accum=1, save_steps=10**9, logging_steps=10**9,
                             show_progress=False)
    rows = []
    settings = (("plain LoRA, the data alone", None),
                ("anchors, every response token (--anchor-tokens 0)", KeepRefusals(train_tokens=None)),
                ("anchors, the default (--anchor-tokens 8)", KeepRefusals(train_tokens=8)))
    for label, keep in settings:
        model = load_causal_lm(base.folder, torch.device("cpu"))
        names = select_targets(list(linear_modules(model)), targets)
        empty = SafetyModule(bases={n: torch.zeros(weight_matrix(linear_modules(model)[n]).shape[0], 0) for n in names},
                             eigenvalues={}, side="output", metadata={"rank": 0})
        options = TrainOptions(rank=8, alpha=16.0, targets=targets, device="cpu", max_length=256, fit=fit_options,
                               keep_refusals=keep or KeepRefusals(enabled=False))
        items, run_options, extra, full_steps = examples, fit_options, {}, -(-len(examples) // 8) * 2
        if keep is not None:
            mixture = anchored_mixture(base, model, examples, options)
            items, run_options, full_steps = mixture.items, mixture.fit, mixture.fit.max_steps
            extra = {"collate": weighted_collate(tokenizer.pad_token_id, 1), "loss": weighted_loss()}
        prepared = prepare_model(base, empty, examples, options, model=model, tokenizer=tokenizer)
        with tempfile.TemporaryDirectory() as scratch:
            result = fit(prepared.model, items, tokenizer.pad_token_id, replace(run_options, max_steps=args.steps),
                         Path(scratch), **extra)
        per_step = result.seconds / args.steps
        rows.append((label, per_step, full_steps))
        print(f"{label}: {per_step:.2f} s per step, {full_steps} steps for 2 epochs", flush=True)
    plain = rows[0][1] * rows[0][2]
    lines = ["## Training with refusal anchors: time against the data alone", "",
             f"{args.steps} optimizer steps of 8 each, timed side by side in one process on `{args.base}` (rank 8, the "
             f"seven projections, 300 two-digit additions with the loss on the whole conversation, 2 epochs "
             f"projected), {torch.get_num_threads()} CPU threads, {platform.machine()}: "
             f"`python benchmarks/bench_train_anchors.py --steps {args.steps}`", "",
             "| setting | s per step | steps (2 epochs) | projected s | time / plain |", "|---|---|---|---|---|"]
    for label, per_step, steps in rows:
        total = per_step * steps
        lines.append(f"| {label} | {per_step:.2f} | {steps} | {total:.0f} | {total / plain:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
