"""Prompt sets for calibration and evaluation: built-in sets, CSV, JSONL, or one prompt per line."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from salora_merge.errors import InputError

__all__ = ["PromptSet", "BUILTIN_SETS", "load_prompt_set"]

BUILTIN_SETS = {
    "advbench-calibration": "advbench_calibration.jsonl",
    "advbench-heldout": "advbench_heldout.jsonl",
    "harmbench-standard": "harmbench_standard_test.jsonl",
    "overrefusal": "overrefusal_benign_edgy.jsonl",
    "benign-instructions": "benign_instructions.jsonl",
    "generic-tasks": "generic_tasks.jsonl",
    "benign-boundary": "benign_boundary.jsonl",
    "benign-boundary-wide": "benign_boundary_wide.jsonl",
    "benign-eval": "benign_eval.jsonl",  # evaluation only: disjoint from every other set and the studies' data
    "harmful-eval": "harmful_eval.jsonl",  # evaluation only: harmful requests written apart from AdvBench/HarmBench
}
_PROMPT_FIELDS = ("prompt", "goal", "behavior", "instruction", "question", "text")
_RESPONSE_FIELDS = ("response", "output", "completion", "answer")


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    responses: tuple[str, ...] | None = None  # aligned with prompts when the file gives them

    def digest(self) -> str:
        """sha256 of the prompts (and responses), independent of file format."""
        payload = json.dumps({"prompts": self.prompts, "responses": self.responses}, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def head(self, n: int | None) -> "PromptSet":
        if n is None or n >= len(self.prompts):
            return self
        responses = self.responses[:n] if self.responses is not None else None
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n], responses)


def _pick(record: dict, fields: tuple[str, ...]) -> str | None:
    for key in fields:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _records_jsonl(text: str, source: str) -> list[tuple[str, str | None]]:
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
        if isinstance(item, str):
            out.append((item.strip(), None))
            continue
        prompt = _pick(item, _PROMPT_FIELDS) if isinstance(item, dict) else None
        if prompt is None:
            raise InputError(f"{source}:{number}: expected an object with a 'prompt' field (or a JSON string)")
        out.append((prompt, _pick(item, _RESPONSE_FIELDS)))
    return out


def _records_csv(text: str, source: str) -> list[tuple[str, str | None]]:
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if not any(c in _PROMPT_FIELDS for c in columns):
        raise InputError(
            f"{source}: no prompt column; expected one of {', '.join(_PROMPT_FIELDS)} in the header, got {columns}"
        )
    out = []
    for row in reader:
        record = {(k or "").strip().lower(): v for k, v in row.items()}
        prompt = _pick(record, _PROMPT_FIELDS)
        if prompt:
            out.append((prompt, _pick(record, _RESPONSE_FIELDS)))
    return out


def load_prompt_set(spec: str) -> PromptSet:
    """A built-in set name, or a ``.csv``, ``.jsonl`` or text file (one prompt per line)."""
    if spec in BUILTIN_SETS:
        text = resources.files("salora_merge.data").joinpath(BUILTIN_SETS[spec]).read_text("utf-8")
        records = _records_jsonl(text, spec)
        name = spec
    else:
        path = Path(spec)
        if not path.is_file():
            known = ", ".join(BUILTIN_SETS)
            raise InputError(f"prompts {spec!r}: no such file and not a built-in set ({known})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            records = _records_jsonl(text, str(path))
        elif suffix == ".csv":
            records = _records_csv(text, str(path))
        else:
            records = [(line.strip(), None) for line in text.splitlines() if line.strip()]
        name = path.name
    if not records:
        raise InputError(f"prompts {spec!r}: the file holds no prompts")
    prompts = tuple(p for p, _ in records)
    given = [r for _, r in records]
    if all(r is not None for r in given):
        responses: tuple[str, ...] | None = tuple(given)  # type: ignore[arg-type]
    elif any(r is not None for r in given):
        missing = next(i for i, r in enumerate(given) if r is None)
        raise InputError(f"prompts {spec!r}: record {missing + 1} has no response while others do")
    else:
        responses = None
    return PromptSet(name=name, prompts=prompts, responses=responses)
