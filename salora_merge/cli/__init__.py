"""Command line: parse options, call one library function, render the result. No tensor code here."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable

import click

from salora_merge import __version__
from salora_merge.errors import SaloraError

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


def _calibration_options(func: Callable) -> Callable:
    """Options shared by ``calibrate`` and ``realign`` (which calibrates when given no --safety)."""
    options = [
        click.option("--prompts", default="advbench-calibration", show_default=True,
                     help="Calibration prompts: a built-in set (advbench-calibration) or a .csv/.jsonl/.txt file."),
        click.option("--responses", default="self", show_default=True,
                     help="self: the base model's own greedy responses; none: prompt tokens only; "
                          "given: the 'response' field of the prompts file; or a file of prompt/response pairs."),
        click.option("--rank", default=32, show_default=True, type=int, help="r_s, the safety subspace rank."),
        click.option("--side", default="output", show_default=True, type=click.Choice(["output", "input"]),
                     help="output: keep U_s^T W x unchanged (SaLoRA); input: make the update vanish on calibration inputs."),
        click.option("--token-policy", default=None,
                     type=click.Choice(["response", "prompt", "last_prompt", "all"]),
                     help="Token positions whose inputs count [default: response; prompt with --responses none]."),
        click.option("--max-prompts", default=None, type=int, help="Use only the first N prompts."),
        click.option("--batch-size", default=16, show_default=True, type=int, help="Sequences per forward pass."),
        click.option("--generation-batch-size", default=64, show_default=True, type=int,
                     help="Prompts per batch when generating the base model's responses."),
        click.option("--max-length", default=512, show_default=True, type=int, help="Tokens per example, prompt included."),
        click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Length of self-generated responses."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--energy", default=None, type=float,
                     help="Keep per module the fewest directions capturing this share of the energy (--rank caps it)."),
        click.option("--contrast-prompts", default=None,
                     help="Benign or task prompts: contrastive bases, strong on the calibration prompts and weak on "
                          "these (generalized eigenproblem; output side)."),
        click.option("--contrast-ridge", default=1e-3, show_default=True, type=float,
                     help="Ridge on the contrast moment, as a share of its mean eigenvalue."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _build_calibration(kwargs: dict, targets: tuple[str, ...] | None, keep_moments: bool = False):
    from salora_merge.calibration.run import CalibrationOptions

    return CalibrationOptions(
        prompts=kwargs["prompts"], responses=kwargs["responses"], rank=kwargs["rank"], side=kwargs["side"],
        targets=targets, token_policy=kwargs["token_policy"], max_prompts=kwargs["max_prompts"],
        batch_size=kwargs["batch_size"], generation_batch_size=kwargs["generation_batch_size"],
        max_length=kwargs["max_length"],
        max_new_tokens=kwargs["max_new_tokens"], device=kwargs["device"], keep_moments=keep_moments,
        energy=kwargs["energy"], contrast=kwargs["contrast_prompts"], contrast_ridge=kwargs["contrast_ridge"],
    )


def _base_option(func: Callable) -> Callable:
    return click.option("--base", required=True,
                        help="Base model: folder, Hub id org/name[@rev], or smollm2-135m-instruct.")(func)


def _output_options(what: str, json_help: str) -> Callable[[Callable], Callable]:
    """-o/--output (a folder), --overwrite, --allow-pickle and --json, shared by realign and merge."""
    options = [
        click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help=what),
        click.option("--overwrite", is_flag=True, help="Replace an existing output."),
        click.option("--allow-pickle", is_flag=True,
                     help="Accept pickled adapter_model.bin files (loaded with torch.load(weights_only=True))."),
        click.option("--json", "as_json", is_flag=True, help=json_help),
    ]

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _friendly_errors(func: Callable) -> Callable:
    """Turn library errors into one line on stderr and a non-zero exit; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SaloraError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def _split_targets(value: str | None) -> tuple[str, ...] | None:
    if not value:
        return None
    return tuple(t.strip() for t in value.split(",") if t.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="salora-merge")
def main() -> None:
    """Keep LoRA-fine-tuned LLMs safe: compute safety modules, realign adapters."""


@main.command()
@_base_option
@_calibration_options
@click.option("--targets", default=None,
              help="Comma-separated module names or suffixes (q_proj,v_proj) [default: every linear layer].")
@click.option("--keep-moments", is_flag=True, help="Also store the input second moments (large) for later re-derivation.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Safety module file to write (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the safety module's metadata as JSON.")
@_friendly_errors
def calibrate(base: str, targets: str | None, keep_moments: bool, output: Path, overwrite: bool,
              as_json: bool, **kwargs) -> None:
    """Compute the safety module of a base model from calibration prompts."""
    from salora_merge.calibration.run import calibrate as run_calibration
    from salora_merge.io.atomic import check_output_free
    from salora_merge.io.safety_file import save_safety_module
    from salora_merge.progress import tqdm_progress
    from salora_merge.hf.resolve import resolve_model

    options = _build_calibration(kwargs, _split_targets(targets), keep_moments)
    options.validate()
    check_output_free(output, overwrite)
    result = run_calibration(resolve_model(base), options, tqdm_progress)
    save_safety_module(result.safety, output, overwrite=overwrite)
    meta = dict(result.safety.metadata)
    if as_json:
        click.echo(json.dumps({"output": str(output), **meta}, indent=2))
        return
    click.echo(
        f"Safety module for {meta['base_model']}: {len(result.safety.bases)} modules, rank {meta['rank']}, "
        f"{meta['n_prompts']} prompts, {meta['n_tokens']} {meta['token_policy']} tokens "
        f"(generation {result.seconds_generate:.1f}s, statistics {result.seconds_forward:.1f}s)"
    )
    click.echo(f"Wrote {output}")


@main.command()
@_base_option
@click.option("--adapter", required=True, help="PEFT LoRA adapter: folder or Hub id org/name[@rev].")
@click.option("--safety", type=click.Path(path_type=Path), default=None,
              help="A safety module from 'salora-merge calibrate'; without it, calibrate first.")
@click.option("--save-safety", type=click.Path(path_type=Path), default=None,
              help="When calibrating, also save the safety module here for reuse.")
@click.option("--method", default="salora", show_default=True, type=click.Choice(["salora", "random", "safelora"]),
              help="salora: project off the safety subspace (--side); random: the control, a random subspace "
                   "of the same size per module (--seed); safelora: Safe LoRA (Hsu et al. 2024) with "
                   "--aligned/--unaligned.")
@click.option("--seed", default=0, show_default=True, type=int, help="random: seed of the random subspaces.")
@click.option("--input-safety", type=click.Path(path_type=Path), default=None,
              help="Also project the input side with this input-side module (calibrate --side input): both sides.")
@click.option("--aligned", default=None, help="safelora: the aligned model [default: --base].")
@click.option("--unaligned", default=None, help="safelora: the unaligned model the aligned one was tuned from.")
@click.option("--threshold", default=None, type=float,
              help="safelora: project modules whose cos(C dW, dW) is at most this [default: 0.5].")
@click.option("--top-k", default=None, type=int, help="safelora: project the K modules with the lowest cosine instead.")
@_calibration_options
@_output_options("Output adapter folder.", "Print the full report as JSON.")
@_friendly_errors
def realign(base: str, adapter: str, safety: Path | None, save_safety: Path | None, method: str, seed: int,
            input_safety: Path | None, aligned: str | None, unaligned: str | None, threshold: float | None, top_k: int | None, output: Path,
            overwrite: bool, allow_pickle: bool, as_json: bool, **kwargs) -> None:
    """Re-project a LoRA adapter so it cannot move the base model's safety features."""
    from salora_merge.errors import InputError
    from salora_merge.progress import tqdm_progress
    from salora_merge.realignment.run import run_realign
    from salora_merge.cli.render import render_realign

    if method == "safelora":
        from salora_merge.cli.render import render_safelora
        from salora_merge.methods.safelora import run_safelora

        if safety is not None or save_safety is not None or input_safety is not None:
            raise InputError("--method safelora uses --aligned/--unaligned, not a safety module; drop --safety")
        if unaligned is None:
            raise InputError("--method safelora needs --unaligned MODEL (the model the aligned one was tuned from)")
        if threshold is not None and top_k is not None:
            raise InputError("give --threshold or --top-k, not both")
        result = run_safelora(base, adapter, output, aligned, unaligned,
                              threshold=0.5 if threshold is None else threshold, top_k=top_k,
                              overwrite=overwrite, allow_pickle=allow_pickle)
        click.echo(json.dumps(result.to_json(), indent=2) if as_json else render_safelora(result))
        return
    if aligned or unaligned or threshold is not None or top_k is not None:
        raise InputError("--aligned, --unaligned, --threshold and --top-k belong to --method safelora")
    calibration = None
    if safety is None:
        calibration = _build_calibration(kwargs, None)
        calibration.validate()
    report = run_realign(base, adapter, output, safety_path=safety, calibration=calibration,
                         save_safety=save_safety, overwrite=overwrite, allow_pickle=allow_pickle,
                         progress=tqdm_progress, control_seed=seed if method == "random" else None,
                         input_safety_path=input_safety)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(render_realign(report))


@main.command()
@_base_option
@click.option("--adapter", "adapters", required=True, multiple=True,
              help="PEFT LoRA adapter (folder or Hub id); repeat to merge several.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each --adapter, in order (default 1 each); the merge adds sum_i w_i * dW_i.")
@click.option("--realign/--no-realign", default=None,
              help="Project the adapters off the safety subspace before merging "
                   "[default: --realign when --safety is given, else --no-realign].")
@click.option("--safety", type=click.Path(path_type=Path), default=None,
              help="Safety module for --realign; without it, calibrate on the adapters' modules first.")
@_calibration_options
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Output dtype of floating tensors; auto keeps each tensor's stored dtype.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 2GiB).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the tokenizer files and chat template of the base.")
@_output_options("Output model folder.", "Print the merge report as JSON.")
@_friendly_errors
def merge(base: str, adapters: tuple[str, ...], weights: tuple[float, ...], realign: bool | None,
          safety: Path | None, dtype: str, shard_size: str, copy_tokenizer: bool, output: Path, overwrite: bool,
          allow_pickle: bool, as_json: bool, **kwargs) -> None:
    """Merge LoRA adapters into the base weights, out of core, into a transformers checkpoint."""
    from salora_merge.errors import InputError
    from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge
    from salora_merge.progress import tqdm_progress
    from salora_merge.cli.render import render_merge

    if weights and len(weights) != len(adapters):
        raise InputError(f"--weight given {len(weights)} times for {len(adapters)} --adapter; give one per adapter")
    do_realign = (safety is not None) if realign is None else realign
    if safety is not None and not do_realign:
        raise InputError("--safety is only used with --realign; drop --no-realign or --safety")
    calibration = None
    if do_realign and safety is None:
        calibration = _build_calibration(kwargs, None)
        calibration.validate()
    options = MergeOptions(dtype=dtype, shard_size=shard_size, realign=do_realign, copy_tokenizer=copy_tokenizer)
    inputs = [AdapterInput(ref, weights[i] if weights else 1.0) for i, ref in enumerate(adapters)]
    report = run_merge(base, inputs, output, options, safety_path=safety, calibration=calibration,
                       overwrite=overwrite, allow_pickle=allow_pickle, progress=tqdm_progress)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(render_merge(report))


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Target repo, org/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None, help="Commit message [default: Upload model|adapter with salora-merge].")
@click.option("--endpoint", default=None, help="Hub URL [default: HF_ENDPOINT or https://huggingface.co].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly_errors
def push(folder: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool,
         commit_message: str | None, endpoint: str | None, as_json: bool) -> None:
    """Publish a merged model folder or an adapter folder to the Hugging Face Hub (token: HF_TOKEN or login)."""
    from salora_merge.publishing.push import push_folder

    result = push_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, endpoint=endpoint)
    if as_json:
        click.echo(json.dumps(result.__dict__, indent=2))
        return
    click.echo(f"Pushed {result.kind} folder {folder} ({result.files} files) to {result.repo_id}")
    click.echo(f"Pull request: {result.pr_url}" if result.pr_url else f"Commit: {result.commit_url}")


def _training_options(retrain: bool) -> Callable[[Callable], Callable]:
    """Options shared by ``train`` and ``retrain``; retrain takes rank, alpha, rsLoRA and targets from the
    old adapter unless given."""
    what = " [default: the adapter's]" if retrain else ""
    options = [
        click.option("--safety", required=True, type=click.Path(path_type=Path),
                     help="Output-side safety module from 'salora-merge calibrate' for this base."),
        click.option("--rank", type=int, default=None if retrain else 16, show_default=not retrain,
                     help=f"LoRA rank r{what}; the exported adapter has rank 2r."),
        click.option("--alpha", type=float, default=None if retrain else 16.0, show_default=not retrain,
                     help=f"lora_alpha{what}; the scaling is alpha/r (alpha/sqrt(r) with rsLoRA)."),
        click.option("--use-rslora/--no-rslora", default=None if retrain else False, show_default=not retrain,
                     help=f"rsLoRA scaling{what}."),
        click.option("--targets", default=None if retrain else "q_proj,v_proj", show_default=not retrain,
                     help=f"Comma-separated module names or suffixes{what}."),
        click.option("--task-rank", default=32, show_default=True, type=int,
                     help="r_t: rank of the task subspace U_t for --init salora."),
        click.option("--init", "init", default="gaussian", show_default=True,
                     type=click.Choice(["salora", "pissa", "gaussian"]),
                     help="gaussian: PEFT's default; salora: task-specific (the paper's; its updates are several times "
                          "larger at the same --lr: use about a fifth of a plain LoRA --lr, see docs/safety-study.md); "
                          "pissa: principal singular vectors of W."),
        click.option("--init-samples", default=128, show_default=True, type=int,
                     help="Examples whose response tokens give the task statistics for --init salora."),
        click.option("--dropout", default=0.0, show_default=True, type=float, help="Dropout on the LoRA input."),
        click.option("--epochs", default=1.0, show_default=True, type=float, help="Passes over the data."),
        click.option("--max-steps", default=-1, show_default=True, type=int, help="Stop after N optimizer steps (> 0 overrides --epochs)."),
        click.option("--lr", default=1e-4, show_default=True, type=float, help="Peak learning rate (AdamW, cosine decay)."),
        click.option("--warmup-ratio", default=0.03, show_default=True, type=float, help="Share of steps in linear warmup."),
        click.option("--batch-size", default=8, show_default=True, type=int, help="Examples per device per step."),
        click.option("--grad-accum", default=2, show_default=True, type=int, help="Gradient accumulation steps."),
        click.option("--max-length", default=512, show_default=True, type=int, help="Tokens per example (cut beyond)."),
        click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass (less memory)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of data order, sampling and init."),
        click.option("--logging-steps", default=10, show_default=True, type=int, help="Log the loss every N steps."),
        click.option("--save-steps", default=200, show_default=True, type=int, help="Checkpoint every N steps."),
        click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None,
                     help="Where checkpoints go [default: OUTPUT.checkpoints next to the output]."),
        click.option("--resume", is_flag=True, help="Continue the interrupted run from its newest checkpoint."),
        click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoint folder after success."),
        click.option("--merge-to", type=click.Path(path_type=Path), default=None,
                     help="Also merge the exported adapter into the base and write the model here."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--random-control", type=int, default=None,
                     help="The control: constrain against random subspaces of the safety module's sizes (this seed)."),
        click.option("--quiet", is_flag=True, help="No progress bar or loss lines."),
        click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
                     help="Output adapter folder (stock PEFT LoRA)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output (and stale checkpoints)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _build_training(kw: dict):
    from salora_merge.training.train import TrainOptions
    from salora_merge.training.trainer import FitOptions

    fit = FitOptions(epochs=kw["epochs"], max_steps=kw["max_steps"], lr=kw["lr"], batch_size=kw["batch_size"],
                     grad_accum=kw["grad_accum"], warmup_ratio=kw["warmup_ratio"],
                     gradient_checkpointing=kw["gradient_checkpointing"], seed=kw["seed"],
                     save_steps=kw["save_steps"], logging_steps=kw["logging_steps"], show_progress=not kw["quiet"] and sys.stderr.isatty())
    return TrainOptions(
        rank=kw["rank"] if kw["rank"] is not None else 16,
        alpha=kw["alpha"] if kw["alpha"] is not None else 16.0,
        use_rslora=bool(kw["use_rslora"]), targets=_split_targets(kw["targets"]) or ("q_proj", "v_proj"),
        task_rank=kw["task_rank"], init=kw["init"], init_samples=kw["init_samples"], dropout=kw["dropout"],
        max_length=kw["max_length"], device=kw["device"], random_control=kw["random_control"], fit=fit,
    )


def _run_control(kw: dict):
    from salora_merge.training.train import RunControl

    return RunControl(out=kw["output"], checkpoint_dir=kw["checkpoint_dir"], resume=kw["resume"],
                      keep_checkpoints=kw["keep_checkpoints"], overwrite=kw["overwrite"], merge_to=kw["merge_to"])


def _progress(quiet: bool):
    from salora_merge.progress import silent, tqdm_progress

    return silent if quiet else tqdm_progress


def _echo_err(quiet: bool) -> Callable[[str], None] | None:
    return None if quiet else (lambda line: click.echo(line, err=True))


@main.command()
@_base_option
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="JSONL: {messages: [...]}, {instruction, input, output} or {prompt, response} records.")
@_training_options(retrain=False)
@_friendly_errors
def train(base: str, data: Path, **kw) -> None:
    """Train a new adapter the SaLoRA way and export it as a stock PEFT LoRA (rank 2r) for the untouched base."""
    from salora_merge.cli.render import render_train
    from salora_merge.training.train import run_train
    from salora_merge.training.data import conversations_digest, load_conversations

    options = _build_training(kw)
    options.validate()
    conversations = load_conversations(data)
    report = run_train(base, conversations, str(data), conversations_digest(conversations), kw["safety"], options,
                       _run_control(kw), progress=_progress(kw["quiet"]), echo=_echo_err(kw["quiet"]))
    click.echo(json.dumps(report.to_json(), indent=2) if kw["as_json"] else render_train(report))


@main.command()
@_base_option
@click.option("--adapter", required=True, help="The PEFT LoRA adapter to re-learn: folder or Hub id.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The adapter's task data (JSONL, as for train), when you have it.")
@click.option("--prompts", default=None,
              help="Task prompts (file or built-in set): the adapter's own greedy answers become the data.")
@click.option("--holdout", default=0.1, show_default=True, type=float,
              help="Share of examples held out for the comparison (at most --max-holdout).")
@click.option("--max-holdout", default=64, show_default=True, type=int, help="Most held-out examples.")
@click.option("--max-new-tokens", default=128, show_default=True, type=int, help="Length of distilled answers.")
@click.option("--generation-batch-size", default=32, show_default=True, type=int, help="Prompts per generation batch.")
@click.option("--allow-pickle", is_flag=True, help="Accept a pickled adapter_model.bin (weights_only=True).")
@_training_options(retrain=True)
@_friendly_errors
def retrain(base: str, adapter: str, data: Path | None, prompts: str | None, holdout: float, max_holdout: int,
            max_new_tokens: int, generation_batch_size: int, allow_pickle: bool, **kw) -> None:
    """Re-learn an existing adapter's task under the safety module (SaLoRA), from its data or by distillation."""
    from salora_merge.cli.render import render_retrain
    from salora_merge.training.retrain import RetrainOptions, defaults_from_adapter, run_retrain

    retrain_options = RetrainOptions(data=data, prompts=prompts, holdout=holdout, max_holdout=max_holdout,
                                     max_new_tokens=max_new_tokens, generation_batch_size=generation_batch_size,
                                     allow_pickle=allow_pickle)
    retrain_options.validate()
    given = {"rank": kw["rank"], "alpha": kw["alpha"], "use_rslora": kw["use_rslora"],
             "targets": _split_targets(kw["targets"])}
    options = defaults_from_adapter(adapter, _build_training(kw), given, allow_pickle)
    options.validate()
    report = run_retrain(base, adapter, kw["safety"], retrain_options, options, _run_control(kw),
                         progress=_progress(kw["quiet"]), echo=_echo_err(kw["quiet"]))
    click.echo(json.dumps(report.to_json(), indent=2) if kw["as_json"] else render_retrain(report, kw["output"]))


@main.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate the config and print the plan (what would run, what is up to date).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per step at the end.")
@_friendly_errors
def run(pipeline: Path, dry_run: bool, as_json: bool) -> None:
    """Run a publishing pipeline (calibrate, realign, merge, push) from a YAML config; resumable."""
    from salora_merge.pipeline.run import load_pipeline, run_pipeline
    from salora_merge.progress import tqdm_progress

    config = load_pipeline(pipeline)
    records = run_pipeline(config, dry_run=dry_run, echo=lambda line: click.echo(line, err=as_json),
                           progress=tqdm_progress)
    if as_json:
        click.echo(json.dumps(records, indent=2))


@main.command()
@_base_option
@click.option("--adapter", "adapters", required=True, multiple=True,
              help="PEFT LoRA adapter (folder or Hub id), or a folder of adapter folders; repeatable.")
@click.option("--safety", type=click.Path(path_type=Path), default=None,
              help="Safety module from 'salora-merge calibrate' (seconds); without it, calibrate first (minutes).")
@_calibration_options
@click.option("--behavior", is_flag=True, help="Also generate on harmful, benign and over-refusal prompts and judge.")
@click.option("--harmful-prompts", default="harmbench-standard", show_default=True,
              help="Held-out harmful prompts: a built-in set or a file.")
@click.option("--benign-prompts", default="benign-instructions", show_default=True, help="Benign prompts.")
@click.option("--overrefusal-prompts", default="overrefusal", show_default=True,
              help="Benign but risky-sounding prompts.")
@click.option("--max-eval-prompts", default=None, type=int, help="Use only the first N prompts of each set.")
@click.option("--judge", default="keyword", show_default=True,
              help="keyword, classifier:FOLDER (sequence classifier) or llamaguard:FOLDER (Llama-Guard-style).")
@click.option("--fail-above", type=float, default=None,
              help="Gate: fail an adapter whose whole-update rho exceeds this share (exit code 3).")
@click.option("--fail-asr-above", type=float, default=None,
              help="Gate (with --behavior): fail an adapter whose attack success rate exceeds this (exit code 3).")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "json", "markdown", "html"]), help="Report format.")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="Write the report here (the table is still printed); default: print it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report file.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled adapter_model.bin files (weights_only=True).")
@_friendly_errors
def audit(base: str, adapters: tuple[str, ...], safety: Path | None, behavior: bool, harmful_prompts: str,
          benign_prompts: str, overrefusal_prompts: str, max_eval_prompts: int | None, judge: str,
          fail_above: float | None, fail_asr_above: float | None, fmt: str, output: Path | None, overwrite: bool,
          allow_pickle: bool, **kwargs) -> None:
    """Score adapters for safety drift (weight space, optionally behaviour); exit 3 when one fails the gate."""
    from salora_merge.auditing.run import AuditOptions, exit_code, run_audit
    from salora_merge.auditing.render import render, render_table
    from salora_merge.auditing.behavior import BehaviorOptions
    from salora_merge.io.atomic import atomic_output_file, check_output_free
    from salora_merge.progress import tqdm_progress

    behavior_options = None
    if behavior:
        behavior_options = BehaviorOptions(
            harmful=harmful_prompts, benign=benign_prompts, overrefusal=overrefusal_prompts,
            max_prompts=max_eval_prompts, max_new_tokens=kwargs["max_new_tokens"],
            batch_size=kwargs["generation_batch_size"], device=kwargs["device"], judge=judge)
    options = AuditOptions(fail_above=fail_above, fail_asr_above=fail_asr_above, behavior=behavior_options,
                           allow_pickle=allow_pickle)
    options.validate()
    calibration = None
    if safety is None:
        calibration = _build_calibration(kwargs, None)
        calibration.validate()
    if output is not None:
        check_output_free(output, overwrite)
    report = run_audit(base, adapters, options, safety_path=safety, calibration=calibration, progress=tqdm_progress)
    if output is not None:
        with atomic_output_file(output, overwrite=overwrite) as tmp:
            tmp.write_text(render(report, fmt), encoding="utf-8")
        click.echo(render_table(report))
        click.echo(f"Wrote {output}")
    else:
        click.echo(render(report, fmt), nl=False)
    sys.exit(exit_code(report))


if __name__ == "__main__":
    main()
