"""Options shared by several commands, each in its help section, and their conversion to option objects."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

from salora_merge.cli.help import SectionedOption, apply_options, option
from salora_merge.hf.placement import DEVICE_MAPS

__all__ = ["base_option", "calibration_options", "build_calibration", "build_placement", "output_options", "training_options",
           "build_training", "run_control", "split_targets", "method_params", "given_method_options"]


def split_targets(value: str | None) -> tuple[str, ...] | None:
    if not value:
        return None
    return tuple(t.strip() for t in value.split(",") if t.strip())


def base_option(func: Callable) -> Callable:
    return option("Model", "--base", required=True,
                  help="Base model: folder, Hub id org/name[@rev], or smollm2-135m-instruct.")(func)


def placement_options(training: bool) -> list[Callable]:
    """--device-map and --max-memory, and --offload-folder where the model is not trained (training needs every
    layer resident)."""
    if training:
        return [option("Model", "--device-map", default=None, type=click.Choice(DEVICE_MAPS),
                       help="A model larger than one GPU: spread its layers over the GPUs with accelerate (overrides "
                            "--device; every layer must fit on a GPU: training offloads nothing)."),
                option("Model", "--max-memory", default=None,
                       help="With --device-map: memory per GPU, such as 0=40GiB,1=70GiB.")]
    return [option("Model", "--device-map", default=None, type=click.Choice(DEVICE_MAPS),
                   help="A model larger than one device: spread it with accelerate (overrides --device)."),
            option("Model", "--max-memory", default=None,
                   help="With --device-map: memory per device, such as 0=20GiB,1=20GiB,cpu=60GiB; the rest is "
                        "offloaded to --offload-folder."),
            option("Model", "--offload-folder", default=None, type=click.Path(file_okay=False),
                   help="With --device-map: where layers beyond --max-memory are offloaded on disk.")]


def calibration_options(func: Callable) -> Callable:
    """Options shared by ``calibrate`` and the commands that calibrate when given no --safety."""
    s = "Calibration"
    return apply_options(func, [
        option(s, "--prompts", default="advbench-calibration", show_default=True,
               help="Calibration prompts: a built-in set (advbench-calibration) or a .csv/.jsonl/.txt file."),
        option(s, "--responses", default="self", show_default=True,
               help="self: the base model's own greedy responses; none: prompt tokens only; "
                    "given: the 'response' field of the prompts file; or a file of prompt/response pairs."),
        option(s, "--rank", default=32, show_default=True, type=int, help="r_s, the safety subspace rank."),
        option(s, "--side", default="output", show_default=True, type=click.Choice(["output", "input"]),
               help="output: keep U_s^T W x unchanged (SaLoRA); input: make the update vanish on calibration inputs."),
        option(s, "--token-policy", default=None, type=click.Choice(["response", "prompt", "last_prompt", "all"]),
               help="Token positions whose inputs count [default: response; prompt with --responses none]."),
        option(s, "--max-prompts", default=None, type=int, help="Use only the first N prompts."),
        option(s, "--batch-size", default=16, show_default=True, type=int, help="Sequences per forward pass."),
        option(s, "--generation-batch-size", default=64, show_default=True, type=int,
               help="Prompts per batch when generating the base model's responses."),
        option(s, "--max-length", default=512, show_default=True, type=int, help="Tokens per example, prompt included."),
        option(s, "--max-new-tokens", default=64, show_default=True, type=int, help="Length of self-generated responses."),
        option(s, "--chat-template", default=None,
               help="For a base model without one (GPT-2, OPT...): chatml, plain, a Jinja file, or none for the "
                    "raw prompt text [default: the model's own; raw text, with a note, when it has none]."),
        option("Model", "--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        *placement_options(training=False),
        option(s, "--energy", default=None, type=float,
               help="Keep per module the fewest directions capturing this share of the energy (--rank caps it)."),
        option(s, "--contrast-prompts", default=None,
               help="Benign or task prompts: contrastive bases, strong on the calibration prompts and weak on "
                    "these (generalized eigenproblem; output side)."),
        option(s, "--contrast-ridge", default=1e-3, show_default=True, type=float,
               help="Ridge on the contrast moment, as a share of its mean eigenvalue."),
    ])


def build_calibration(kwargs: dict, targets: tuple[str, ...] | None, keep_moments: bool = False):
    from salora_merge.calibration.run import CalibrationOptions

    return CalibrationOptions(
        prompts=kwargs["prompts"], responses=kwargs["responses"], rank=kwargs["rank"], side=kwargs["side"],
        targets=targets, token_policy=kwargs["token_policy"], max_prompts=kwargs["max_prompts"],
        batch_size=kwargs["batch_size"], generation_batch_size=kwargs["generation_batch_size"],
        max_length=kwargs["max_length"], max_new_tokens=kwargs["max_new_tokens"], device=kwargs["device"],
        keep_moments=keep_moments, energy=kwargs["energy"], contrast=kwargs["contrast_prompts"],
        contrast_ridge=kwargs["contrast_ridge"], chat_template=kwargs.get("chat_template"),
        device_map=kwargs.get("device_map"), max_memory=kwargs.get("max_memory"),
        offload_folder=kwargs.get("offload_folder"),
    )


def build_placement(kwargs: dict):
    """The placement of the model given by --device-map, --max-memory and --offload-folder (checked)."""
    from salora_merge.hf.placement import placement_of

    return placement_of(kwargs.get("device_map"), kwargs.get("max_memory"), kwargs.get("offload_folder"))


def output_options(what: str, json_help: str) -> Callable[[Callable], Callable]:
    """-o/--output (a folder), --overwrite, --allow-pickle and --json, shared by realign and merge."""
    return lambda func: apply_options(func, [
        option("Output", "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help=what),
        option("Output", "--overwrite", is_flag=True, help="Replace an existing output."),
        option("Adapters", "--allow-pickle", is_flag=True,
               help="Accept pickled adapter_model.bin files (loaded with torch.load(weights_only=True))."),
        option("Output", "--json", "as_json", is_flag=True, help=json_help),
    ])


def method_params(default: str | None = None, exclude: tuple[str, ...] = ()) -> list[click.Parameter]:
    """``--method`` (default: the registry's ``DEFAULT``, or ``default``) and every method's own options but
    ``exclude``, made from the registry (``method_<name>`` parameters). Built when the command is parsed
    (``SectionedCommand(lazy_params=...)``), so the CLI imports no registry."""
    from salora_merge.methods import DEFAULT, REGISTRY

    listing = " ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values())
    params = [SectionedOption(["--method"], section="Method", default=default or DEFAULT, show_default=True,
                              type=click.Choice(list(REGISTRY)), help=listing)]
    helps: dict[str, list[str]] = {}  # one flag per option name; methods sharing a name each say what it means
    specs = {}
    for method in REGISTRY.values():
        for spec in method.options:
            if spec.name in exclude:
                continue
            shown = f" [default: {spec.default}]" if spec.default is not None else ""
            helps.setdefault(spec.name, []).append(f"{method.name}: {spec.help}{shown}")
            specs.setdefault(spec.name, spec)
    for name, spec in specs.items():
        params.append(SectionedOption([spec.flag, f"method_{name}"], section="Method", default=None,
                                      type={int: int, float: float}.get(spec.type, str), help=" ".join(helps[name])))
    return params


def repair_params() -> list[click.Parameter]:
    """repair's ``--method`` (default: repair's default method) and the method options; ``--task-prompts`` is
    repair's own (some prompts are held out of the method)."""
    from salora_merge.repairing.run import DEFAULT_METHOD

    return method_params(DEFAULT_METHOD, exclude=("task_prompts",))


def given_method_options(method: str, kwargs: dict) -> dict:
    """The method options given on the command line; one belonging to another method is an error."""
    from salora_merge.errors import InputError
    from salora_merge.methods import REGISTRY

    given = {k[len("method_"):]: kwargs.pop(k) for k in [k for k in kwargs if k.startswith("method_")]}
    given = {k: v for k, v in given.items() if v is not None}
    own = {o.name for o in REGISTRY[method].options}
    stray = sorted(set(given) - own)
    if stray:
        owners = sorted({m.name for m in REGISTRY.values() for o in m.options if o.name in stray})
        flags = ", ".join("--" + s.replace("_", "-") for s in stray)
        raise InputError(f"{flags} belong to --method {' or '.join(owners)}, not --method {method}")
    return given


def training_options(retrain: bool) -> Callable[[Callable], Callable]:
    """Options shared by ``train`` and ``retrain``; retrain takes rank, alpha, rsLoRA and targets from the
    old adapter unless given."""
    what = " [default: the adapter's]" if retrain else ""
    t, r, o = "Training", "Run", "Output"
    return lambda func: apply_options(func, [
        option("Safety module", "--safety", default=None, type=click.Path(path_type=Path),
               help="Train under SaLoRA's fixed constraint C with this output-side safety module (from "
                    "'salora-merge calibrate'): the paper's setting. Without it, plain LoRA; in the training study "
                    "(one task, one seed) C without anchors eroded as plain LoRA did, and with them changed the "
                    "refusals within the noise, at more training time."),
        option(t, "--rank", type=int, default=None if retrain else 16, show_default=not retrain,
               help=f"LoRA rank r{what}; the exported adapter has rank 2r."),
        option(t, "--alpha", type=float, default=None if retrain else 16.0, show_default=not retrain,
               help=f"lora_alpha{what}; the scaling is alpha/r (alpha/sqrt(r) with rsLoRA)."),
        option(t, "--use-rslora/--no-rslora", default=None if retrain else False, show_default=not retrain,
               help=f"rsLoRA scaling{what}."),
        option(t, "--targets", default=None if retrain else "q_proj,v_proj", show_default=not retrain,
               help=f"Comma-separated module names or suffixes{what}."),
        option(t, "--task-rank", default=32, show_default=True, type=int,
               help="r_t: rank of the task subspace U_t for --init salora."),
        option(t, "--init", "init", default="gaussian", show_default=True,
               type=click.Choice(["salora", "pissa", "gaussian"]),
               help="gaussian: PEFT's default; salora: task-specific (the paper's; its updates are several times "
                    "larger at the same --lr: use about a fifth of a plain LoRA --lr, see docs/safety-study.md); "
                    "pissa: principal singular vectors of W."),
        option(t, "--init-samples", default=128, show_default=True, type=int,
               help="Examples whose response tokens give the task statistics for --init salora."),
        option(t, "--dropout", default=0.0, show_default=True, type=float, help="Dropout on the LoRA input."),
        option(t, "--epochs", default=1.0, show_default=True, type=float, help="Passes over the data."),
        option(t, "--max-steps", default=-1, show_default=True, type=int,
               help="Stop after N optimizer steps (> 0 overrides --epochs)."),
        option(t, "--lr", default=1e-4, show_default=True, type=float, help="Peak learning rate (AdamW, cosine decay)."),
        option(t, "--warmup-ratio", default=0.03, show_default=True, type=float, help="Share of steps in linear warmup."),
        option(t, "--batch-size", default=8, show_default=True, type=int, help="Examples per device per step."),
        option(t, "--grad-accum", default=2, show_default=True, type=int, help="Gradient accumulation steps."),
        option(t, "--max-length", default=512, show_default=True, type=int, help="Tokens per example (cut beyond)."),
        option(t, "--gradient-checkpointing", is_flag=True,
               help="Recompute activations in the backward pass (less memory)."),
        option(t, "--seed", default=0, show_default=True, type=int, help="Seed of data order, sampling and init."),
        option("Refusal anchors", "--keep-refusals/--no-keep-refusals", default=True, show_default=True,
               help="Mix refusal anchors into every batch: harmful prompts with the base model's own responses and "
                    "benign boundary prompts with its own answers (generated once per base, cached), the objective "
                    "of 'repair'. --no-keep-refusals trains on your data alone."),
        option("Refusal anchors", "--anchor-share", default=0.125, show_default=True, type=float,
               help="Share of every batch given to anchors (rounded to whole examples, at least one; below 1)."),
        option("Refusal anchors", "--anchor-prompts", default="advbench-calibration", show_default=True,
               help="Harmful prompts (file or built-in set; never an evaluation split); the first 100 are used."),
        option("Refusal anchors", "--boundary-prompts", default="benign-boundary", show_default=True,
               help="Benign prompts that sound risky, learned with the base model's answers ('none' for none); the "
                    "first 128 are used."),
        option("Refusal anchors", "--anchor-tokens", default=8, show_default=True, type=int,
               help="Learn only the first N response tokens of each anchor (the answers are generated 64 long and "
                    "cached, shared with repair; 0 learns all of them). Short anchors pad batches of short "
                    "examples less: on the training study's one task, the same refusals as all 64 at 1.14x instead of 1.83x "
                    "the time."),
        option("Refusal anchors", "--anchor-first-tokens", default=5, show_default=True, type=int,
               help="The first N response tokens of each anchor get --anchor-first-weight."),
        option("Refusal anchors", "--anchor-first-weight", default=4.0, show_default=True, type=float,
               help="Loss weight of an anchor's first response tokens (your data's tokens weigh 1)."),
        option(r, "--logging-steps", default=10, show_default=True, type=int, help="Log the loss every N steps."),
        option(r, "--save-steps", default=200, show_default=True, type=int, help="Checkpoint every N steps."),
        option(r, "--checkpoint-dir", type=click.Path(path_type=Path), default=None,
               help="Where checkpoints go [default: OUTPUT.checkpoints next to the output]."),
        option(r, "--resume", is_flag=True, help="Continue the interrupted run from its newest checkpoint."),
        option(r, "--keep-checkpoints", is_flag=True, help="Keep the checkpoint folder after success."),
        option(o, "--merge-to", type=click.Path(path_type=Path), default=None,
               help="Also merge the exported adapter into the base and write the model here."),
        option("Model", "--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        *placement_options(training=True),
        option("Safety module", "--random-control", type=int, default=None,
               help="The control: constrain against random subspaces of the safety module's sizes (this seed)."),
        option(r, "--quiet", is_flag=True, help="No progress bar or loss lines."),
        option(o, "-o", "--output", "output", required=True, type=click.Path(path_type=Path),
               help="Output adapter folder (stock PEFT LoRA)."),
        option(o, "--overwrite", is_flag=True, help="Replace an existing output (and stale checkpoints)."),
        option(o, "--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ])


def build_training(kw: dict):
    from salora_merge.training.options import KeepRefusals, TrainOptions
    from salora_merge.training.trainer import FitOptions

    fit = FitOptions(epochs=kw["epochs"], max_steps=kw["max_steps"], lr=kw["lr"], batch_size=kw["batch_size"],
                     grad_accum=kw["grad_accum"], warmup_ratio=kw["warmup_ratio"],
                     gradient_checkpointing=kw["gradient_checkpointing"], seed=kw["seed"],
                     save_steps=kw["save_steps"], logging_steps=kw["logging_steps"],
                     show_progress=not kw["quiet"] and sys.stderr.isatty())
    return TrainOptions(
        rank=kw["rank"] if kw["rank"] is not None else 16,
        alpha=kw["alpha"] if kw["alpha"] is not None else 16.0,
        use_rslora=bool(kw["use_rslora"]), targets=split_targets(kw["targets"]) or ("q_proj", "v_proj"),
        task_rank=kw["task_rank"], init=kw["init"], init_samples=kw["init_samples"], dropout=kw["dropout"],
        max_length=kw["max_length"], device=kw["device"], device_map=kw["device_map"], max_memory=kw["max_memory"],
        random_control=kw["random_control"], fit=fit,
        keep_refusals=KeepRefusals(enabled=kw["keep_refusals"], share=kw["anchor_share"],
                                   anchor_prompts=kw["anchor_prompts"], boundary_prompts=kw["boundary_prompts"],
                                   first_tokens=kw["anchor_first_tokens"], first_weight=kw["anchor_first_weight"],
                                   train_tokens=kw["anchor_tokens"] or None),
    )


def run_control(kw: dict):
    from salora_merge.training.runs import RunControl

    return RunControl(out=kw["output"], checkpoint_dir=kw["checkpoint_dir"], resume=kw["resume"],
                      keep_checkpoints=kw["keep_checkpoints"], overwrite=kw["overwrite"], merge_to=kw["merge_to"])



def retrain_data_options(func: Callable) -> Callable:
    """``retrain``'s own options: where the task comes from (data, prompts or discovery) and the held-out part."""
    d = "Data"
    return apply_options(func, [
        option(d, "--data", type=click.Path(path_type=Path), default=None,
               help="The adapter's task data (JSONL, as for train), when you have it."),
        option(d, "--prompts", default=None,
               help="Task prompts (file or built-in set): the adapter's own greedy answers become the data. "
                    "'discover': found from the adapter itself, as repair finds them (sampled user turns and the "
                    "built-in pool, the base model's refusals dropped, the most salient kept)."),
        option(d, "--discover-top", default=80, show_default=True, type=int,
               help="--prompts discover: the most salient prompts distilled (and held out)."),
        option(d, "--discover-pool", default="generic-tasks", show_default=True,
               help="--prompts discover: prompts ranked with the sampled ones ('none' for none)."),
        option(d, "--holdout", default=0.1, show_default=True, type=float,
               help="Share of examples held out for the comparison (at most --max-holdout)."),
        option(d, "--max-holdout", default=64, show_default=True, type=int, help="Most held-out examples."),
        option(d, "--max-new-tokens", default=128, show_default=True, type=int, help="Length of distilled answers."),
        option(d, "--generation-batch-size", default=32, show_default=True, type=int,
               help="Prompts per generation batch."),
        option("Adapters", "--allow-pickle", is_flag=True,
               help="Accept a pickled adapter_model.bin (weights_only=True)."),
    ])


def build_retrain(kw: dict):
    from salora_merge.training.retrain import RetrainOptions

    return RetrainOptions(data=kw["data"], prompts=kw["prompts"], discover_top=kw["discover_top"],
                          discover_pool=kw["discover_pool"], holdout=kw["holdout"], max_holdout=kw["max_holdout"],
                          max_new_tokens=kw["max_new_tokens"], generation_batch_size=kw["generation_batch_size"],
                          allow_pickle=kw["allow_pickle"])
