"""Write outputs to a temporary place next to the target and move them into place at the end."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from salora_merge.errors import InputError, OutputExistsError

__all__ = ["atomic_output_dir", "atomic_output_file", "check_output_free"]


def check_output_free(path: Path, overwrite: bool) -> None:
    """Fail early (before any work) if ``path`` exists and ``overwrite`` is false, or if it cannot be created:
    an existing part of its path is a file, or the nearest existing folder is not writable."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output or pass --overwrite")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{path}: {ancestor} is a file, not a folder; choose an output path under a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{path}: the folder {ancestor} is not writable; choose another output path")


def _umask_mode(mode: int) -> int:
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def _disk_error(exc: OSError, final: Path) -> InputError:
    if exc.errno == errno.ENOSPC:
        return InputError(f"no space left on the device while writing {final}; free some space and re-run")
    return InputError(f"could not write {final}: {exc.strerror or exc}")


@contextmanager
def atomic_output_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final``, on any error it is removed."""
    final = Path(final)
    check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "previous")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(exc, final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_output_file(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path in ``final``'s folder; it is renamed onto ``final`` on success."""
    final = Path(final)
    check_output_free(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _umask_mode(0o666))
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(exc, final) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
