"""Where a training run writes: its key, its checkpoint folder, resuming, and which process writes."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from salora_merge.errors import InputError
from salora_merge.io.atomic import check_output_free
from salora_merge.io.stream import file_sha256
from salora_merge.training.options import TrainOptions
from salora_merge.training.trainer import (
    last_checkpoint,
)
from salora_merge.version import __version__

RUN_NAME = "salora_train_run.json"


def _run_key(base_fingerprint: str, safety_path: Path | None, data_digest: str, options: TrainOptions) -> dict:
    return {"base_fingerprint": base_fingerprint,
            "safety_sha256": file_sha256(safety_path) if safety_path is not None else None,
            "data_sha256": data_digest, "options": options.run_key(), "tool_version": __version__}


def _resume_point(folder: Path, key: dict, resume: bool, overwrite: bool) -> Path | None:
    """Check the checkpoint folder against this run (no side effects); the checkpoint to resume from, if any."""
    run_file = folder / RUN_NAME
    if resume:
        if not run_file.is_file():
            raise InputError(f"--resume: {folder} holds no training run to resume; drop --resume")
        try:
            stored = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"--resume: {run_file} is not valid JSON ({exc}); drop --resume and pass --overwrite "
                             "to start over") from None
        for part in ("base_fingerprint", "safety_sha256", "data_sha256", "tool_version"):
            if stored.get(part) != key[part]:
                raise InputError(f"--resume: the run in {folder} used another {part.replace('_', ' ')}; "
                                 "resume with the same inputs, or drop --resume to start over")
        changed = [k for k, v in key["options"].items() if stored["options"].get(k) != v]
        if changed:
            raise InputError(f"--resume: option {changed[0]} differs from the run in {folder} "
                             f"({stored['options'].get(changed[0])!r}); resume with the same options")
        found = last_checkpoint(folder)
        if found is None:
            raise InputError(f"--resume: {folder} holds no checkpoint yet (the run stopped before its first "
                             "save); drop --resume to start over")
        return found
    if folder.exists() and not overwrite and last_checkpoint(folder) is not None:
        raise InputError(f"{folder}: checkpoints of an earlier run exist; pass --resume to continue it, "
                         "or --overwrite to start over")
    return None


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun / accelerate launch: only rank 0 writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def _start_checkpoints(folder: Path, key: dict) -> None:
    """A fresh checkpoint folder holding the run's key (replacing one without checkpoints, or with --overwrite)."""
    if not is_main_process():
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / RUN_NAME).write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class RunControl:
    """Where a training run writes and how it treats what is already there (shared by train and retrain)."""

    out: Path
    checkpoint_dir: Path | None = None  # default: OUT.checkpoints next to the output
    resume: bool = False
    keep_checkpoints: bool = False
    overwrite: bool = False
    merge_to: Path | None = None

    @property
    def checkpoints(self) -> Path:
        out = Path(self.out)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.parent / f"{out.name}.checkpoints"

    def check_outputs_free(self) -> None:
        check_output_free(Path(self.out), self.overwrite)
        if self.merge_to is not None:
            check_output_free(Path(self.merge_to), self.overwrite)
