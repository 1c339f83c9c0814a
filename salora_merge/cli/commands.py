"""The commands: parse options, call one function of :mod:`salora_merge.api`, render the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import click

from salora_merge.cli.help import SectionedCommand, option
from salora_merge.cli.options import (
    base_option,
    build_calibration,
    build_placement,
    build_retrain,
    build_training,
    calibration_options,
    given_method_options,
    method_params,
    output_options,
    repair_params,
    retrain_data_options,
    run_control,
    split_targets,
    training_options,
)
from salora_merge.cli.guard import EXIT_USER_ERROR, _friendly_errors  # noqa: F401 (exit codes)
from salora_merge.version import __version__

def _progress(quiet: bool = False):
    from salora_merge.progress import silent, tqdm_progress

    return silent if quiet else tqdm_progress


def _echo_err(quiet: bool) -> Callable[[str], None] | None:
    return None if quiet else (lambda line: click.echo(line, err=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="salora-merge")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error instead of one line.")
def main(debug: bool) -> None:
    """Keep LoRA-fine-tuned LLMs safe: compute safety modules, realign adapters."""


@main.command(cls=SectionedCommand)
@base_option
@calibration_options
@option("Calibration", "--targets", default=None,
        help="Comma-separated module names or suffixes (q_proj,v_proj) [default: every linear layer].")
@option("Calibration", "--keep-moments", is_flag=True,
        help="Also store the input second moments (large) for later re-derivation.")
@option("Output", "-o", "--output", "output", required=True, type=click.Path(path_type=Path),
        help="Safety module file to write (.safetensors).")
@option("Output", "--overwrite", is_flag=True, help="Replace an existing output.")
@option("Output", "--json", "as_json", is_flag=True, help="Print the safety module's metadata as JSON.")
@_friendly_errors
def calibrate(base: str, targets: str | None, keep_moments: bool, output: Path, overwrite: bool,
              as_json: bool, **kwargs) -> None:
    """Compute the safety module of a base model from calibration prompts."""
    from salora_merge import api

    options = build_calibration(kwargs, split_targets(targets), keep_moments)
    result = api.calibrate(base, options, output=output, overwrite=overwrite, progress=_progress())
    import salora_merge.parallel as parallel

    if not parallel.is_main():  # under torchrun, rank 0 reports
        return
    meta = dict(result.safety.metadata)
    if as_json:
        click.echo(json.dumps({"output": str(output), **meta}, indent=2))
        return
    click.echo(f"Safety module for {meta['base_model']}: {len(result.safety.bases)} modules, rank {meta['rank']}, "
               f"{meta['n_prompts']} prompts, {meta['n_tokens']} {meta['token_policy']} tokens "
               f"(generation {result.seconds_generate:.1f}s, statistics {result.seconds_forward:.1f}s)")
    if meta["chat_template"].startswith("none (the model has no"):
        click.echo(f"Note: {meta['base_model']} has no chat template, so the prompts were used as raw text; give "
                   "--chat-template chatml, plain or a Jinja file to use one (recorded in the safety module).")
    if result.capped:
        listed = ", ".join(f"{n} ({k})" for n, k in list(result.capped.items())[:4])
        more = f" and {len(result.capped) - 4} more" if len(result.capped) > 4 else ""
        click.echo(f"Note: {len(result.capped)} layers are smaller than --rank {meta['rank']} and got a basis of "
                   f"their own size: {listed}{more}")
    click.echo(f"Wrote {output}")


@main.command(cls=SectionedCommand, lazy_params=method_params)
@base_option
@option("Adapters", "--adapter", required=True, help="PEFT LoRA adapter: folder or Hub id org/name[@rev].")
@option("Safety module", "--safety", type=click.Path(path_type=Path), default=None,
        help="A safety module from 'salora-merge calibrate'; without it, methods that need one calibrate first.")
@option("Safety module", "--save-safety", type=click.Path(path_type=Path), default=None,
        help="When calibrating, also save the safety module here for reuse.")
@option("Method", "--input-safety", type=click.Path(path_type=Path), default=None,
        help="both-sides (and salora, random): the input-side module (calibrate --side input) to project lora_A with.")
@option("Method", "--aligned", default=None, help="safelora: the aligned model [default: --base].")
@option("Method", "--unaligned", default=None, help="safelora: the unaligned model the aligned one was tuned from.")
@calibration_options
@output_options("Output adapter folder.", "Print the full report as JSON.")
@_friendly_errors
def realign(base: str, adapter: str, safety: Path | None, save_safety: Path | None, method: str,
            input_safety: Path | None, aligned: str | None, unaligned: str | None, output: Path,
            overwrite: bool, allow_pickle: bool, as_json: bool, **kwargs) -> None:
    """Re-project a LoRA adapter so it cannot move the base model's safety features (or apply another method)."""
    from salora_merge import api
    from salora_merge.methods import get_method

    given = given_method_options(method, kwargs)
    calibration = None
    if "safety" in get_method(method).needs:  # with --safety: what completes a module that lacks a module's basis
        calibration = build_calibration(kwargs, None)
    report = api.realign(base, adapter, output, method=method, method_options=given, safety=safety,
                         calibration=calibration, save_safety=save_safety, input_safety=input_safety,
                         aligned=aligned, unaligned=unaligned, overwrite=overwrite, allow_pickle=allow_pickle,
                         progress=_progress(), device=kwargs["device"], placement=build_placement(kwargs))
    _report(report, as_json)


@main.command(cls=SectionedCommand, lazy_params=repair_params)
@base_option
@option("Adapters", "--adapter", required=True, help="The eroded PEFT LoRA adapter: folder or Hub id org/name[@rev].")
@option("Data", "--task-prompts", default="discover", show_default=True,
        help="Optional. Prompts of the adapter's task (file or built-in set): the adapter's own answers to them are "
             "what the repair keeps. 'discover' (no task data): refit finds them from the adapter itself "
             "(--discover-* options); other methods check agreement on the built-in generic-tasks.")
@option("Data", "--heldout-task-prompts", "heldout", default=16, show_default=True, type=int,
        help="Task prompts held out of the repair to measure agreement with the adapter (at most a quarter).")
@option("Data", "--task-check", default=None, type=str,
        help="Optional. JSONL {\"prompt\": ..., \"answer\": ...} never given to the repair: exact answers of the "
             "base, the adapter and the repaired adapter, and the share of the adapter's gain kept.")
@option("Safety module", "--safety", type=click.Path(path_type=Path), default=None,
        help="A safety module (safedelta, random, refit --constraint salora); without it, methods that need one "
             "calibrate first.")
@option("Method", "--aligned", default=None, help="resta, safelora: the aligned model [default: --base].")
@option("Method", "--unaligned", default=None,
        help="resta, safelora: the unaligned model the aligned one was tuned from.")
@calibration_options
@option("Behaviour", "--eval/--no-eval", "evaluate", default=True, show_default=True,
        help="Measure the base, the adapter and the repaired adapter on held-out prompts (the audit's evaluation).")
@option("Behaviour", "--harmful-prompts", default="harmbench-standard", show_default=True,
        help="Held-out harmful prompts: a built-in set or a file (never the anchors).")
@option("Behaviour", "--benign-prompts", default="benign-instructions", show_default=True, help="Benign prompts.")
@option("Behaviour", "--overrefusal-prompts", default="overrefusal", show_default=True,
        help="Benign but risky-sounding prompts.")
@option("Behaviour", "--max-eval-prompts", default=50, show_default=True, type=int,
        help="Use only the first N prompts of each evaluation set.")
@option("Behaviour", "--eval-new-tokens", default=32, show_default=True, type=int,
        help="Tokens generated per evaluation prompt and held-out task prompt.")
@option("Behaviour", "--judge", default="keyword", show_default=True,
        help="keyword, classifier:FOLDER or llamaguard:FOLDER.")
@output_options("Output adapter folder.", "Print the repair report as JSON.")
@_friendly_errors
def repair(base: str, adapter: str, task_prompts: str, heldout: int, task_check: str | None, safety: Path | None,
           aligned: str | None,
           unaligned: str | None, evaluate: bool, harmful_prompts: str, benign_prompts: str,
           overrefusal_prompts: str, max_eval_prompts: int, eval_new_tokens: int, judge: str, method: str,
           output: Path, overwrite: bool, allow_pickle: bool, as_json: bool, **kwargs) -> None:
    """Repair an eroded adapter so the model refuses harmful requests again while keeping its task, measured
    before and after (no data needed: a short re-fit of its own factors; retrain learns the task anew)."""
    from salora_merge import api
    from salora_merge.methods import get_method

    given = given_method_options(method, kwargs)
    calibration = None
    if safety is None and "safety" in get_method(method).needs:
        calibration = build_calibration(kwargs, None)
    behavior = api.BehaviorOptions(harmful=harmful_prompts, benign=benign_prompts, overrefusal=overrefusal_prompts,
                                   max_prompts=max_eval_prompts, max_new_tokens=eval_new_tokens,
                                   batch_size=kwargs["generation_batch_size"], device=kwargs["device"], judge=judge,
                                   device_map=kwargs.get("device_map"), max_memory=kwargs.get("max_memory"),
                                   offload_folder=kwargs.get("offload_folder"))
    options = api.RepairOptions(method=method, task_prompts=task_prompts, heldout=heldout, evaluate=evaluate,
                                behavior=behavior, task_check=task_check, chat_template=kwargs.get("chat_template"))
    report = api.repair(base, adapter, output, options, method_options=given, safety=safety,
                        calibration=calibration, aligned=aligned, unaligned=unaligned, overwrite=overwrite,
                        allow_pickle=allow_pickle, progress=_progress(), warn=_echo_err(False))
    _report(report, as_json)


def _report(report, as_json: bool) -> None:
    """realign's and repair's report, from rank 0 only under torchrun (every rank computed it)."""
    import salora_merge.parallel as parallel

    if parallel.is_main():
        click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())


@main.command(cls=SectionedCommand)
@base_option
@option("Adapters", "--adapter", "adapters", required=True, multiple=True,
        help="PEFT LoRA adapter (folder or Hub id); repeat to merge several.")
@option("Adapters", "--weight", "weights", multiple=True, type=float,
        help="Weight of each --adapter, in order (default 1 each); the merge adds sum_i w_i * dW_i.")
@option("Method", "--realign/--no-realign", default=None,
        help="Project the adapters off the safety subspace before merging "
             "[default: --realign when --safety is given, else --no-realign].")
@option("Safety module", "--safety", type=click.Path(path_type=Path), default=None,
        help="Safety module for --realign; without it, calibrate on the adapters' modules first.")
@calibration_options
@option("Merge", "--dtype", default="auto", show_default=True,
        type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
        help="Output dtype of floating tensors; auto keeps each tensor's stored dtype.")
@option("Merge", "--shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 2GiB).")
@option("Merge", "--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
        help="Copy the tokenizer files and chat template of the base.")
@output_options("Output model folder.", "Print the merge report as JSON.")
@_friendly_errors
def merge(base: str, adapters: tuple[str, ...], weights: tuple[float, ...], realign: bool | None,
          safety: Path | None, dtype: str, shard_size: str, copy_tokenizer: bool, output: Path, overwrite: bool,
          allow_pickle: bool, as_json: bool, **kwargs) -> None:
    """Merge LoRA adapters into the base weights, out of core, into a transformers checkpoint."""
    from salora_merge import api
    from salora_merge.errors import InputError

    if weights and len(weights) != len(adapters):
        raise InputError(f"--weight given {len(weights)} times for {len(adapters)} --adapter; give one per adapter")
    do_realign = (safety is not None) if realign is None else realign
    if safety is not None and not do_realign:
        raise InputError("--safety is only used with --realign; drop --no-realign or --safety")
    calibration = build_calibration(kwargs, None) if do_realign and safety is None else None
    options = api.MergeOptions(dtype=dtype, shard_size=shard_size, realign=do_realign, copy_tokenizer=copy_tokenizer)
    inputs = [api.AdapterInput(ref, weights[i] if weights else 1.0) for i, ref in enumerate(adapters)]
    report = api.merge(base, inputs, output, options, safety=safety, calibration=calibration, overwrite=overwrite,
                       allow_pickle=allow_pickle, progress=_progress())
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())


@main.command(cls=SectionedCommand)
@click.argument("folder", type=click.Path(path_type=Path))
@option("Hub", "--repo-id", required=True, help="Target repo, org/name (created if missing).")
@option("Hub", "--private", is_flag=True, help="Create the repo as private.")
@option("Hub", "--revision", default=None, help="Branch to commit to (created from main if missing).")
@option("Hub", "--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@option("Hub", "--commit-message", default=None,
        help="Commit message [default: Upload model|adapter with salora-merge].")
@option("Hub", "--endpoint", default=None, help="Hub URL [default: HF_ENDPOINT or https://huggingface.co].")
@option("Output", "--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly_errors
def push(folder: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool,
         commit_message: str | None, endpoint: str | None, as_json: bool) -> None:
    """Publish a merged model folder or an adapter folder to the Hugging Face Hub (token: HF_TOKEN or login)."""
    from salora_merge import api

    result = api.push(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                      commit_message=commit_message, endpoint=endpoint)
    if as_json:
        click.echo(json.dumps(result.__dict__, indent=2))
        return
    click.echo(f"Pushed {result.kind} folder {folder} ({result.files} files) to {result.repo_id}")
    click.echo(f"Pull request: {result.pr_url}" if result.pr_url else f"Commit: {result.commit_url}")


@main.command(cls=SectionedCommand)
@base_option
@option("Data", "--data", required=True, type=click.Path(path_type=Path),
        help="JSONL: {messages: [...]}, {instruction, input, output} or {prompt, response} records.")
@training_options(retrain=False)
@_friendly_errors
def train(base: str, data: Path, **kw) -> None:
    """Train a new LoRA adapter with refusal anchors in every batch (SaLoRA's constraint with --safety); export a
    stock PEFT LoRA for the base."""
    from salora_merge import api

    report = api.train(base, data, kw["safety"], kw["output"], build_training(kw), control=run_control(kw),
                       progress=_progress(kw["quiet"]), echo=_echo_err(kw["quiet"]))
    import salora_merge.parallel as parallel

    parallel.barrier()  # ranks finish together; the process group is destroyed at exit
    if parallel.is_main():  # under torchrun every rank trained its share; rank 0 wrote the adapter and reports
        click.echo(json.dumps(report.to_json(), indent=2) if kw["as_json"] else report.render())


@main.command(cls=SectionedCommand)
@base_option
@option("Adapters", "--adapter", required=True, help="The PEFT LoRA adapter to re-learn: folder or Hub id.")
@retrain_data_options
@training_options(retrain=True)
@_friendly_errors
def retrain(base: str, adapter: str, **kw) -> None:
    """Re-learn an adapter's task from its --data or --prompts with refusal anchors in every batch (SaLoRA's
    constraint with --safety). For an adapter with no data at all, repair (a short re-fit of its own factors) is
    the measured path; retrain --prompts discover distills it on the prompts repair's discovery finds, not yet
    measured against repair."""
    from salora_merge import api

    options = build_retrain(kw)
    inherit = {"rank": kw["rank"], "alpha": kw["alpha"], "use_rslora": kw["use_rslora"],
               "targets": split_targets(kw["targets"])}
    report = api.retrain(base, adapter, kw["safety"], kw["output"], options, training=build_training(kw),
                         inherit=inherit, control=run_control(kw), progress=_progress(kw["quiet"]),
                         echo=_echo_err(kw["quiet"]))
    import salora_merge.parallel as parallel

    parallel.barrier()  # ranks finish together; the process group is destroyed at exit
    if parallel.is_main():  # under torchrun rank 0 wrote the adapter and reports
        click.echo(json.dumps(report.to_json(), indent=2) if kw["as_json"] else report.render(kw["output"]))


@main.command(cls=SectionedCommand)
@click.argument("pipeline", type=click.Path(path_type=Path))
@option("Run", "--dry-run", is_flag=True,
        help="Validate the config and print the plan (what would run, what is up to date).")
@option("Output", "--json", "as_json", is_flag=True, help="Print one JSON record per step at the end.")
@_friendly_errors
def run(pipeline: Path, dry_run: bool, as_json: bool) -> None:
    """Run a publishing pipeline (calibrate, realign, merge, push) from a YAML config; resumable."""
    from salora_merge import api

    records = api.run(pipeline, dry_run=dry_run, echo=lambda line: click.echo(line, err=as_json),
                      progress=_progress())
    if as_json:
        click.echo(json.dumps(records, indent=2))


@main.command(cls=SectionedCommand)
@base_option
@option("Adapters", "--adapter", "adapters", required=True, multiple=True,
        help="PEFT LoRA adapter (folder or Hub id), or a folder of adapter folders; repeatable.")
@option("Safety module", "--safety", type=click.Path(path_type=Path), default=None,
        help="Safety module from 'salora-merge calibrate' (seconds); without it, calibrate first (minutes).")
@calibration_options
@option("Behaviour", "--behavior", is_flag=True, help="Also generate on harmful, benign and over-refusal prompts and judge.")
@option("Behaviour", "--harmful-prompts", default="harmbench-standard", show_default=True,
        help="Held-out harmful prompts: a built-in set or a file.")
@option("Behaviour", "--benign-prompts", default="benign-instructions", show_default=True, help="Benign prompts.")
@option("Behaviour", "--overrefusal-prompts", default="overrefusal", show_default=True,
        help="Benign but risky-sounding prompts.")
@option("Behaviour", "--max-eval-prompts", default=None, type=int, help="Use only the first N prompts of each set.")
@option("Behaviour", "--judge", default="keyword", show_default=True,
        help="keyword, classifier:FOLDER (sequence classifier) or llamaguard:FOLDER (Llama-Guard-style).")
@option("Audit", "--fail-above", type=float, default=None,
        help="Gate: fail an adapter whose whole-update rho exceeds this share (exit code 3).")
@option("Audit", "--fail-asr-above", type=float, default=None,
        help="Gate (with --behavior): fail an adapter whose attack success rate exceeds this (exit code 3).")
@option("Output", "--format", "fmt", default="table", show_default=True,
        type=click.Choice(["table", "json", "markdown", "html"]), help="Report format.")
@option("Output", "-o", "--output", "output", type=click.Path(path_type=Path), default=None,
        help="Write the report here (the table is still printed); default: print it.")
@option("Output", "--overwrite", is_flag=True, help="Replace an existing report file.")
@option("Adapters", "--allow-pickle", is_flag=True, help="Accept pickled adapter_model.bin files (weights_only=True).")
@_friendly_errors
def audit(base: str, adapters: tuple[str, ...], safety: Path | None, behavior: bool, harmful_prompts: str,
          benign_prompts: str, overrefusal_prompts: str, max_eval_prompts: int | None, judge: str,
          fail_above: float | None, fail_asr_above: float | None, fmt: str, output: Path | None, overwrite: bool,
          allow_pickle: bool, **kwargs) -> None:
    """Score adapters for safety drift (weight space, optionally behaviour); exit 3 when one fails the gate."""
    from salora_merge import api
    from salora_merge.auditing.render import render, render_table
    from salora_merge.auditing.run import exit_code
    from salora_merge.io.atomic import atomic_output_file, check_output_free

    behavior_options = None
    if behavior:
        behavior_options = api.BehaviorOptions(
            harmful=harmful_prompts, benign=benign_prompts, overrefusal=overrefusal_prompts,
            max_prompts=max_eval_prompts, max_new_tokens=kwargs["max_new_tokens"],
            batch_size=kwargs["generation_batch_size"], device=kwargs["device"], judge=judge,
            device_map=kwargs.get("device_map"), max_memory=kwargs.get("max_memory"),
            offload_folder=kwargs.get("offload_folder"))
    options = api.AuditOptions(fail_above=fail_above, fail_asr_above=fail_asr_above, behavior=behavior_options,
                               allow_pickle=allow_pickle)
    options.validate()
    calibration = build_calibration(kwargs, None)  # with --safety: completes a module that lacks a basis
    calibration.validate()
    placed = [f"--{k.replace('_', '-')}" for k in ("device_map", "max_memory", "offload_folder") if kwargs.get(k)]
    if placed and safety is not None and not behavior:
        from salora_merge.errors import InputError

        raise InputError(f"{placed[0]} places the model for calibration or --behavior, and this audit loads no model "
                         "(it has --safety and no --behavior): drop it")
    if output is not None:
        check_output_free(output, overwrite)
    report = api.audit(base, adapters, options, safety=safety, calibration=calibration, progress=_progress(),
                       warn=_echo_err(False))
    import salora_merge.parallel as parallel

    if not parallel.is_main():  # under torchrun every rank holds the whole report; rank 0 writes and prints it
        parallel.barrier()
        sys.exit(exit_code(report))
    if output is not None:
        with atomic_output_file(output, overwrite=overwrite) as tmp:
            tmp.write_text(render(report, fmt), encoding="utf-8")
        click.echo(render_table(report))
        click.echo(f"Wrote {output}")
    else:
        click.echo(render(report, fmt), nl=False)
    parallel.barrier()  # the other ranks wait for the report to be written
    sys.exit(exit_code(report))
