"""The ``run`` pipeline's YAML config: schema, validation (every problem at once), paths relative to the file."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from salora_merge.calibration.run import CalibrationOptions
from salora_merge.core.merge_math import parse_size
from salora_merge.errors import InputError
from salora_merge.hf.hub import is_repo_id

if TYPE_CHECKING:
    from salora_merge.auditing.run import AuditOptions
    from salora_merge.repairing.run import RepairOptions

__all__ = ["PipelineConfig", "load_pipeline"]

_PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder")  # a model larger than one device (accelerate)
_CALIBRATION_KEYS = ("prompts", "responses", "rank", "side", "token_policy", "max_prompts", "batch_size",
                     "generation_batch_size", "max_length", "max_new_tokens", "device", *_PLACEMENT_KEYS)
_SCHEMA_TOP = {"base", "adapters", "safety", "realign", "repair", "audit", "merge", "push", "output"}
_REPAIR_KEYS = ("task_prompts", "heldout_task_prompts", "evaluate", "behavior")
_BEHAVIOR_KEYS = ("harmful", "benign", "overrefusal", "max_prompts", "max_new_tokens", "batch_size", "device", "judge",
                  *_PLACEMENT_KEYS)


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
    method: str = "salora"  # the realign method (registry name)
    method_options: tuple[tuple[str, Any], ...] = ()  # its options, as given
    input_safety: Path | None = None
    aligned: str | None = None
    unaligned: str | None = None
    repair: "RepairOptions | None" = None  # a repair step instead of realign (``method`` is its method)

    @property
    def needs_safety(self) -> bool:
        """Whether a safety module is needed: for the realign or repair method, or for the audit."""
        from salora_merge.methods import get_method

        uses = self.realign or self.repair is not None
        return (uses and "safety" in get_method(self.method).needs) or self.audit is not None


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
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be a pipeline config") from None
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
    need(isinstance(output, str) and output, "output: required, the folder every step writes into" if output is None
         else f"output: expected a folder path, got {output!r}")

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
            ok = need(isinstance(weight, (int, float)) and not isinstance(weight, bool)
                      and math.isfinite(weight), f"adapters[{i}].weight: expected a finite number, got {weight!r}") and ok
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
                _placement(known, "safety.calibrate", root, problems)
                _typed(known, CalibrationOptions, "safety.calibrate", problems)
                try:
                    calibration = CalibrationOptions(**known)
                    calibration.validate()
                except (TypeError, InputError) as exc:
                    problems.append(f"safety.calibrate: {exc}")
                    calibration = None
    realign = raw.get("realign", safety is not None)
    method, method_options, method_paths = "salora", {}, {}
    if isinstance(realign, dict):
        method, method_options, method_paths = _realign_method(realign, root, problems)
        realign = True
    need(isinstance(realign, bool), f"realign: expected true, false or a mapping with method, got {realign!r}")
    repair_options = None
    if raw.get("repair") is not None:
        if realign is True and "realign" in raw:
            problems.append("repair: give realign or repair, not both (repair runs its method on each adapter)")
        elif need(isinstance(raw["repair"], dict), "repair: expected a mapping (method, task_prompts, ...)"):
            entries = dict(raw["repair"])
            own = {k: entries.pop(k) for k in _REPAIR_KEYS if k in entries}
            entries.setdefault("method", "refit")
            # repair gives the method its task prompts (some held out) at run time: checked with them here
            task = own.get("task_prompts", "discover")
            method, method_options, method_paths = _realign_method(entries, root, problems, "repair",
                                                                   implied={"task_prompts": task})
            repair_options = _repair_options(method, own, root, problems)
            realign = False
    audit_options = None
    audit = raw.get("audit")
    if audit is not None and need(isinstance(audit, dict), "audit: expected a mapping (fail_above, fail_asr_above, behavior)"):
        from salora_merge.auditing.run import AuditOptions

        for key in sorted(set(audit) - {"fail_above", "fail_asr_above", "behavior"}):
            problems.append(f"audit.{key}: unknown key (expected fail_above, fail_asr_above, behavior)")
        behavior_options = _behavior(audit.get("behavior", False), "audit.behavior", root, problems)
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
    from salora_merge.methods import REGISTRY

    needs_safety = ((realign is True or repair_options is not None) and method in REGISTRY
                    and "safety" in REGISTRY[method].needs)
    if (needs_safety or audit_options is not None) and safety is None:
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
        realign=realign, safety_file=safety_file, repair=repair_options,
        calibration=calibration if (realign or repair_options is not None or audit_options is not None) else None,
        dtype=dtype, shard_size=shard_size, copy_tokenizer=copy_tokenizer, push=push, audit=audit_options,
        method=method, method_options=tuple(sorted(method_options.items())), **method_paths,
    )


_KINDS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _typed(known: dict, cls, where: str, problems: list[str]) -> None:
    """Check each value against its option's declared type (in place: a bad one is reported, naming its key, and
    dropped): a number where a path or device is expected, or a string where a number is."""
    import dataclasses

    declared = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key in list(known):
        kinds = [k.strip() for k in declared.get(key, "").split("|")]
        allowed = tuple(t for k in kinds for t in _KINDS.get(k, ()))
        if not allowed or any(k not in _KINDS and k != "None" for k in kinds):
            continue  # a type this check does not model (tuples): left to the options' own validation
        value = known[key]
        if value is None and "None" in kinds:
            continue
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join({"bool": "true or false", "int": "a whole number", "float": "a number",
                                 "str": "a string"}[k] for k in kinds if k in _KINDS)
            problems.append(f"{where}.{key}: expected {names}, got {value!r}")
            del known[key]


def _placement(known: dict, where: str, root: Path, problems: list[str]) -> None:
    """Check the placement keys' types (in place: a bad one is reported and dropped) and resolve the offload
    folder against the config file's folder."""
    for key in _PLACEMENT_KEYS:
        if key in known and not isinstance(known[key], str):
            example = {"device_map": "auto", "max_memory": "0=20GiB,cpu=60GiB", "offload_folder": "offload"}[key]
            problems.append(f"{where}.{key}: expected a string such as {example!r}")
            del known[key]
    if "offload_folder" in known:
        known["offload_folder"] = os.path.normpath(root / Path(known["offload_folder"]).expanduser())


def _behavior(value: Any, where: str, root: Path, problems: list[str]):
    """``true`` or a mapping of behaviour options (the audit's evaluation); None when false or invalid."""
    from salora_merge.auditing.behavior import BehaviorOptions

    if value is True:
        return BehaviorOptions()
    if value is False:
        return None
    if not isinstance(value, dict):
        problems.append(f"{where}: expected true, false or a mapping of behaviour options")
        return None
    for key in sorted(set(value) - set(_BEHAVIOR_KEYS)):
        problems.append(f"{where}.{key}: unknown key (expected {', '.join(_BEHAVIOR_KEYS)})")
    known = {k: v for k, v in value.items() if k in _BEHAVIOR_KEYS}
    for key in ("harmful", "benign", "overrefusal"):
        if isinstance(known.get(key), str) and (root / known[key]).is_file():
            known[key] = os.path.normpath(root / known[key])
    _placement(known, where, root, problems)
    _typed(known, BehaviorOptions, where, problems)
    try:
        options = BehaviorOptions(**known)
        options.validate()
        return options
    except (TypeError, InputError) as exc:
        problems.append(f"{where}: {exc}")
        return None


def _repair_options(method: str, own: dict, root: Path, problems: list[str]):
    """repair's own keys (task_prompts, heldout_task_prompts, evaluate, behavior) as RepairOptions."""
    from salora_merge.repairing.run import RepairOptions

    options = RepairOptions(method=method)
    task = own.get("task_prompts", options.task_prompts)
    if not isinstance(task, str) or not task:
        problems.append(f"repair.task_prompts: expected a file or a built-in set, got {task!r}")
        task = options.task_prompts
    elif (root / task).is_file():
        task = os.path.normpath(root / task)
    heldout = own.get("heldout_task_prompts", options.heldout)
    if not isinstance(heldout, int) or isinstance(heldout, bool) or heldout < 0:
        problems.append(f"repair.heldout_task_prompts: expected a count of 0 or more, got {heldout!r}")
        heldout = options.heldout
    evaluate = own.get("evaluate", True)
    if not isinstance(evaluate, bool):
        problems.append(f"repair.evaluate: expected true or false, got {evaluate!r}")
        evaluate = True
    behavior = options.behavior
    if "behavior" in own:
        behavior = _behavior(own["behavior"], "repair.behavior", root, problems) or behavior
    return RepairOptions(method=method, task_prompts=task, heldout=heldout, evaluate=evaluate, behavior=behavior)


def _realign_method(realign: dict, root: Path, problems: list[str], where: str = "realign",
                    implied: dict | None = None) -> tuple[str, dict, dict]:
    """``realign: {method: NAME, <its options>, input_safety, aligned, unaligned}`` (or repair's), checked against
    the registry; ``implied``: options the step itself gives the method at run time (repair's task prompts),
    included in the check where the method has them, not returned."""
    from salora_merge.methods import REGISTRY

    entries = dict(realign)
    method = entries.pop("method", "salora")
    if not isinstance(method, str) or method not in REGISTRY:
        problems.append(f"{where}.method: {method!r} is not one of {', '.join(REGISTRY)}")
        return "salora", {}, {}
    chosen = REGISTRY[method]
    uses = set(chosen.needs) | set(chosen.optional)
    paths: dict = {}
    for key, need_name in (("input_safety", "input_safety"), ("aligned", "alignment"), ("unaligned", "alignment")):
        if key not in entries:
            continue
        value = entries.pop(key)
        if need_name not in uses:
            problems.append(f"{where}.{key}: method {method} does not use it")
        elif not isinstance(value, str) or not value:
            problems.append(f"{where}.{key}: expected a path or model reference, got {value!r}")
        else:
            paths[key] = Path(_resolve_path(root, value)) if key == "input_safety" else _resolve_path(root, value)
    if "input_safety" in chosen.needs and "input_safety" not in paths:
        problems.append(f"{where}.input_safety: required by method {method}")
    if "alignment" in chosen.needs and "unaligned" not in paths:
        problems.append(f"{where}.unaligned: required by method {method}")
    own = {o.name for o in chosen.options}
    try:
        chosen.resolve_options({**entries, **{k: v for k, v in (implied or {}).items() if k in own}})
    except InputError as exc:
        problems.append(f"{where}: {exc}")
    return method, entries, paths
