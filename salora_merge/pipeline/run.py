"""run: the publishing pipeline. One YAML config -> calibrate? -> realign each adapter? -> audit? -> merge -> push?

Every step writes its output under the config's ``output`` folder and records a key (sha256 of the
step's inputs' fingerprints, its options and the tool version) in ``salora_run.json``. A re-run skips a
step whose output exists with the same key, so an interrupted pipeline resumes where it stopped, and
changing an input or an option re-runs exactly the steps downstream of it. Steps are a list of
:class:`Step` values, so a gate (the audit, when it exists) is one more entry between merge and push.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from salora_merge import __version__
from salora_merge.calibration.run import CalibrationOptions
from salora_merge.errors import InputError
from salora_merge.hf.hub import is_repo_id
from salora_merge.core.merge_math import parse_size

if TYPE_CHECKING:
    from salora_merge.auditing.run import AuditOptions

__all__ = ["PipelineConfig", "Step", "load_pipeline", "plan_pipeline", "run_pipeline", "STATE_NAME"]

STATE_NAME = "salora_run.json"
_CALIBRATION_KEYS = ("prompts", "responses", "rank", "side", "token_policy", "max_prompts", "batch_size",
                     "generation_batch_size", "max_length", "max_new_tokens", "device")
_SCHEMA_TOP = {"base", "adapters", "safety", "realign", "audit", "merge", "push", "output"}
_BEHAVIOR_KEYS = ("harmful", "benign", "overrefusal", "max_prompts", "max_new_tokens", "batch_size", "device", "judge")


@dataclass(frozen=True)
class PipelineConfig:
    path: Path
    base: str
    adapters: tuple[tuple[str, float], ...]
    output: Path
    realign: bool
    safety_file: Path | None
    calibration: CalibrationOptions | None
    dtype: str
    shard_size: str
    copy_tokenizer: bool
    push: dict | None
    audit: "AuditOptions | None" = None


def _resolve_path(root: Path, value: str) -> str:
    """Paths in the config are relative to the config file; aliases and Hub ids are kept as they are."""
    candidate = Path(os.path.normpath(root / Path(value).expanduser()))
    return str(candidate) if candidate.exists() or value.startswith((".", "/", "~")) else value


def load_pipeline(path: Path) -> PipelineConfig:
    """Read and validate the config; every problem is reported at once, one per line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the pipeline config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise InputError(f"{path}: not valid YAML{where}") from None
    problems: list[str] = []

    def need(cond: Any, message: str) -> bool:
        if not cond:
            problems.append(message)
        return bool(cond)

    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping with base, adapters and output")
    for key in sorted(set(raw) - _SCHEMA_TOP):
        problems.append(f"{key}: unknown key (expected {', '.join(sorted(_SCHEMA_TOP))})")
    root = path.parent
    base = raw.get("base")
    need(isinstance(base, str) and base, "base: required, a model folder, Hub id or built-in alias")
    output = raw.get("output")
    need(isinstance(output, str) and output, "output: required, the folder every step writes into")

    adapters: list[tuple[str, float]] = []
    items = raw.get("adapters")
    if need(isinstance(items, list) and items, "adapters: required, a non-empty list"):
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"path": item}
            if not need(isinstance(item, dict), f"adapters[{i}]: expected a path or a mapping with path and weight"):
                continue
            for key in sorted(set(item) - {"path", "weight"}):
                problems.append(f"adapters[{i}].{key}: unknown key (expected path, weight)")
            ref, weight = item.get("path"), item.get("weight", 1.0)
            ok = need(isinstance(ref, str) and ref, f"adapters[{i}].path: required, a folder or Hub id")
            ok = need(isinstance(weight, (int, float)) and not isinstance(weight, bool),
                       f"adapters[{i}].weight: expected a number, got {weight!r}") and ok
            if ok:
                adapters.append((_resolve_path(root, ref), float(weight)))

    safety = raw.get("safety")
    safety_file, calibration = None, None
    if safety is not None and need(isinstance(safety, dict), "safety: expected a mapping with file or calibrate"):
        for key in sorted(set(safety) - {"file", "calibrate"}):
            problems.append(f"safety.{key}: unknown key (expected file or calibrate)")
        need(not ("file" in safety and "calibrate" in safety), "safety: give file or calibrate, not both")
        if "file" in safety:
            if need(isinstance(safety["file"], str), "safety.file: expected a path"):
                safety_file = Path(_resolve_path(root, safety["file"]))
                need(safety_file.is_file(), f"safety.file: {safety_file} not found")
        if "calibrate" in safety:
            options = safety["calibrate"] or {}
            if need(isinstance(options, dict), "safety.calibrate: expected a mapping of calibration options"):
                for key in sorted(set(options) - set(_CALIBRATION_KEYS)):
                    problems.append(f"safety.calibrate.{key}: unknown option (expected {', '.join(_CALIBRATION_KEYS)})")
                known = {k: v for k, v in options.items() if k in _CALIBRATION_KEYS}
                if isinstance(known.get("prompts"), str) and (root / known["prompts"]).exists():
                    known["prompts"] = os.path.normpath(root / known["prompts"])
                try:
                    calibration = CalibrationOptions(**known)
                    calibration.validate()
                except (TypeError, InputError) as exc:
                    problems.append(f"safety.calibrate: {exc}")
                    calibration = None
    realign = raw.get("realign", safety is not None)
    need(isinstance(realign, bool), f"realign: expected true or false, got {realign!r}")

    audit_options = None
    audit = raw.get("audit")
    if audit is not None and need(isinstance(audit, dict), "audit: expected a mapping (fail_above, fail_asr_above, behavior)"):
        from salora_merge.auditing.run import AuditOptions
        from salora_merge.auditing.behavior import BehaviorOptions

        for key in sorted(set(audit) - {"fail_above", "fail_asr_above", "behavior"}):
            problems.append(f"audit.{key}: unknown key (expected fail_above, fail_asr_above, behavior)")
        behavior = audit.get("behavior", False)
        behavior_options = None
        if behavior is True:
            behavior_options = BehaviorOptions()
        elif isinstance(behavior, dict):
            for key in sorted(set(behavior) - set(_BEHAVIOR_KEYS)):
                problems.append(f"audit.behavior.{key}: unknown key (expected {', '.join(_BEHAVIOR_KEYS)})")
            known = {k: v for k, v in behavior.items() if k in _BEHAVIOR_KEYS}
            for key in ("harmful", "benign", "overrefusal"):
                if isinstance(known.get(key), str) and (root / known[key]).is_file():
                    known[key] = os.path.normpath(root / known[key])
            try:
                behavior_options = BehaviorOptions(**known)
            except TypeError as exc:
                problems.append(f"audit.behavior: {exc}")
        elif behavior is not False:
            problems.append("audit.behavior: expected true, false or a mapping of behaviour options")
        numbers_ok = True
        for key in ("fail_above", "fail_asr_above"):
            value = audit.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                problems.append(f"audit.{key}: expected a number, got {value!r}")
                numbers_ok = False
        if numbers_ok:
            audit_options = AuditOptions(fail_above=audit.get("fail_above"), fail_asr_above=audit.get("fail_asr_above"),
                                         behavior=behavior_options)
            try:
                audit_options.validate()
            except InputError as exc:
                problems.append(f"audit: {exc}")
    if (realign is True or audit_options is not None) and safety is None:
        calibration = CalibrationOptions()  # a safety module is needed and none is given: calibrate with defaults

    merge = raw.get("merge") or {}
    dtype, shard_size, copy_tokenizer = "auto", "5GB", True
    if need(isinstance(merge, dict), "merge: expected a mapping (dtype, shard_size, copy_tokenizer)"):
        for key in sorted(set(merge) - {"dtype", "shard_size", "copy_tokenizer"}):
            problems.append(f"merge.{key}: unknown key (expected dtype, shard_size, copy_tokenizer)")
        dtype = merge.get("dtype", "auto")
        need(dtype in ("auto", "bfloat16", "float16", "float32"),
             f"merge.dtype: {dtype!r} is not one of auto, bfloat16, float16, float32")
        shard_size = str(merge.get("shard_size", "5GB"))
        try:
            parse_size(shard_size, "merge.shard_size")
        except InputError as exc:
            problems.append(str(exc))
        copy_tokenizer = merge.get("copy_tokenizer", True)
        need(isinstance(copy_tokenizer, bool), "merge.copy_tokenizer: expected true or false")

    push = raw.get("push")
    if push is not None and need(isinstance(push, dict), "push: expected a mapping with repo_id"):
        allowed = {"repo_id", "private", "revision", "create_pr", "commit_message", "endpoint"}
        for key in sorted(set(push) - allowed):
            problems.append(f"push.{key}: unknown key (expected {', '.join(sorted(allowed))})")
        need(isinstance(push.get("repo_id"), str) and is_repo_id(push["repo_id"]),
             f"push.repo_id: expected org/name, got {push.get('repo_id')!r}")
        for key in ("private", "create_pr"):
            need(isinstance(push.get(key, False), bool), f"push.{key}: expected true or false")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise InputError(f"{path}: {len(problems)} problem(s) in the pipeline config:\n{listing}")
    return PipelineConfig(
        path=path, base=_resolve_path(root, base), adapters=tuple(adapters), output=Path(os.path.normpath(root / Path(output).expanduser())),
        realign=realign, safety_file=safety_file,
        calibration=calibration if (realign or audit_options is not None) else None,
        dtype=dtype, shard_size=shard_size, copy_tokenizer=copy_tokenizer, push=push, audit=audit_options,
    )


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
    from salora_merge.io.checkpoint import open_checkpoint
    from salora_merge.io.stream import file_sha256
    from salora_merge.merging.run import AdapterInput, MergeOptions, adapter_digests, run_merge
    from salora_merge.progress import silent
    from salora_merge.publishing.push import push_folder
    from salora_merge.realignment.run import run_realign
    from salora_merge.hf.resolve import resolve_adapter, resolve_model

    progress = progress or silent
    out = config.output
    base = resolve_model(config.base)
    base_print = {"model_id": base.model_id, "fingerprint": open_checkpoint(base.folder).fingerprint()}
    adapters = [(ref, weight, adapter_digests(resolve_adapter(ref))) for ref, weight in config.adapters]
    steps: list[Step] = []

    safety_path, safety_key = config.safety_file, None
    if config.realign or config.audit is not None:
        if config.safety_file is not None:
            safety_key = file_sha256(config.safety_file)
        else:
            safety_path = out / "safety.safetensors"
            calibration = config.calibration or CalibrationOptions()
            # The safety module covers exactly the adapters' modules (what realign needs).
            from salora_merge.io.adapter import read_adapter

            targets = tuple(sorted({m for ref, _, _ in adapters for m in read_adapter(resolve_adapter(ref)).modules}))
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

    merge_inputs: list[AdapterInput] = []
    adapter_keys = []
    for index, (ref, weight, digests) in enumerate(adapters):
        if config.realign:
            target = out / "realigned" / _adapter_name(ref, index)
            key = _digest({"step": "realign", "base": base_print, "adapter": digests, "safety": safety_key,
                           "version": __version__})

            def realign_step(ref=ref, target=target) -> str:
                run_realign(config.base, ref, target, safety_path=safety_path, overwrite=True, progress=progress)
                return str(target)

            steps.append(Step(f"realign[{index}]", target, key, realign_step,
                              f"realign {ref} with {safety_path}"))
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
            from salora_merge.auditing.run import EXIT_GATE_FAILED, exit_code, run_audit
            from salora_merge.auditing.render import render_markdown
            from salora_merge.errors import GateFailed
            from salora_merge.io.atomic import atomic_output_file

            report = run_audit(config.base, [a.ref for a in merge_inputs], audit_options, safety_path=safety_path,
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
        run_merge(config.base, merge_inputs, model_dir, options, overwrite=True, progress=progress, audit=audit)
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

