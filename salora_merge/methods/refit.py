"""``refit``: re-fit the adapter on refusal anchors mixed with distillation of its own behaviour (the anchored
re-fit of the repair issue): a short fine-tune of its factors (or a fresh LoRA) on the Trainer; no task data
needed. The engine is ``training/refit.py``; the objective ``core/refit_loss.py``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.errors import InputError
from salora_merge.hf.cards import adapter_front_matter
from salora_merge.methods.base import REPAIR_MEASURED, Method, MethodContext, MethodOption
from salora_merge.version import __version__
from salora_merge.readable import Readable

if TYPE_CHECKING:
    from salora_merge.io.adapter import LoraModule

DISCOVER = "discover"  # --task-prompts: find the adapter's task prompts from the adapter itself
_CHOICES = {"distill": ("ce", "kl"), "start": ("factors", "fresh"), "constraint": ("none", "salora"),
            "boundary_teacher": ("base", "adapter")}


@dataclass(frozen=True)
class RefitReport(Readable):
    base_model: str
    adapter: str
    options: dict
    anchor_prompts: str
    task_prompts: str
    boundary_prompts: str
    anchors: int  # anchor examples in the training mixture
    distilled: int  # prompts with the adapter's answers (task, and boundary with --boundary-teacher adapter)
    discovery: dict | None = None  # with --task-prompts discover: counts, the distilled and held-out prompts, scores
    losses: list = field(default_factory=list)  # (step, training loss)
    seconds_prepare: float = 0.0
    seconds_train: float = 0.0
    output: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "method": "refit", "tool_version": __version__}

    def card(self, adapter_config: Mapping[str, Any]) -> str:
        o = self.options
        return adapter_front_matter(self.base_model, "lora", "refit", "safety") + f"""
# Re-fitted LoRA adapter

`{self.adapter}` re-fitted by [salora-merge](https://pypi.org/project/salora-merge/): {o['steps']} steps (lr
{o['lr']:g}) from its {o['start']} on {self.anchors} anchors (refusals: `{self.anchor_prompts}` with the base
model's own responses, the first {o['first_tokens']} response tokens weighted {o['first_weight']:g}) mixed with
distillation ({o['distill']}; first tokens weighted {o['answer_first_weight']:g}) of its own answers to {self.distilled}
prompts (task: `{self.task_prompts}`){self._boundary_text()}; proximal coefficient {o['proximal']:g},
constraint `{o['constraint']}`.{self._discovery_text()} {self._shape_text(adapter_config)} Figures in
`salora_refit.json`.

{REPAIR_MEASURED}
"""

    def _shape_text(self, adapter_config: Mapping[str, Any]) -> str:
        if self.options.get("blend", 1.0) == 1.0:
            return "Same targets, rank and scaling as the original."
        b = self.options["blend"]
        return (f"The update written is {b:g} x the re-fitted one plus {1 - b:g} x the original's, exactly, as one "
                f"LoRA of rank {adapter_config.get('r')} (the two stacked) with scaling 1; same targets.")

    def _discovery_text(self) -> str:
        d = self.discovery
        if not d:
            return ""
        return (f" The task prompts were discovered from the adapter itself: {d['sampled']} user turns sampled from "
                f"the adapted model plus the pool and hints, {d['refused_by_base']} that the base model refuses "
                f"dropped, {d['ranked']} ranked by the KL between the adapter's and the base's first response tokens; "
                f"the top {len(d['distilled'])} distilled, {len(d['heldout'])} held out (listed with their scores in "
                "`salora_refit.json`).")

    def _boundary_text(self) -> str:
        if self.boundary_prompts == "-":
            return ""
        if self.options["boundary_teacher"] == "base":
            return (f"; benign boundary prompts `{self.boundary_prompts}` with the base model's answers, among "
                    "the anchors")
        return f"; benign boundary prompts `{self.boundary_prompts}` distilled from its own answers"

    def render(self) -> str:
        first = self.losses[0][1] if self.losses else float("nan")
        last = self.losses[-1][1] if self.losses else float("nan")
        found = ""
        if self.discovery:
            d = self.discovery
            top = ", ".join(repr(r["prompt"][:48]) for r in d["distilled"][:3])
            found = (f"Discovered task prompts: {d['sampled']} sampled, {d['refused_by_base']} refused by the base "
                     f"and dropped, {d['ranked']} ranked, top {len(d['distilled'])} distilled ({top}, ...)\n")
        return (found + f"Re-fitted {self.adapter}: {self.options['steps']} steps on {self.anchors} anchors and "
                f"{self.distilled} distilled answers; loss {first:.4f} -> {last:.4f} "
                f"(prepare {self.seconds_prepare:.1f}s, train {self.seconds_train:.1f}s)\nWrote {self.output}"
                f"\n\nNote: {REPAIR_MEASURED}")


def _check(values: Mapping[str, Any]) -> None:
    for name, allowed in _CHOICES.items():
        if values[name] not in allowed:
            raise InputError(f"--{name.replace('_', '-')} {values[name]!r}: expected one of {', '.join(allowed)}")
    if values["task_prompts"] is None and values["anchor_share"] < 1.0:
        raise InputError("--method refit needs --task-prompts FILE or 'discover' (prompts of the adapter's task; "
                         "its own answers are distilled) unless --anchor-share 1")
    if values["anchor_share"] == 1.0 and values["task_prompts"] not in (None, DISCOVER):
        raise InputError("--anchor-share 1 trains on anchors only; drop --task-prompts or lower --anchor-share")
    if values["task_hints"] is not None and values["task_prompts"] != DISCOVER:
        raise InputError("--task-hints join the prompts that discovery ranks: use them with --task-prompts "
                         "discover, or add them to your --task-prompts file")
    if (values["anchor_share"] == 1.0 and values["boundary_prompts"] != "none"
            and values["boundary_teacher"] == "adapter"):
        raise InputError("--anchor-share 1 distills nothing, so --boundary-teacher adapter has no effect; use "
                         "--boundary-teacher base or lower --anchor-share")


def _blended(refitted: Mapping[str, "LoraModule"], original: Mapping[str, "LoraModule"],
             weight: float) -> dict[str, "LoraModule"]:
    """``weight`` of each re-fitted update plus ``1 - weight`` of the adapter's own, as one LoRA of twice the
    rank with scaling 1 (exact: the two factor pairs stacked)."""
    from salora_merge.core.lowrank import blended_factors
    from salora_merge.methods.base import at_one_rank

    factors = {}
    for name, m in refitted.items():
        o = original[name]
        b, a = blended_factors((m.lora_B.float(), m.lora_A.float(), m.scaling),
                               (o.lora_B.float(), o.lora_A.float(), o.scaling), weight)
        factors[name] = (b, a, 1.0)
    return at_one_rank(refitted, factors)


def _load(option: str, spec: str):
    from salora_merge.io.prompts import load_prompt_set

    try:
        return load_prompt_set(spec)
    except InputError as exc:
        raise InputError(f"--{option.replace('_', '-')}: {exc}") from None


def _check_inputs(options: Mapping[str, Any]) -> None:
    """The prompt files the options name, read and checked before any model work."""
    if not _load("anchor_prompts", options["anchor_prompts"]).prompts:
        raise InputError(f"--anchor-prompts {options['anchor_prompts']}: no prompts")
    if options["boundary_prompts"] != "none" and not _load("boundary_prompts", options["boundary_prompts"]).prompts:
        raise InputError(f"--boundary-prompts {options['boundary_prompts']}: no prompts (or 'none')")
    if options["task_hints"] is not None and not _load("task_hints", options["task_hints"]).prompts:
        raise InputError(f"--task-hints {options['task_hints']}: no prompts; give a file with one prompt per line "
                         "(or JSONL with a 'prompt' field), or leave it out")


def apply_refit(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
                options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], RefitReport]:
    from salora_merge.training.refit import RefitOptions, refit_adapter

    load = _load  # the same one-line errors as check_inputs

    anchors = load("anchor_prompts", options["anchor_prompts"]).head(options["max_anchors"])
    if not anchors.prompts:
        raise InputError(f"--anchor-prompts {options['anchor_prompts']}: no prompts")
    discovering = ctx.task_prompts is None and options["task_prompts"] == DISCOVER and options["anchor_share"] < 1.0
    task = ctx.task_prompts if ctx.task_prompts is not None else (
        load("task_prompts", options["task_prompts"])
        if options["task_prompts"] not in (None, DISCOVER) else None)
    if task is not None and not task.prompts:
        raise InputError(f"--task-prompts {options['task_prompts']}: no prompts")
    request = _discovery_request(options, ctx, load) if discovering else None
    boundary = None
    if options["boundary_prompts"] != "none":
        boundary = load("boundary_prompts", options["boundary_prompts"]).head(options["max_boundary"])
        if not boundary.prompts:
            raise InputError(f"--boundary-prompts {options['boundary_prompts']}: no prompts (or 'none')")
    by_adapter = boundary is not None and options["boundary_teacher"] == "adapter"
    distill = (list(task.prompts) if task else []) + (list(boundary.prompts) if by_adapter else [])
    with_base = list(boundary.prompts) if boundary is not None and not by_adapter else []
    engine = RefitOptions(
        steps=options["steps"], lr=options["lr"], batch_size=options["refit_batch"],
        anchor_share=options["anchor_share"], first_tokens=options["first_tokens"],
        first_weight=options["first_weight"], answer_first_weight=options["answer_first_weight"],
        distill=options["distill"], kl_top_k=options["kl_top_k"],
        proximal=options["proximal"], start=options["start"], constraint=options["constraint"],
        max_new_tokens=options["answer_tokens"], max_length=options["example_length"], seed=options["seed"],
        answer_samples=options["answer_samples"], device=ctx.device, placement=ctx.placement)
    result = refit_adapter(ctx.base, modules, distill, anchors.prompts, engine,
                           safety=ctx.safety, progress=ctx.progress, boundary_prompts=with_base, discovery=request)
    out = result.modules if options["blend"] == 1.0 else _blended(result.modules, modules, options["blend"])
    return out, RefitReport(
        base_model=ctx.base_model, adapter=ctx.adapter, options=dict(options), anchor_prompts=anchors.name,
        task_prompts=task.name if task else (DISCOVER if request else "-"),
        boundary_prompts=boundary.name if boundary else "-", anchors=result.anchors, distilled=result.distilled,
        discovery=_discovery_json(result) if request else None,
        losses=result.losses, seconds_prepare=result.seconds_prepare, seconds_train=result.seconds_train,
        output=ctx.output)


def _discovery_request(options: Mapping[str, Any], ctx: MethodContext, load):
    from salora_merge.hf.chat_templates import user_turn_frame
    from salora_merge.training.discovery import DiscoveryOptions
    from salora_merge.training.refit import DiscoveryRequest

    user_turn_frame(ctx.base.tokenizer)  # no chat template: a one-line error now, before any model work

    pool = () if options["discover_pool"] == "none" else load("discover_pool", options["discover_pool"]).prompts
    hints = ()
    if options["task_hints"] is not None:
        hints = load("task_hints", options["task_hints"]).prompts
        if not hints:
            raise InputError(f"--task-hints {options['task_hints']}: no prompts; give a file with one prompt per "
                             "line (or JSONL with a 'prompt' field), or leave it out")
    found = DiscoveryOptions(candidates=options["discover_candidates"], turn_tokens=options["discover_tokens"],
                             salience_tokens=options["salience_tokens"], seed=options["seed"])
    return DiscoveryRequest(options=found, top=options["distill_top"], heldout=ctx.heldout, pool=tuple(pool),
                            hints=tuple(hints))


def _discovery_json(result) -> dict:
    return {**result.discovery.summary(), "distilled": [c.as_row() for c in result.distilled_prompts],
            "heldout": [c.as_row() for c in result.heldout_prompts]}


METHOD = Method(
    name="refit",
    summary="Re-fit the adapter on refusal anchors mixed with distillation of its own answers (a short "
            "fine-tune).",
    needs=(),
    optional=("safety",),
    apply=apply_refit,
    options=(
        MethodOption("task_prompts", str, DISCOVER, "Prompts of the adapter's task (file or built-in set), whose "
                     "answers by the adapter are distilled; 'discover': found from the adapter itself (user turns "
                     "sampled from the adapted model, the built-in pool and --task-hints, the base model's refusals "
                     "dropped, ranked by how much the adapter changes the answer there)."),
        MethodOption("task_hints", str, None, "Discovery: a file of prompts like the adapter's task, ranked with the "
                     "rest."),
        MethodOption("discover_candidates", int, 128, "Discovery: user turns sampled from the adapted model.",
                     minimum=1),
        MethodOption("discover_tokens", int, 48, "Discovery: length cap of a sampled user turn (tokens; longer "
                     "ones are dropped).", minimum=4),
        MethodOption("discover_pool", str, "generic-tasks", "Discovery: built-in set or file ranked beside the "
                     "sampled turns ('none' for none)."),
        MethodOption("salience_tokens", int, 8, "Discovery: first response tokens over which the KL between the "
                     "adapter and the base is averaged.", minimum=1),
        MethodOption("distill_top", int, 64, "Discovery: distill this many of the most salient prompts.",
                     minimum=1),
        MethodOption("answer_samples", int, 0, "On-policy: also distill this many sampled answers (temperature "
                     "1) of the adapter per task prompt.", minimum=0),
        MethodOption("anchor_prompts", str, "advbench-calibration", "Harmful prompts whose base-model responses "
                     "are the anchors (never an evaluation split)."),
        MethodOption("max_anchors", int, 100, "Use at most this many anchor prompts.", minimum=1),
        MethodOption("boundary_prompts", str, "benign-boundary", "Benign prompts near the refusal boundary (file "
                     "or built-in set; 'none' for none), learned with their "
                     "--boundary-teacher's answers so that the refusal does not spread to them."),
        MethodOption("max_boundary", int, 128, "Use at most this many boundary prompts.", minimum=1),
        MethodOption("boundary_teacher", str, "base", "Whose answers to the boundary prompts are learned: base "
                     "(the base model's, as anchors of the other side) or adapter (distilled with the task's)."),
        MethodOption("steps", int, 40, "Optimizer steps.", minimum=1),
        MethodOption("lr", float, 1e-4, "Peak learning rate (AdamW, cosine, 10% warmup).", minimum=0.0),
        MethodOption("refit_batch", int, 8, "Examples per step.", minimum=1),
        MethodOption("anchor_share", float, 0.5, "Share of anchors in the training mixture (1: anchors only).",
                     minimum=0.0, maximum=1.0),
        MethodOption("first_tokens", int, 5, "Anchors: the first N response tokens get --first-weight.", minimum=0),
        MethodOption("first_weight", float, 4.0, "Anchors: weight of the first response tokens (1: uniform).",
                     minimum=0.0),
        MethodOption("answer_first_weight", float, 1.0, "Distilled answers: weight of their first --first-tokens "
                     "response tokens (--first-weight's value balances the two).", minimum=0.0),
        MethodOption("distill", str, "ce", "ce: cross-entropy on the adapter's greedy answers; kl: its top-k "
                     "next-token distributions."),
        MethodOption("kl_top_k", int, 32, "Top-k tokens kept of the teacher's distribution for --distill kl.",
                     minimum=1),
        MethodOption("proximal", float, 0.0, "Coefficient of sum ||factor - start||^2.", minimum=0.0),
        MethodOption("start", str, "factors", "factors: from the adapter's own factors; fresh: from PEFT's init."),
        MethodOption("constraint", str, "none", "none, or salora: SaLoRA's fixed C in the forward pass (--safety)."),
        MethodOption("answer_tokens", int, 64, "Length of generated anchor responses and distilled answers.",
                     minimum=1),
        MethodOption("example_length", int, 256, "Tokens per training example.", minimum=8),
        MethodOption("blend", float, 1.0, "Share of the re-fitted update in the result, the rest the adapter's "
                     "own (1: the re-fit alone, same rank; below 1: twice the adapter's rank, scaling 1).",
                     minimum=0.0, maximum=1.0),
        MethodOption("seed", int, 0, "Seed of the mixture, the init and the data order.", minimum=0,
                     maximum=2**63 - 1),
    ),
    report_name="salora_refit.json",
    check=_check,
    check_inputs=_check_inputs,
)
