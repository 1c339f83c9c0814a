"""Options of SaLoRA training and the report of a run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

from salora_merge.core.training_math import (
    INITS,
)
from salora_merge.errors import InputError
from salora_merge.training.mixture import anchors_per_batch
from salora_merge.hf.placement import Placement, placement_of, placement_problems
from salora_merge.training.trainer import (
    FitOptions,
)
from salora_merge.version import __version__
from salora_merge.readable import Readable


@dataclass(frozen=True)
class KeepRefusals:
    """Refusal anchors mixed into training (the repair's anchored objective, ``training/objective.py``): harmful
    prompts with the base model's own responses and benign boundary prompts with its own answers, ``share`` of
    every batch, the first ``first_tokens`` response tokens of each anchor weighted ``first_weight``."""

    enabled: bool = True
    share: float = 0.125  # one anchor in each batch of 8 (8/7 the steps of the data alone)
    anchor_prompts: str = "advbench-calibration"
    max_anchors: int = 100
    boundary_prompts: str = "benign-boundary"  # 'none' for none
    max_boundary: int = 128
    first_tokens: int = 5
    first_weight: float = 4.0
    answer_tokens: int = 64  # length of the base model's responses (generated and cached; shared with repair)
    # Only the first response tokens of each anchor are learned: the training study (docs/train-study.md) found
    # the same refusals with 8 as with all 64, at 1.14x the time of the data alone instead of 1.83x (a batch of
    # short examples is padded to its longest: a long anchor made every step longer). None: all of them.
    train_tokens: int | None = 8

    def problems(self, batch_size: int) -> list[str]:
        if not self.enabled:
            return []
        out = []
        try:  # the same check the mixture makes when it is built
            anchors_per_batch(self.share, batch_size)
        except InputError as exc:
            out.append(str(exc))
        if self.train_tokens is not None and self.train_tokens < 1:
            out.append(f"--anchor-tokens must be 0 (every response token) or positive, got {self.train_tokens}")
        if self.first_tokens < 0:
            out.append(f"--anchor-first-tokens must be 0 or more, got {self.first_tokens}")
        if self.answer_tokens < 1:  # not a CLI option: the API's KeepRefusals(answer_tokens=...)
            out.append(f"KeepRefusals.answer_tokens must be positive, got {self.answer_tokens}")
        if not 0.0 <= self.first_weight < 1e6:
            out.append(f"--anchor-first-weight must be a number from 0 to 1e6, got {self.first_weight}")
        return out


@dataclass(frozen=True)
class TrainOptions:
    rank: int = 16
    alpha: float = 16.0
    use_rslora: bool = False
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    task_rank: int = 32
    init: str = "gaussian"  # the safety study: the task-specific init moved the weights ~5x more at the same lr
    init_samples: int = 128
    dropout: float = 0.0
    max_length: int = 512
    device: str = "auto"
    device_map: str | None = None  # a model spread over several GPUs by accelerate (every layer resident)
    max_memory: str | None = None  # "0=20GiB,1=20GiB"
    random_control: int | None = None  # seed: train against random subspaces of the same sizes (the control)
    fit: FitOptions = field(default_factory=FitOptions)
    keep_refusals: KeepRefusals = field(default_factory=KeepRefusals)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5) if self.use_rslora else self.alpha / self.rank

    def placement(self) -> Placement:
        """Where the model goes (inactive without --device-map); nothing is offloaded when training."""
        return placement_of(self.device_map, self.max_memory)

    def validate(self) -> None:
        problems = placement_problems(self.device_map, self.max_memory)
        for name, value in (("--rank", self.rank), ("--task-rank", self.task_rank),
                            ("--init-samples", self.init_samples), ("--max-length", self.max_length),
                            ("--batch-size", self.fit.batch_size), ("--grad-accum", self.fit.grad_accum),
                            ("--save-steps", self.fit.save_steps)):
            if value <= 0:
                problems.append(f"{name} must be positive, got {value}")
        if self.init not in INITS:
            problems.append(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:  # also NaN
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.fit.lr < 1e3:
            problems.append(f"--lr must be a positive number below 1000, got {self.fit.lr}")
        if not 0.0 <= self.fit.warmup_ratio <= 1.0:
            problems.append(f"--warmup-ratio must be in [0, 1], got {self.fit.warmup_ratio}")
        if not 0 < self.fit.epochs < 1e6:  # checked even when --max-steps makes it unused
            problems.append(f"--epochs must be a positive number, got {self.fit.epochs}")
        if not 0 <= self.fit.seed < 2 ** 32:  # the seed numpy and the Trainer accept
            problems.append(f"--seed must be in [0, 2**32), got {self.fit.seed}")
        if self.alpha == 0 or not math.isfinite(self.alpha) or abs(self.alpha) > 1e6:
            problems.append(f"--alpha must be a finite non-zero number (up to 1e6), got {self.alpha}")
        if not self.targets:
            problems.append("--targets is empty")
        problems += self.keep_refusals.problems(self.fit.batch_size)
        if problems:
            raise InputError("; ".join(problems))

    def run_key(self) -> dict:
        """The options that change what is trained (not how it is shown or saved)."""
        data = asdict(self)
        fit_options = data.pop("fit")
        for key in ("save_steps", "save_total_limit", "logging_steps", "show_progress", "device", "sequential"):
            fit_options.pop(key)
        for key in ("device", "device_map", "max_memory"):  # where it runs, not what it learns
            data.pop(key)
        if not self.keep_refusals.enabled:  # nothing mixed in: the key of a run before the option existed
            data.pop("keep_refusals")
        return json.loads(json.dumps({**data, **fit_options}))  # flat, and as it reads back from JSON


@dataclass(frozen=True)
class TrainReport(Readable):
    base_model: str
    data: str
    data_sha256: str
    examples: int
    learned_tokens: int
    safety: str | None  # the safety module's path (None: trained without SaLoRA's constraint)
    safety_rank: int  # 0 without one
    init: str
    rank: int
    alpha: float
    use_rslora: bool
    task_rank: int
    task_tokens: int
    export_rank: int
    export_alpha: float
    modules: int
    global_step: int
    train_loss: float
    losses: tuple[tuple[int, float], ...]
    safety_energy: float | None  # share of the update's energy inside the safety subspace (0 by design; None: no module)
    seconds_init: float
    seconds_train: float
    resumed_from: str | None
    output: str
    merged: str | None = None
    options: Mapping = field(default_factory=dict)
    refusal_anchors: Mapping | None = None  # what --keep-refusals mixed in (None: nothing)

    def to_json(self) -> dict:
        data = asdict(self)
        data["losses"] = [list(item) for item in self.losses]
        data["tool_version"] = __version__
        return data

    def render(self) -> str:
        """Summary of a SaLoRA training run (``TrainReport``)."""
        first = self.losses[0][1] if self.losses else float("nan")
        last = self.losses[-1][1] if self.losses else float("nan")
        constraint = (f"SaLoRA modules (r_s = {self.safety_rank})" if self.safety is not None
                      else "LoRA modules (no safety module: SaLoRA's constraint off)")
        lines = [
            f"Trained {self.modules} {constraint} on {self.base_model} ({self.init} init, r = {self.rank}, "
            f"alpha = {self.alpha:g}{', rsLoRA' if self.use_rslora else ''})",
            f"Data: {self.data}: {self.examples} examples, {self.learned_tokens} learned tokens",
            *([self.anchors_line()] if self.refusal_anchors else []),
            f"Steps: {self.global_step}{' (resumed from ' + self.resumed_from + ')' if self.resumed_from else ''}; "
            f"logged loss {first:.4f} -> {last:.4f}; init {self.seconds_init:.1f}s, training {self.seconds_train:.1f}s",
            f"Exported as a PEFT LoRA of rank {self.export_rank} (lora_alpha {self.export_alpha:g})"
            + (f"; update energy inside the safety subspace: {self.safety_energy:.2e}"
               if self.safety_energy is not None else ""),
            f"Wrote {self.output}" + (f"; merged model: {self.merged}" if self.merged else ""),
        ]
        return "\n".join(lines)

    def anchors_line(self) -> str:
        a = self.refusal_anchors
        return (f"Refusal anchors mixed in: {a['examples_added']} examples ({a['per_batch']} of every batch of "
                f"{a['batch_size']}) drawn from {a['distinct']} anchors: `{a['anchor_prompts']}` with the base model's "
                f"responses, `{a['boundary_prompts']}` with its answers; first {a['first_tokens']} response tokens "
                f"weighted {a['first_weight']:g}")
