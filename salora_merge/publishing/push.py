"""push: check a model or adapter folder and its card locally, then publish it to the Hub in one commit."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from salora_merge.errors import InputError
from salora_merge.hf import hub

__all__ = ["PushResult", "folder_kind", "check_card", "push_folder"]

_FRONT = re.compile(r"^---\s*\n(.*?)\n---\s*(\n|$)", re.S)


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    kind: str  # "model" or "adapter"
    files: int
    commit_url: str
    pr_url: str | None


def folder_kind(folder: Path) -> str:
    """``model`` (a transformers checkpoint) or ``adapter`` (a PEFT adapter); anything else is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    if (folder / "adapter_config.json").is_file():
        if not any((folder / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
            raise InputError(f"{folder}: adapter_config.json without adapter_model.safetensors; nothing to publish")
        return "adapter"
    if (folder / "config.json").is_file():
        if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
            raise InputError(f"{folder}: config.json without model.safetensors (or its index); nothing to publish")
        return "model"
    raise InputError(f"{folder}: neither a model folder (config.json + model.safetensors) nor a PEFT adapter "
                     "folder (adapter_config.json); point push at the output of merge or realign")


def check_card(folder: Path, kind: str) -> dict:
    """Validate README.md's front matter locally (before any network use) and return it."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        raise InputError(f"{card}: missing; the Hub needs a model card (merge and realign write one)")
    text = card.read_text(encoding="utf-8", errors="replace")
    match = _FRONT.match(text)
    if not match:
        raise InputError(f"{card}: no YAML front matter (--- ... --- at the top); add one with base_model and library_name")
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 2}" if line is not None else ""
        raise InputError(f"{card}: the front matter is not valid YAML{where}; fix it before publishing") from None
    if not isinstance(data, dict):
        raise InputError(f"{card}: the front matter must be a YAML mapping of fields")
    library = "peft" if kind == "adapter" else "transformers"
    if data.get("library_name") != library:
        raise InputError(f"{card}: library_name is {data.get('library_name')!r}; a {kind} folder needs "
                         f"library_name: {library}")
    base = data.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    for item in bases:
        if not isinstance(item, str) or not hub.is_repo_id(item):
            raise InputError(f"{card}: base_model {item!r} is not a Hub repo id (org/name); fix or remove it")
    for key in ("tags", "datasets"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(t, str) for t in data[key])):
            raise InputError(f"{card}: {key} must be a list of strings")
    if "license" in data and not isinstance(data["license"], str):
        raise InputError(f"{card}: license must be a string such as apache-2.0")
    return data


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    folder = Path(folder)
    if not hub.is_repo_id(repo_id):
        raise InputError(f"--repo-id {repo_id!r}: expected org/name (letters, digits, '-', '_', '.')")
    if revision is not None and (not revision or revision.startswith("/") or ".." in revision):
        raise InputError(f"--revision {revision!r}: not a branch name")
    kind = folder_kind(folder)
    check_card(folder, kind)
    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                       p.relative_to(folder).parts)]
    rerun = ["salora-merge", "push", str(folder), "--repo-id", repo_id]
    if private:
        rerun.append("--private")
    if revision:
        rerun += ["--revision", revision]
    if create_pr:
        rerun.append("--create-pr")
    if endpoint:
        rerun += ["--endpoint", endpoint]
    token = hub.saved_token()
    if not token:
        raise InputError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then re-run: "
                         + shlex.join(rerun))
    message = commit_message or f"Upload {kind} with salora-merge"
    commit_url, pr_url = hub.upload_folder(
        folder, repo_id, token, private=private, revision=revision, create_pr=create_pr,
        commit_message=message, endpoint=endpoint, rerun=shlex.join(rerun),
    )
    return PushResult(repo_id=repo_id, kind=kind, files=len(files), commit_url=commit_url, pr_url=pr_url)
