"""The training study (issue 29): does `train` keep the aligned model's refusals when the repair's anchored
objective is mixed into training?

On the repair study's testbed (its aligned models, eroding adapters' data, evaluation sets and cache), each
task kind is trained four ways with the same data, rank, targets, learning rate, epochs, batch and seed as its
eroding adapter:

- ``plain-lora``: the eroding adapter itself (plain LoRA; the repair study's ``none`` row);
- ``salora-c``: `train`'s setting before this study, SaLoRA's fixed ``C`` from the aligned model's safety module;
- ``anchored``: plain LoRA with the anchored mixture (``train --keep-refusals``: anchors and boundary prompts with
  the base model's own answers, one in every batch of 8, the first 5 response tokens weighted 4);
- ``anchored-c``: both;
- ``anchored-share25``: the anchored mixture with two anchors in every batch of 8;
- ``anchored-short``: the anchored mixture with the anchors' first 8 response tokens only (a batch of short
  examples is padded to its longest: a 64-token anchor makes every step of a short task longer);
- ``anchored-share25-short``: both.

    python examples/safety_study/train_study.py --only lora/arithmetic-conv           # the rows of one adapter
    python examples/safety_study/train_study.py --report-only --doc docs/train-study.md

Every stage is cached under ``--cache`` (the repair study's), so an interrupted run resumes; run rows alone
(a test suite beside them doubles the training times this study reports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repair_data  # noqa: E402
import repair_study as rs  # noqa: E402
from study import Cache, _hash, id_examples, load, log, save_adapter, train  # noqa: E402

from salora_merge.core.stats import wilson_interval  # noqa: E402
from salora_merge.hf.loading import load_tokenizer  # noqa: E402
from salora_merge.hf.resolve import resolve_model  # noqa: E402
from salora_merge.io.safety_file import load_safety_module  # noqa: E402
from salora_merge.training.options import KeepRefusals  # noqa: E402

KEEP = KeepRefusals(train_tokens=None)  # the first default: every anchor response token learned
# row -> (SaLoRA's fixed C, the anchored mixture or None); plain-lora is the eroding adapter itself
ROW_SETTINGS: dict[str, tuple[bool, KeepRefusals | None]] = {
    "plain-lora": (False, None),
    "salora-c": (True, None),
    "anchored": (False, KEEP),
    "anchored-c": (True, KEEP),
    "anchored-share25": (False, KeepRefusals(share=0.25, train_tokens=None)),  # two anchors in every batch of 8
    "anchored-short": (False, KeepRefusals(train_tokens=8)),  # the anchors' first 8 response tokens (the default)
    "anchored-share25-short": (False, KeepRefusals(share=0.25, train_tokens=8)),  # both
}
ROWS = tuple(ROW_SETTINGS)


def _keyed(keep: KeepRefusals | None) -> dict | None:
    """The mixture's options in a row's cache key (an option added later keeps the rows before it at its
    default)."""
    if keep is None:
        return None
    return {k: v for k, v in asdict(keep).items() if not (k == "train_tokens" and v is None)}


def trained_adapter(cache: Cache, cfg: rs.RepairConfig, data, aligned: Path, answers: dict, kind: str,
                    row: str) -> Path:
    tokenizer = load_tokenizer(aligned)
    constrained, keep = ROW_SETTINGS[row]
    depends = {"aligned": aligned.parent.name, "kind": kind, "sizes": asdict(cfg.sizes), "epochs": cfg.erode_epochs,
               "lr": cfg.erode_lr, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "seed": cfg.seed,
               "batch": cfg.batch_size, "row": row, "keep": _keyed(keep)}

    def build(tmp: Path):
        examples = (id_examples(tokenizer, data.erode_train, [answers[p] for p in data.erode_train], cfg.max_length)
                    if kind == "benign" else rs.task_examples(cfg, data, tokenizer, kind))
        safety = load_safety_module(rs.safety_module(cache, cfg, aligned)) if constrained else None
        log(f"training '{row}' on '{kind}' ({aligned.parent.name}): {len(examples)} examples")
        modules, config, stats = train(aligned, examples, cfg.study(), tmp, lr=cfg.erode_lr, epochs=cfg.erode_epochs,
                                       safety=safety, keep=keep)
        save_adapter(tmp, modules, config, stats)

    return cache.folder(f"trained-{kind}", depends, build)


def run(cfg: rs.RepairConfig, cache_root: Path, only: str | None, report_only: bool, doc: Path | None) -> dict:
    data = repair_data.build(cfg.sizes, cfg.seed)
    cache = (rs.ReadOnlyCache if report_only else Cache)(cache_root, cfg.study(), _hash(asdict(data)))
    # the anchors' responses: the product's cache the repair rows filled (same base, prompts and length)
    os.environ.setdefault("SALORA_MERGE_CACHE", str(cache.root / "product-cache"))
    base_folder = resolve_model(cfg.base).folder
    answers = rs.original_answers(cache, cfg, data, base_folder)
    aligned = rs.aligned_models(cache, cfg, data, base_folder, answers)
    tokenizer = load_tokenizer(base_folder)
    nll_examples = id_examples(tokenizer, data.task_heldout, [answers[p] for p in data.task_heldout], cfg.max_length)
    models: dict = {}
    results: dict[str, dict] = {}

    def evaluated(key: str, folder: Path, adapter: str | None, source: str) -> dict:
        def compute():
            if folder not in models:
                models.clear()
                models[folder] = load(folder)[0]
            log(f"evaluating {key}")
            return rs.evaluate(models[folder], tokenizer, cfg, data, adapter, nll_examples)
        return cache.json("eval", rs.eval_depends(cfg, key, folder, source), compute)

    for a_kind in cfg.aligned_kinds:
        for kind in cfg.kinds:
            wanted = [r for r in ROWS if not only or rs._selected(f"{a_kind}/{kind}/{r}", only)]
            if not wanted:
                continue
            try:
                folder = aligned[a_kind]()
                results[f"{a_kind}/aligned"] = evaluated("aligned", folder, None, folder.parent.name)
                eroding = rs.eroding_adapter(cache, cfg, data, folder, answers, kind)
            except rs.Missing:
                continue
            for row in wanted:
                name = f"{a_kind}/{kind}/{row}"
                try:
                    if row == "plain-lora":  # the repair study's `none` row: the same evaluation, cached
                        adapter = eroding
                        result = evaluated(f"{a_kind}/{kind}/none", folder, str(adapter),
                                           str(adapter.relative_to(cache.root)))
                    else:
                        started = time.perf_counter()
                        adapter = trained_adapter(cache, cfg, data, folder, answers, kind, row)
                        result = evaluated(name, folder, str(adapter), str(adapter.relative_to(cache.root)))
                        log(f"{name}: {time.perf_counter() - started:.0f} s this run")
                except rs.Missing:
                    continue
                stats = json.loads((adapter / "study_train.json").read_text())
                results[name] = {**result, "train": stats}
    if doc is not None:
        analysis = Path(__file__).with_name("train_analysis.md")
        doc.write_text(report(results, cfg) + ("\n" + analysis.read_text() if analysis.is_file() else ""))
        log(f"wrote {doc}")
    return results


def _rate(result: dict, key: str) -> str:
    n = result["n"][key]
    k = round(result[key] * n)
    lo, hi = wilson_interval(k, n)
    return f"{100 * result[key]:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _count(result: dict, key: str) -> str:
    n = result["n"][key]
    return f"{round(result[key] * n)}/{n}"


def report(results: dict[str, dict], cfg: rs.RepairConfig) -> str:
    lines = ["# Training that keeps refusals: the study (issue 29)", "",
             "Generated by `examples/safety_study/train_study.py` from its cache; the setting is the repair study's "
             "(`docs/repair-study.md`): SmolLM2-135M-Instruct aligned by a LoRA refusal fine-tune, each task's data "
             f"trained with rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, lr {cfg.erode_lr:g}, {cfg.erode_epochs:g} "
             f"epochs, batches of {cfg.batch_size}, seed {cfg.seed}, on 2 CPU cores. Refusal: the keyword judge on "
             f"greedy answers of {cfg.eval_tokens} tokens to held-out AdvBench ({'{'}n{'}'} below) and HarmBench "
             "prompts; rates with 95% Wilson intervals; benign and over-refusal as counts. Time: the training alone "
             "(anchors cached), each row run alone.", ""]
    lines[2] = lines[2].replace("({n} below) ", "")
    for a_kind in ("lora", "full"):
        base = results.get(f"{a_kind}/aligned")
        kinds = sorted({k.split("/")[1] for k in results if k.startswith(f"{a_kind}/") and k.count("/") == 2})
        if not base or not kinds:
            continue
        lines += [f"## `{a_kind}`-aligned model", "",
                  f"Aligned model: AdvBench {_rate(base, 'advbench')}, HarmBench {_rate(base, 'harmbench')}, benign "
                  f"{_count(base, 'benign')}, over-refusal {_count(base, 'overrefusal')}, arithmetic "
                  f"{100 * base['arithmetic']:.0f}%, JSON {100 * base['json']:.0f}%.", ""]
        for kind in kinds:
            task = "json" if kind.startswith("json") else "arithmetic" if kind.startswith("arithmetic") else None
            lines += [f"### `{kind}`", "", "| row | AdvBench refusal | HarmBench refusal | benign refused | "
                      "over-refused | task (exact) | steps | training s | time / plain |", "|---|---|---|---|---|---|---|---|---|"]
            plain = results.get(f"{a_kind}/{kind}/plain-lora", {}).get("train", {}).get("seconds")
            for row in ROWS:
                r = results.get(f"{a_kind}/{kind}/{row}")
                if not r:
                    continue
                t = r["train"]
                ratio = f"{t['seconds'] / plain:.2f}x" if plain else "-"
                score = f"{100 * r[task]:.0f}%" if task else f"NLL {r['task_nll']:.3f}"
                lines.append(f"| `{row}` | {_rate(r, 'advbench')} | {_rate(r, 'harmbench')} | {_count(r, 'benign')} | "
                             f"{_count(r, 'overrefusal')} | {score} | {t['steps']} | {t['seconds']:.0f} | {ratio} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(rs.CONFIGS), default="full")
    parser.add_argument("--base", help="the original model (default: the embedded SmolLM2)")
    parser.add_argument("--cache", type=Path, default=root / "out" / "repair-study")
    parser.add_argument("--doc", type=Path, default=None, help="write the report here (docs/train-study.md)")
    parser.add_argument("--only", help="rows whose 'aligned/kind/row' name contains one of these comma-separated "
                        "entries (=NAME: exactly)")
    parser.add_argument("--report-only", action="store_true", help="compute nothing: report what is cached")
    args = parser.parse_args(argv)
    cfg = rs.CONFIGS[args.config]
    if args.base:
        from dataclasses import replace
        cfg = replace(cfg, base=args.base)
    run(cfg, args.cache / cfg.name, args.only, args.report_only, args.doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
