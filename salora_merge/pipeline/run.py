"""run: the publishing pipeline. One YAML config -> calibrate? -> realign or repair each adapter? -> audit? -> merge
-> push?

Every step writes its output under the config's ``output`` folder and records a key (sha256 of the
step's inputs' fingerprints, its options and the tool version) in ``salora_run.json``. A re-run skips a
step whose output exists with the same key, so an interrupted pipeline resumes where it stopped, and
changing an input or an option re-runs exactly the steps downstream of it. Steps are a list of
:class:`Step` values, so a gate (the audit) is one more entry between realign and merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from salora_merge.calibration.run import CalibrationOptions
from salora_merge.errors import InputError
from salora_merge.pipeline.config import PipelineConfig
from salora_merge.version import __version__

__all__ = ["Step", "plan_pipeline", "run_pipeline", "STATE_NAME"]

STATE_NAME = "salora_run.json"


@dataclass
class Step:
    name: str
    output: Path
    key: str
    run: Callable[[], Any]
    describe: str
    up_to_date: bool = False


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_NAME}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / STATE_NAME)


def _adapter_name(ref: str, index: int) -> str:
    stem = re.sub(r"[^\w.\-]+", "-", Path(ref.rstrip("/")).name or ref).strip("-") or "adapter"
    return f"{index:02d}-{stem}"


def plan_pipeline(config: PipelineConfig, progress=None) -> list[Step]:
    """Resolve the inputs, fingerprint them and lay out the steps (nothing is written)."""
    from salora_merge.hf.resolve import resolve_adapter, resolve_model
    from salora_merge.io.stream import file_sha256
    from salora_merge.merging.run import (
        AdapterInput,
        MergeOptions,
        adapter_digests,
        run_merge,
    )
    from salora_merge.progress import silent
    from salora_merge.publishing.push import push_folder
    from salora_merge.realignment.run import run_realign

    progress = progress or silent
    out = config.output
    base = resolve_model(config.base)
    base_print = {"model_id": base.model_id, "fingerprint": base.fingerprint}
    adapters = [(ref, weight, adapter_digests(resolve_adapter(ref))) for ref, weight in config.adapters]
    steps: list[Step] = []

    safety_path, safety_key = config.safety_file, None
    if config.needs_safety:
        if config.safety_file is not None:
            safety_key = file_sha256(config.safety_file)
        else:
            safety_path = out / "safety.safetensors"
            calibration = config.calibration or CalibrationOptions()
            # The safety module covers exactly the adapters' modules (what realign needs).
            from salora_merge.io.adapter import expand_params, read_adapter

            read = [base.bind(read_adapter(resolve_adapter(ref))) for ref, _, _ in adapters]
            targets = tuple(sorted({m for a in read for m in (*a.modules, *expand_params(a.params))}))
            options = CalibrationOptions(**{**asdict(calibration), "targets": targets})
            safety_key = _digest({"step": "calibrate", "base": base_print, "options": asdict(options),
                                  "version": __version__})

            def calibrate_step(options=options) -> str:
                from salora_merge.calibration.run import calibrate
                from salora_merge.io.safety_file import save_safety_module

                save_safety_module(calibrate(base, options, progress).safety, safety_path, overwrite=True)
                return str(safety_path)

            steps.append(Step("calibrate", safety_path, safety_key, calibrate_step,
                              f"calibrate a rank-{options.rank} {options.side}-side safety module on "
                              f"{len(targets)} modules of {config.base} from {options.prompts}"))

    from salora_merge.methods import DEFAULT, get_method

    uses_safety = "safety" in get_method(config.method).needs
    method_key = None
    if config.method != DEFAULT or config.method_options or config.input_safety or config.unaligned:
        method_key = {"method": config.method, "options": dict(config.method_options),
                      "input_safety": file_sha256(config.input_safety) if config.input_safety else None,
                      "aligned": config.aligned, "unaligned": config.unaligned}
    merge_inputs: list[AdapterInput] = []
    adapter_keys = []
    for index, (ref, weight, digests) in enumerate(adapters):
        if config.realign:
            target = out / "realigned" / _adapter_name(ref, index)
            payload = {"step": "realign", "base": base_print, "adapter": digests, "safety": safety_key,
                       "version": __version__}
            if method_key is not None:  # the default method keeps the keys of configs written before methods
                payload["method"] = method_key
            key = _digest(payload)

            def realign_step(ref=ref, target=target) -> str:
                run_realign(base, ref, target, safety_path=safety_path if uses_safety else None, overwrite=True,
                            progress=progress, method=config.method, method_options=dict(config.method_options),
                            input_safety_path=config.input_safety, aligned=config.aligned,
                            unaligned=config.unaligned)
                return str(target)

            steps.append(Step(f"realign[{index}]", target, key, realign_step,
                              f"realign {ref} with --method {config.method}"
                              + (f" and {safety_path}" if uses_safety else "")))
            merge_inputs.append(AdapterInput(str(target), weight))
            adapter_keys.append(key)
        elif config.repair is not None:
            target = out / "repaired" / _adapter_name(ref, index)
            key = _digest({"step": "repair", "base": base_print, "adapter": digests, "safety": safety_key,
                           "repair": asdict(config.repair), "method": method_key, "version": __version__})

            def repair_step(ref=ref, target=target) -> str:
                from salora_merge.repairing.run import run_repair

                run_repair(base, ref, target, config.repair, method_options=dict(config.method_options),
                           safety_path=safety_path if uses_safety else None, aligned=config.aligned,
                           unaligned=config.unaligned, overwrite=True, progress=progress)
                return str(target)

            steps.append(Step(f"repair[{index}]", target, key, repair_step,
                              f"repair {ref} with --method {config.method} (task prompts "
                              f"{config.repair.task_prompts})"))
            merge_inputs.append(AdapterInput(str(target), weight))
            adapter_keys.append(key)
        else:
            merge_inputs.append(AdapterInput(ref, weight))
            adapter_keys.append(digests)

    audit_key = None
    audit_json, audit_md = out / "audit.json", out / "audit.md"
    if config.audit is not None:
        audit_options = config.audit
        audit_key = _digest({"step": "audit", "base": base_print, "adapters": adapter_keys, "safety": safety_key,
                             "options": asdict(audit_options), "version": __version__})

        def audit_step() -> str:
            from salora_merge.auditing.render import render_markdown
            from salora_merge.auditing.run import EXIT_GATE_FAILED, exit_code, run_audit
            from salora_merge.errors import GateFailed
            from salora_merge.io.atomic import atomic_output_file

            report = run_audit(base, [a.ref for a in merge_inputs], audit_options, safety_path=safety_path,
                               progress=progress)
            for path, text in ((audit_md, render_markdown(report)), (audit_json, json.dumps(report, indent=2) + "\n")):
                with atomic_output_file(path, overwrite=True) as tmp:
                    tmp.write_text(text, encoding="utf-8")
            broken = [e for e in report["adapters"] if e["status"] == "error"]
            if broken:
                raise InputError(f"audit: {broken[0]['error']} ({len(broken)} adapter(s) could not be audited; "
                                 f"see {audit_json})")
            if exit_code(report) == EXIT_GATE_FAILED:
                failed = next(e for e in report["adapters"] if e["status"] == "fail")
                raise GateFailed(f"audit gate failed for {failed['adapter']}: {failed['reasons'][0]}; "
                                 f"nothing was merged or pushed (report: {audit_json})")
            return str(audit_json)

        steps.append(Step("audit", audit_json, audit_key, audit_step,
                          f"audit {len(merge_inputs)} adapter(s)"
                          + (" with behaviour" if audit_options.behavior else "")
                          + (f", gate rho <= {audit_options.fail_above}" if audit_options.fail_above is not None else "")))

    options = MergeOptions(dtype=config.dtype, shard_size=config.shard_size, realign=False,
                           copy_tokenizer=config.copy_tokenizer)
    model_dir = out / "model"
    merge_key = _digest({"step": "merge", "base": base_print, "adapters": adapter_keys,
                         "weights": [a.weight for a in merge_inputs], "options": asdict(options),
                         "audit": audit_key, "version": __version__})

    def merge_step() -> str:
        audit = {"markdown": audit_md.read_text(encoding="utf-8")} if audit_key else None
        run_merge(base, merge_inputs, model_dir, options, overwrite=True, progress=progress, audit=audit)
        return str(model_dir)

    steps.append(Step("merge", model_dir, merge_key, merge_step,
                      f"merge {len(merge_inputs)} adapter(s) into {config.base} ({config.dtype}, shards <= "
                      f"{config.shard_size})"))
    if config.push:
        push = dict(config.push)
        push_key = _digest({"step": "push", "model": merge_key, "push": push})

        def push_step() -> str:
            result = push_folder(model_dir, push["repo_id"], private=push.get("private", False),
                                 revision=push.get("revision"), create_pr=push.get("create_pr", False),
                                 commit_message=push.get("commit_message"), endpoint=push.get("endpoint"))
            return result.pr_url or result.commit_url

        steps.append(Step("push", out / STATE_NAME, push_key, push_step, f"push {model_dir} to {push['repo_id']}"))

    state = _read_state(out)
    for step in steps:
        record = state.get(step.name)
        step.up_to_date = bool(record) and record.get("key") == step.key and step.output.exists()
    # A step is only up to date if everything it depends on is (keys chain the inputs, so a changed
    # input already changes every downstream key; this also catches a deleted upstream output).
    stale = False
    for step in steps:
        stale = stale or not step.up_to_date
        if stale:
            step.up_to_date = False
    return steps


def run_pipeline(config: PipelineConfig, dry_run: bool = False, echo: Callable[[str], None] = print,
                 progress=None) -> list[dict]:
    """Run (or, with ``dry_run``, only describe) the steps in order; returns one record per step."""
    steps = plan_pipeline(config, progress)
    records = []
    state = _read_state(config.output)
    for number, step in enumerate(steps, start=1):
        label = f"[{number}/{len(steps)}] {step.name}"
        if step.up_to_date:
            echo(f"{label}: up to date, skipped ({step.output})")
            records.append({"step": step.name, "status": "skipped", "output": str(step.output)})
            continue
        if dry_run:
            echo(f"{label}: would {step.describe} -> {step.output}")
            records.append({"step": step.name, "status": "planned", "output": str(step.output)})
            continue
        echo(f"{label}: {step.describe} ...")
        started = time.perf_counter()
        result = step.run()
        seconds = time.perf_counter() - started
        state[step.name] = {"key": step.key, "output": str(step.output), "result": result,
                            "seconds": round(seconds, 2), "tool_version": __version__}
        _write_state(config.output, state)
        echo(f"{label}: done in {seconds:.1f}s -> {result}")
        records.append({"step": step.name, "status": "done", "output": str(step.output), "result": result})
    return records
