"""The repair study: do the repair methods bring an eroded adapter's refusals back above the shrink curve?

    python examples/safety_study/repair_study.py                  # the full study on SmolLM2 (make repair-study)
    python examples/safety_study/repair_study.py --config smoke --base TINY_MODEL_DIR --cache DIR --doc OUT.md

Stages, each cached under ``--cache`` in a folder or file named by a hash of what it depends on (a re-run
recomputes only what changed; an interrupted run resumes at the stage it was in):

1. the original model's greedy answers to the benign prompts (alignment's benign half, the benign adapter's
   training set, the held-out task set);
2. two aligned models made from the original: ``lora`` (a plain LoRA refusal fine-tune, merged) and ``full``
   (a full fine-tune on the same data), so that no method is favoured by the alignment being low-rank;
3. per aligned model: a safety module (the product's ``calibrate``, moments kept for Safe Delta) and three
   eroding adapters trained on it (benign instructions; two-digit addition; JSON-list formatting);
4. every repair row run through the product's own CLI (``salora-merge realign --method ...``) in a child
   process, its wall time and peak memory taken from the child's resource usage;
5. every row evaluated on held-out prompts (the audit's keyword judge, greedy) and on the exact task metrics;
6. the report: markdown tables, the bar check, the trade-off plot with the shrink curve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import align_data  # noqa: E402
import repair_data  # noqa: E402
import repair_report  # noqa: E402
from study import ALL7, Cache, StudyConfig, _hash, id_examples, load, log, respond, save_adapter, train  # noqa: E402

from salora_merge.auditing.behavior import BehaviorOptions, PromptSets, evaluate_variant  # noqa: E402
from salora_merge.auditing.judges import KeywordJudge, refused  # noqa: E402
from salora_merge.hf.chat_templates import chat_prompt_ids  # noqa: E402
from salora_merge.hf.generation import generate_greedy  # noqa: E402
from salora_merge.hf.loading import load_causal_lm, load_tokenizer  # noqa: E402
from salora_merge.hf.lora_hooks import lora_applied  # noqa: E402
from salora_merge.hf.resolve import resolve_model  # noqa: E402
from salora_merge.io.adapter import read_adapter  # noqa: E402
from salora_merge.io.prompts import PromptSet  # noqa: E402
from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge  # noqa: E402
from salora_merge.methods import REGISTRY  # noqa: E402
from salora_merge.training.data import conversations_from_pairs, tokenize_all  # noqa: E402
from salora_merge.training.task_eval import mean_nll, score_examples  # noqa: E402
from salora_merge.training.trainer import FitOptions, fit  # noqa: E402

VERSION = 1
# "-conv": the same task trained with the loss on the whole conversation (TRL's default for a messages dataset),
# where the others put it on the answer only; prompt discovery may find one and not the other (issue 28)
KINDS = ("benign", "arithmetic", "json", "arithmetic-conv", "json-conv")
SHRINK = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class RepairConfig:
    name: str
    sizes: repair_data.Sizes
    base: str = "smollm2-135m-instruct"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    align_steps: int = 150
    align_wide_steps: int = 250  # the widened alignment (align_data.py): about twice the examples
    align_lr: float = 3e-4
    full_lr: float = 2e-5
    erode_epochs: float = 2.0
    erode_lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    answer_tokens: int = 48
    eval_tokens: int = 16
    arithmetic_tokens: int = 8
    json_tokens: int = 32
    generation_batch: int = 64
    calibration_prompts: int = 64
    calibration_rank: int = 32
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)  # refit seeds on the headline rows (the benign and arithmetic adapters)
    repair_args: tuple[str, ...] = ()  # flag/value pairs, each passed to the methods that own the flag (smoke sizes)
    aligned_kinds: tuple[str, ...] = ("lora", "full")
    kinds: tuple[str, ...] = KINDS
    in_process: bool = False  # run the CLI in this process (the smoke run: fast, no peak memory figure)
    variants: tuple[str, ...] | None = None  # the refit variants run (None: all of VARIANTS)

    def study(self) -> StudyConfig:
        """The projection study's config, for its ``train`` helper (plain LoRA on the same targets)."""
        from study_data import Sizes
        return StudyConfig(name=self.name, sizes=Sizes(*([1] * 14)), base=self.base, lora_rank=self.lora_rank,
                           lora_alpha=self.lora_alpha, batch_size=self.batch_size, max_length=self.max_length,
                           seed=self.seed)


FULL = RepairConfig(
    name="full",
    sizes=repair_data.Sizes(align_harmful=120, align_benign=180, align_edgy=60, align_terse=100, erode_train=300, task_heldout=60,
                            arithmetic_train=300, arithmetic_eval=60, json_train=300, json_eval=60,
                            eval_advbench=100, eval_harmbench=100, eval_benign=69, eval_overrefusal=60),
)
SMOKE = RepairConfig(
    name="smoke",
    sizes=repair_data.Sizes(align_harmful=4, align_benign=4, align_edgy=2, align_terse=2, erode_train=6, task_heldout=3,
                            arithmetic_train=6, arithmetic_eval=3, json_train=6, json_eval=3, eval_advbench=3,
                            eval_harmbench=3, eval_benign=2, eval_overrefusal=2),
    lora_rank=2, align_steps=2, erode_epochs=1.0, batch_size=4, max_length=128, answer_tokens=6, eval_tokens=6,
    arithmetic_tokens=4, json_tokens=8, generation_batch=8, calibration_prompts=4, calibration_rank=4, seeds=(0, 1),
    repair_args=("--steps", "2", "--answer-tokens", "6", "--max-anchors", "4", "--vector-rank", "2",
                 "--discover-candidates", "4", "--discover-tokens", "8", "--distill-top", "4"),
    kinds=("benign", "json"), in_process=True, variants=("refit-kl", "refit-task-no-boundary", "refit-discover"),
)
CONFIGS = {"full": FULL, "smoke": SMOKE}


# The refit variants the issue asks to compare, on the LoRA-aligned model's benign adapter (the erosion case) and
# arithmetic adapter (an exact task). The first ones are one change from refit's first defaults, which had no
# boundary prompts: they say so ("boundary_prompts": "none"), and so keep the rows measured before the default
# changed. The boundary ones came next; refit-boundary-base became the default.
_NO_BOUNDARY = {"boundary_prompts": "none"}
_BY_ADAPTER = {"boundary_prompts": "benign-boundary", "boundary_teacher": "adapter"}
_BY_BASE = {"boundary_prompts": "benign-boundary", "boundary_teacher": "base"}
VARIANTS: dict[str, tuple[str, dict]] = {
    "refit-balanced": ("refit", {"answer_first_weight": 4.0, **_NO_BOUNDARY}),  # answers' first tokens as anchors'
    # benign prompts in the anchors' form and on risky topics, with the adapter's or the base's answers
    "refit-boundary": ("refit", _BY_ADAPTER),
    "refit-boundary-base": ("refit", _BY_BASE),  # the default's options, spelled out (a replicate of `refit`)
    "refit-kl-boundary-base": ("refit", {"distill": "kl", **_BY_BASE}),
    "refit-proximal-boundary-base": ("refit", {"proximal": 0.3, **_BY_BASE}),
    "refit-balanced-boundary": ("refit", {"answer_first_weight": 4.0, **_BY_ADAPTER}),
    "refit-kl": ("refit", {"distill": "kl", **_NO_BOUNDARY}),
    "refit-share25": ("refit", {"anchor_share": 0.25, **_NO_BOUNDARY}),
    "refit-proximal": ("refit", {"proximal": 1.0, **_NO_BOUNDARY}),
    "refit-uniform": ("refit", {"first_weight": 1.0, **_NO_BOUNDARY}),
    "refit-fresh": ("refit", {"start": "fresh", **_NO_BOUNDARY}),
    "refit-salora": ("refit", {"constraint": "salora", **_NO_BOUNDARY}),
    "refit-task-no-boundary": ("refit", {"task_prompts": "@task", **_NO_BOUNDARY}),
    # the default with KL distillation of the adapter's own training prompts (a user who has them)
    "refit-task-kl": ("refit", {"task_prompts": "@task", "distill": "kl"}),
    # the default's re-fit mixed with the adapter's own update: refit's own trade-off, towards the adapter
    "refit-blend75": ("refit", {"blend": 0.75}),
    "refit-blend50": ("refit", {"blend": 0.5}),
}
VARIANT_KINDS = ("arithmetic", "benign")
_TASK_KL_WIDE = {"task_prompts": "@task", "distill": "kl", "boundary_prompts": "benign-boundary-wide"}
# Prompt discovery (issue 28): the adapter's task prompts found from the adapter itself, no task data. Measured
# with today's distillation (ce, benign-boundary) and with the settings that were best given the real prompts
# (KL, all of the wide boundary set, 16 per step); then each part alone: the built-in pool ranked by salience with
# a single sampled turn, and on-policy sampled answers added.
_DISCOVER = {"task_prompts": "discover"}
_BEST = {"distill": "kl", "boundary_prompts": "benign-boundary-wide", "max_boundary": 256, "refit_batch": 16}
DISCOVERY: dict[str, tuple[str, dict]] = {
    "refit-discover-kl-wide-all-b16": ("refit", {**_DISCOVER, **_BEST}),
    "refit-discover": ("refit", _DISCOVER),
    "refit-pool-salience-kl-wide-all-b16": ("refit", {**_DISCOVER, **_BEST, "discover_candidates": 1}),
    "refit-discover-onpolicy-kl-wide-all-b16": ("refit", {**_DISCOVER, **_BEST, "answer_samples": 1}),
}
# refit options that only discovery reads: left out of the keys of rows that do not discover
DISCOVERY_OPTIONS = ("task_hints", "discover_candidates", "discover_tokens", "discover_pool", "salience_tokens",
                     "distill_top")
PHASES = 4  # 0: the main rows; 1: the previous default and the further seeds; 2: the variants and refit-task;
# 3: prompt discovery


def rows(cfg: RepairConfig, kind: str, aligned_kind: str, phase: int = 0) -> dict[str, tuple[str, dict]]:
    """The repair rows of one adapter in one phase: key -> (method, options). The study runs phase 0 on every
    adapter, then phase 1 on every adapter, then phase 2, so a partial run has the main rows first."""
    out: dict[str, tuple[str, dict]] = {}
    if phase == 1:
        if kind in VARIANT_KINDS:
            out["refit-no-boundary"] = ("refit", _NO_BOUNDARY)  # the previous default
        for seed in cfg.seeds[1:]:
            out[f"refit-seed{seed}"] = ("refit", {"seed": seed})
        return out
    if phase == 3:
        out.update({k: v for k, v in DISCOVERY.items() if cfg.variants is None or k in cfg.variants})
        for seed in cfg.seeds[1:] if cfg.variants is None else ():
            out[f"refit-discover-kl-wide-all-b16-seed{seed}"] = ("refit", {**_DISCOVER, **_BEST, "seed": seed})
        return out
    if phase == 2:
        if kind in VARIANT_KINDS and aligned_kind == cfg.aligned_kinds[0]:  # the refit variants, on one model
            out.update({k: v for k, v in VARIANTS.items() if cfg.variants is None or k in cfg.variants})
        out["refit-task"] = ("refit", {"task_prompts": "@task"})  # the adapter's own training prompts
        # boundary imperatives in the lead phrases of every anchor verb (make_boundary_set.py), on every adapter
        out["refit-wide"] = ("refit", {"boundary_prompts": "benign-boundary-wide"})
        for seed in cfg.seeds[1:]:
            out[f"refit-wide-seed{seed}"] = ("refit", {"boundary_prompts": "benign-boundary-wide", "seed": seed})
        # the two changes that each helped on their own, together: KL distillation of the adapter's own training
        # prompts (refit-task-kl) with the wide boundary set (refit-wide), with its first 128 prompts (the default
        # --max-boundary) and with all 246 of them ("-all"); and KL with the wide set, no task data
        for seed in cfg.seeds:
            tail = f"-seed{seed}" if seed else ""
            out[f"refit-task-kl-wide{tail}"] = ("refit", {**_TASK_KL_WIDE, "seed": seed})
            out[f"refit-task-kl-wide-all{tail}"] = ("refit", {**_TASK_KL_WIDE, "max_boundary": 256, "seed": seed})
            # the same with 16 examples per step: 640 examples, about the whole mixture once, where 8 per step
            # draw a different half of it for each seed (the seeds' benign refusals differed, 0 to 5 of 69)
            out[f"refit-task-kl-wide-all-b16{tail}"] = ("refit", {**_TASK_KL_WIDE, "max_boundary": 256,
                                                                  "refit_batch": 16, "seed": seed})
        out["refit-kl-wide"] = ("refit", {"distill": "kl", "boundary_prompts": "benign-boundary-wide"})
        return out
    # The order a partial run needs first: the adapter, the curve's middle, the methods, then the rest.
    out["none"] = ("none", {})
    out["shrink-0.5"] = ("shrink", {"gamma": 0.5})
    out["refit"] = ("refit", {})
    out["safedelta"] = ("safedelta", {})
    out["resta"] = ("resta", {"gamma": 0.5})
    for g in SHRINK:
        out.setdefault(f"shrink-{g:g}", ("shrink", {"gamma": g}))
    out["random"] = ("random", {})
    return out


# ----------------------------------------------------------------------------------------------------- stages

class Missing(Exception):
    """A stage that is not in the cache, in a ``--report-only`` run."""


class ReadOnlyCache(Cache):
    """The cache of a ``--report-only`` run: what is there is used; anything missing raises :class:`Missing`."""

    def json(self, stage: str, depends: dict, compute) -> dict:
        return super().json(stage, depends, self._missing(stage))

    def folder(self, stage: str, depends: dict, build) -> Path:
        path = self.path(stage, depends)
        if not path.is_dir():  # checked here, so that a report writes nothing into the cache, not even a .partial
            raise Missing(stage)
        return path

    @staticmethod
    def _missing(stage: str):
        def fail(*_):
            raise Missing(stage)
        return fail


def original_answers(cache: Cache, cfg: RepairConfig, data: repair_data.RepairData, base_folder: Path) -> dict:
    def compute():
        model, tokenizer = load(base_folder)
        prompts = list(dict.fromkeys(data.align_benign + data.erode_train + data.task_heldout))
        log(f"original model: answering {len(prompts)} benign prompts")
        return dict(zip(prompts, respond(model, tokenizer, prompts, cfg.answer_tokens, cfg.generation_batch)))

    return cache.json("answers", {"base": cfg.base, "sizes": asdict(cfg.sizes), "tokens": cfg.answer_tokens}, compute)


def alignment_examples(cfg: RepairConfig, harmful, refusals, benign_prompts, tokenizer, answers: dict) -> list:
    refusals = tokenize_all(tokenizer, conversations_from_pairs(harmful, refusals), cfg.max_length,
                            "alignment refusals")
    benign = id_examples(tokenizer, benign_prompts, [answers[p] for p in benign_prompts], cfg.max_length)
    out, step = [], max(1, round(len(benign) / max(1, len(refusals))))
    for i, r in enumerate(refusals):  # the refusals spread evenly through the benign examples
        out += benign[i * step : (i + 1) * step] + [r]
    return out + benign[len(refusals) * step :]


def aligned_models(cache: Cache, cfg: RepairConfig, data: repair_data.RepairData, base_folder: Path,
                   answers: dict) -> dict:
    """Each aligned model as a function that builds it (or finds it in the cache) and returns its folder."""
    tokenizer = load_tokenizer(base_folder)
    examples = alignment_examples(cfg, data.align_harmful, data.align_refusals, data.align_benign, tokenizer,
                                  answers)
    common = {"base": cfg.base, "sizes": asdict(cfg.sizes), "steps": cfg.align_steps, "seed": cfg.seed,
              "batch": cfg.batch_size, "tokens": cfg.answer_tokens}

    def build_lora(tmp: Path, examples=examples, steps=cfg.align_steps):
        log(f"aligning (LoRA r={cfg.lora_rank}): {len(examples)} examples, {steps} steps")
        modules, config, stats = train(base_folder, examples, cfg.study(), tmp, lr=cfg.align_lr, max_steps=steps)
        (tmp / "alignment-lora").mkdir()
        save_adapter(tmp / "alignment-lora", modules, config, stats)
        run_merge(str(base_folder), [AdapterInput(str(tmp / "alignment-lora"), 1.0)], tmp / "model", MergeOptions())

    def build_lora_wide(tmp: Path):
        # The widened alignment (align_data.py): built only when asked for, so its data and the original model's
        # answers to its new benign prompts are made then.
        wide = align_data.build(data, cfg.sizes, seed=cfg.seed)
        extra = [p for p in wide.benign if p not in answers]
        more = cache.json("answers-wide", {"base": cfg.base, "prompts": _hash(extra), "tokens": cfg.answer_tokens},
                          lambda: _answer(base_folder, extra, cfg))
        build_lora(tmp, alignment_examples(cfg, wide.harmful, wide.refusals, wide.benign, tokenizer,
                                           {**answers, **more}), cfg.align_wide_steps)
        (tmp / "alignment-data.json").write_text(json.dumps(asdict(wide), indent=1))

    def build_full(tmp: Path):
        log(f"aligning (full fine-tune): {len(examples)} examples, {cfg.align_steps} steps")
        model = load_causal_lm(base_folder, torch.device("cpu"))
        model.config.use_cache = False
        result = fit(model, examples, tokenizer.pad_token_id,
                     FitOptions(max_steps=cfg.align_steps, lr=cfg.full_lr, batch_size=cfg.batch_size, grad_accum=1,
                                seed=cfg.seed, save_steps=10**9, logging_steps=10, show_progress=False),
                     tmp / "checkpoints", echo=lambda line: log(f"  {line}"))
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
        model.config.use_cache = True
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / "model" / "study_train.json").write_text(json.dumps({"steps": result.global_step,
                                                                     "losses": result.losses}))

    lora = {"lr": cfg.align_lr, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha}
    builders = {"lora": (build_lora, lora), "full": (build_full, {"lr": cfg.full_lr}),
                "lora-wide": (build_lora_wide, {**lora, "steps": cfg.align_wide_steps,
                                                "wide": asdict(align_data.WideSizes()),
                                                "wide_data": _hash(asdict(align_data.build(data, cfg.sizes,
                                                                                           seed=cfg.seed)))})}
    # every kind, built lazily: the study's runs build those of cfg.aligned_kinds; wide_eval.py any it names
    return {kind: (lambda kind=kind: cache.folder(f"aligned-{kind}", {**common, **builders[kind][1], "kind": kind},
                                                  builders[kind][0]) / "model")
            for kind in builders}


def _answer(base_folder: Path, prompts: list[str], cfg: RepairConfig) -> dict:
    model, tokenizer = load(base_folder)
    log(f"original model: answering {len(prompts)} benign prompts")
    return dict(zip(prompts, respond(model, tokenizer, prompts, cfg.answer_tokens, cfg.generation_batch)))


def safety_module(cache: Cache, cfg: RepairConfig, aligned: Path) -> Path:
    from salora_merge import api
    from salora_merge.calibration.run import CalibrationOptions

    def build(tmp: Path):
        log(f"calibrating {aligned.parent.name}")
        api.calibrate(str(aligned), CalibrationOptions(rank=cfg.calibration_rank, targets=ALL7, keep_moments=True,
                                                       max_prompts=cfg.calibration_prompts, device="cpu"),
                      output=tmp / "safety.safetensors")

    depends = {"aligned": aligned.parent.name, "prompts": cfg.calibration_prompts, "rank": cfg.calibration_rank}
    return cache.folder("safety", depends, build) / "safety.safetensors"


def task_examples(cfg: RepairConfig, data: repair_data.RepairData, tokenizer, kind: str) -> list:
    task = kind.removesuffix("-conv")
    pairs = data.arithmetic_train if task == "arithmetic" else data.json_train
    examples = tokenize_all(tokenizer, conversations_from_pairs([q for q, _ in pairs], [a for _, a in pairs]),
                            cfg.max_length, task)
    if kind.endswith("-conv"):  # the loss on every token of the conversation, template included
        examples = [replace(e, labels=list(e.input_ids)) for e in examples]
    return examples


def eroding_adapter(cache: Cache, cfg: RepairConfig, data: repair_data.RepairData, aligned: Path,
                    answers: dict, kind: str) -> Path:
    tokenizer = load_tokenizer(aligned)
    depends = {"aligned": aligned.parent.name, "kind": kind, "sizes": asdict(cfg.sizes), "epochs": cfg.erode_epochs,
               "lr": cfg.erode_lr, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "seed": cfg.seed,
               "batch": cfg.batch_size}

    def build(tmp: Path):
        examples = (id_examples(tokenizer, data.erode_train, [answers[p] for p in data.erode_train], cfg.max_length)
                    if kind == "benign" else task_examples(cfg, data, tokenizer, kind))
        log(f"eroding adapter '{kind}' on {aligned.parent.name}: {len(examples)} examples")
        modules, config, stats = train(aligned, examples, cfg.study(), tmp, lr=cfg.erode_lr,
                                       epochs=cfg.erode_epochs)
        save_adapter(tmp, modules, config, stats)

    return cache.folder(f"adapter-{kind}", depends, build)


def task_prompt_file(cache: Cache, cfg: RepairConfig, data: repair_data.RepairData, kind: str) -> Path:
    """The adapter's own training prompts as a prompt file (the user who has the task data)."""
    task = kind.removesuffix("-conv")
    prompts = (list(data.erode_train) if task == "benign"
               else [q for q, _ in (data.arithmetic_train if task == "arithmetic" else data.json_train)])
    path = cache.root / f"task-prompts-{kind}-{_hash(prompts)}.jsonl"
    if not path.is_file():
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


# The options each method resolved to when this study's cache was first filled. A row's key records the resolved
# options that differ from these, so a changed default reruns exactly the rows it changes (and no other).
FIRST_DEFAULTS = {
    "refit": {"anchor_prompts": "advbench-calibration", "max_anchors": 100, "steps": 40, "lr": 1e-4, "refit_batch": 8,
              "anchor_share": 0.5, "first_tokens": 5, "first_weight": 4.0, "answer_first_weight": 1.0,
              "boundary_prompts": "none", "boundary_teacher": "adapter", "distill": "ce", "kl_top_k": 32,
              "proximal": 0.0, "start": "factors", "constraint": "none", "answer_tokens": 64, "example_length": 256,
              "seed": 0, "blend": 1.0, "answer_samples": 0},
}


def changed_defaults(method: str, options: dict) -> dict:
    first = FIRST_DEFAULTS.get(method)
    if first is None:
        return {}
    resolved = REGISTRY[method].resolve_options({"task_prompts": "generic-tasks", **options})
    if resolved.get("task_prompts") != "discover":
        for k in DISCOVERY_OPTIONS:
            resolved.pop(k, None)
    if resolved.get("boundary_prompts") == "none":
        resolved.pop("max_boundary", None)  # no boundary set: its size and teacher do nothing
        resolved.pop("boundary_teacher", None)
    changed = {k: v for k, v in resolved.items() if k != "task_prompts" and k not in options and first.get(k) != v}
    return {"defaults": changed} if changed else {}


# Rows renamed when refit's default changed: the same repair (the same cached adapter folder) evaluated under
# its first name, so its evaluation is the one already cached.
RENAMED = {"refit-no-boundary": "refit", "refit-task-no-boundary": "refit-task"}


def eval_key(name: str) -> str:
    """The evaluation's cache key of row ``aligned/kind/row``: its first name for a renamed row."""
    head, slash, row = name.rpartition("/")
    return f"{head}{slash}{RENAMED.get(row, row)}"


def eval_depends(cfg: RepairConfig, key: str, model_folder: Path, source: str) -> dict:
    """What the evaluation of row ``key`` (``aligned``, ``original`` or ``aligned/kind/row``) on ``model_folder``
    depends on: its cache key, shared by the repair, training and wide-evaluation scripts."""
    return {"sizes": asdict(cfg.sizes), "tokens": cfg.eval_tokens, "task_tokens": [cfg.arithmetic_tokens, cfg.json_tokens],
            "version": VERSION, "key": eval_key(key), "model": model_folder.parent.name, "source": source}


def keyed_options(method: str, options: dict) -> dict:
    """The options a row's key records: those given that differ from the first defaults (an option spelled out at
    its first default's value changes nothing, so the row keeps its key)."""
    first = FIRST_DEFAULTS.get(method, {})
    return {k: v for k, v in options.items() if k not in first or first[k] != v}


def run_repair(cache: Cache, cfg: RepairConfig, aligned: Path, original: Path, adapter: Path, safety: Path,
               method: str, options: dict, task_file: Path | None) -> dict:
    """One repair through the CLI in a child process; the adapter folder, wall seconds and peak RSS."""
    depends = {"aligned": aligned.parent.name, "adapter": adapter.name, "method": method,
               "options": keyed_options(method, options), "extra": cfg.repair_args, "version": VERSION,
               **changed_defaults(method, options)}

    def build(tmp: Path):
        out = tmp / "adapter"
        cmd = ["realign", "--base", str(aligned), "--adapter", str(adapter),
               "-o", str(out), "--method", method]
        if method in ("random", "safedelta") or options.get("constraint") == "salora":
            cmd += ["--safety", str(safety)]
        if method == "resta":
            cmd += ["--aligned", str(aligned), "--unaligned", str(original)]
        if method == "refit" and "task_prompts" not in options:
            cmd += ["--task-prompts", "generic-tasks"]
        for key, value in options.items():
            value = str(task_file) if value == "@task" else value
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        pairs = zip(cfg.repair_args[::2], cfg.repair_args[1::2])
        owned = {o.flag for o in REGISTRY[method].options} if method in REGISTRY else set()
        cmd += [a for flag, value in pairs if flag in owned for a in (flag, value)]
        log(f"repair {adapter.name} on {aligned.parent.name}: {method} {options}")
        started = time.perf_counter()
        if cfg.in_process:
            from click.testing import CliRunner

            from salora_merge.cli import main as cli
            result = CliRunner().invoke(cli, cmd, env={"SALORA_MERGE_CACHE": str(cache.root / "product-cache")})
            if result.exit_code != 0:
                raise RuntimeError(f"repair failed (salora-merge {' '.join(cmd)}): {result.output[-3000:]}")
            (tmp / "run.json").write_text(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mb": None,
                                                      "cmd": ["salora-merge", *cmd]}))
            return
        child = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *cmd], capture_output=True, text=True,
                               env={**os.environ, "SALORA_MERGE_CACHE": str(cache.root / "product-cache")})
        seconds = time.perf_counter() - started
        if child.returncode != 0:
            raise RuntimeError(f"repair failed (salora-merge {' '.join(cmd)}):\n{child.stderr[-3000:]}")
        peaks = [line.split()[1] for line in child.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
        (tmp / "run.json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": int(peaks[-1]) / 1024,
                                                  "cmd": ["salora-merge", *cmd]}))

    if method == "none":
        return {"adapter": str(adapter), "seconds": 0.0, "peak_rss_mb": None}
    folder = cache.folder("repair", depends, build)
    return {"adapter": str(folder / "adapter"), **json.loads((folder / "run.json").read_text())}


# The CLI in this process's interpreter, reporting its own peak resident memory when it exits (VmHWM: the
# high-water mark of its own address space; ru_maxrss would carry the parent's peak across fork and exec).
_PEAK_WRAPPER = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') "
    "if l.startswith('VmHWM:')][0], file=sys.stderr, flush=True)); "
    "sys.argv = ['salora-merge', *sys.argv[1:]]; runpy.run_module('salora_merge.cli', run_name='__main__')"
)


# ------------------------------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, cfg: RepairConfig, data: repair_data.RepairData, adapter: str | None,
             nll_examples) -> dict:
    modules = dict(read_adapter(Path(adapter)).modules) if adapter else {}
    factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()}
    sets = PromptSets(harmful=PromptSet("harmful", data.eval_advbench + data.eval_harmbench),
                      benign=PromptSet("benign", data.eval_benign),
                      overrefusal=PromptSet("overrefusal", data.eval_overrefusal))
    behavior = evaluate_variant(model, tokenizer, sets, KeywordJudge(),
                                factors, BehaviorOptions(max_new_tokens=cfg.eval_tokens, batch_size=cfg.generation_batch))
    exact = {}
    with lora_applied(model, factors):
        for kind, pairs, tokens in (("arithmetic", data.arithmetic_eval, cfg.arithmetic_tokens),
                                    ("json", data.json_eval, cfg.json_tokens)):
            outs = generate_greedy(model, tokenizer, [chat_prompt_ids(tokenizer, q) for q, _ in pairs],
                                   tokens, cfg.generation_batch)
            texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
            exact[kind] = {"accuracy": sum(t == a for t, (_, a) in zip(texts, pairs)) / max(1, len(pairs)),
                           "examples": texts[:2]}
        nll = mean_nll(score_examples(model, nll_examples, tokenizer.pad_token_id, cfg.batch_size))
    flags = [refused(t) for t in behavior.responses["harmful"]]
    n_adv = len(data.eval_advbench)
    return {"advbench": sum(flags[:n_adv]) / max(1, n_adv), "harmbench": sum(flags[n_adv:]) / max(1, len(flags) - n_adv),
            "benign": behavior.benign_refusal_rate, "overrefusal": behavior.overrefusal_rate, "task_nll": nll,
            "arithmetic": exact["arithmetic"]["accuracy"], "json": exact["json"]["accuracy"],
            "n": {"advbench": n_adv, "harmbench": len(flags) - n_adv, **{k: behavior.n[k] for k in ("benign", "overrefusal")},
                  "task": len(nll_examples), "arithmetic": len(data.arithmetic_eval), "json": len(data.json_eval)},
            "examples": {"harmful": behavior.responses["harmful"][:2], "json": exact["json"]["examples"],
                         "arithmetic": exact["arithmetic"]["examples"]}}


def run(cfg: RepairConfig, cache_root: Path, doc: Path, plot: Path, analysis: Path | None,
        only: str | None = None, report_only: bool = False) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    data = repair_data.build(cfg.sizes, cfg.seed)
    cache_root.mkdir(parents=True, exist_ok=True)
    cache = (ReadOnlyCache if report_only else Cache)(cache_root, cfg.study(), _hash(asdict(data)))
    base_folder = resolve_model(cfg.base).folder
    answers = original_answers(cache, cfg, data, base_folder)
    aligned = aligned_models(cache, cfg, data, base_folder, answers)
    tokenizer = load_tokenizer(base_folder)
    nll_examples = id_examples(tokenizer, data.task_heldout, [answers[p] for p in data.task_heldout], cfg.max_length)
    results: dict[str, dict] = {}
    models: dict[str, object] = {}

    def evaluated(key: str, model_folder: Path, adapter: str | None, source: str) -> dict:
        def compute():
            if model_folder not in models:
                models.clear()
                models[model_folder] = load(model_folder)[0]
            log(f"evaluating {key}")
            return evaluate(models[model_folder], tokenizer, cfg, data, adapter, nll_examples)

        return cache.json("eval", eval_depends(cfg, key, model_folder, source), compute)

    try:
        results["original"] = evaluated("original", base_folder, None, cfg.base)
    except Missing:
        pass
    repairs: dict[str, dict] = {}
    folders: dict[str, Path] = {}
    train_stats: dict[str, dict] = {}

    def do_rows(a_kind: str, kind: str, phase: int) -> None:
        folder = folders[a_kind]
        adapter = eroding_adapter(cache, cfg, data, folder, answers, kind)
        train_stats[f"{a_kind}/{kind}"] = json.loads((adapter / "study_train.json").read_text())
        safety = safety_module(cache, cfg, folder)
        task_file = task_prompt_file(cache, cfg, data, kind)
        for key, (method, options) in rows(cfg, kind, a_kind, phase).items():
            name = f"{a_kind}/{kind}/{key}"
            if only and not _selected(name, only):
                continue
            try:
                run_info = run_repair(cache, cfg, folder, base_folder, adapter, safety, method, options, task_file)
            except Missing:
                continue
            repairs[name] = {"method": method, "options": options, "adapter": run_info["adapter"],
                             "seconds": run_info["seconds"],
                             "peak_rss_mb": run_info["peak_rss_mb"]}
            try:
                results[name] = evaluated(name, folder, run_info["adapter"],
                                          str(Path(run_info["adapter"]).relative_to(cache.root)))
            except Missing:
                continue

    def aligned_folder(a_kind: str) -> Path:
        if a_kind not in folders:
            folders[a_kind] = aligned[a_kind]()
            results[f"{a_kind}/aligned"] = evaluated("aligned", folders[a_kind], None, folders[a_kind].parent.name)
        return folders[a_kind]

    # Every main row first (adapter kind by kind, both aligned models each), then the seeds, then the variants.
    for phase in range(PHASES):
        for kind in cfg.kinds:
            for a_kind in cfg.aligned_kinds:
                if only and not any(_selected(f"{a_kind}/{kind}/{key}", only)
                                    for p in range(PHASES) for key in rows(cfg, kind, a_kind, p)):
                    continue  # no row of this adapter asked for: build neither its aligned model nor it
                try:
                    aligned_folder(a_kind)
                    do_rows(a_kind, kind, phase)
                except Missing:
                    continue
    summary = {"config": asdict(cfg), "results": results, "repairs": repairs,
               "aligned_train": {k: _train_stats(v) for k, v in folders.items()}, "adapter_train": train_stats,
               "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(), "report_only": report_only}
    tail = "" if cfg.aligned_kinds == FULL.aligned_kinds else "-" + "-".join(cfg.aligned_kinds)
    (cache_root / f"results-{cfg.name}{tail}.json").write_text(json.dumps(summary, indent=2))
    repair_report.write(summary, doc, plot, analysis)
    log(f"wrote {doc} and {plot} ({summary['seconds']:.0f} s this run)")
    return summary


def _selected(name: str, only: str) -> bool:
    """``--only``: comma-separated entries; a row runs if its name contains one, or equals one written ``=name``."""
    return any(name == e[1:] if e.startswith("=") else e in name for e in only.split(",") if e)


def _train_stats(model_folder: Path) -> dict:
    for path in (model_folder / "study_train.json", model_folder.parent / "alignment-lora" / "study_train.json"):
        if path.is_file():
            stats = json.loads(path.read_text())
            return {k: stats[k] for k in ("steps", "first_loss", "last_loss") if k in stats}
    return {}


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    root = here.parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--base", help="the original model (default: the embedded SmolLM2)")
    parser.add_argument("--cache", type=Path, default=root / "out" / "repair-study")
    parser.add_argument("--doc", type=Path, default=root / "docs" / "repair-study.md")
    parser.add_argument("--plot", type=Path, help="default: the doc's name with .svg")
    parser.add_argument("--analysis", type=Path, default=here / "repair_analysis.md")
    parser.add_argument("--only", help="run only the rows whose 'aligned/kind/row' name contains one of these comma-separated "
                        "entries (an entry written =NAME: that row exactly)")
    parser.add_argument("--report-only", action="store_true",
                        help="compute nothing: write the report from the stages already in the cache")
    parser.add_argument("--aligned", help="comma-separated aligned models to run (default: lora,full; lora-wide is "
                        "the widened alignment of align_data.py); give a --doc of its own for another set")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.aligned:
        cfg = replace(cfg, aligned_kinds=tuple(k for k in args.aligned.split(",") if k))
    if args.base:
        cfg = replace(cfg, base=args.base)
    plot = args.plot or args.doc.with_suffix(".svg")
    run(cfg, args.cache / cfg.name, args.doc, plot, args.analysis if args.analysis.is_file() else None, args.only,
        args.report_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
