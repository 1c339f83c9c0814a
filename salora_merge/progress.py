"""Progress reporting passed into pipelines (the library never prints on its own)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Protocol

__all__ = ["Progress", "silent", "tqdm_progress"]


class Progress(Protocol):
    def __call__(self, label: str, total: int) -> ContextManager[Callable[[int], None]]: ...


@contextmanager
def silent(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


@contextmanager
def tqdm_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr (plain start/end lines when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    if not interactive:
        print(f"{label} ({total}) ...", file=sys.stderr, flush=True)
    bar = tqdm(total=total, desc=label, file=sys.stderr, disable=not interactive, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
