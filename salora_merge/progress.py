"""Progress reporting passed into pipelines (the library never prints on its own)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Protocol

__all__ = ["Progress", "silent", "tqdm_progress"]


class Progress(Protocol):
    def __call__(self, label: str, total: int) -> ContextManager[Callable[[int], None]]: ...


@contextmanager
def silent(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


LOG_EVERY_S = 30.0  # without a terminal: a progress line at most this often


@contextmanager
def tqdm_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr; when stderr is not a terminal (a log, CI, make's pipe), plain lines instead: the
    start, ``done/total`` with the elapsed time and an estimate of what is left at most every
    :data:`LOG_EVERY_S` seconds, and the end with its time."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
        try:
            yield bar.update
        finally:
            bar.close()
        return
    log = _LineLog(label, total)
    print(f"{label} ({total}) ...", file=sys.stderr, flush=True)
    yield log.update
    log.finish()


class _LineLog:
    def __init__(self, label: str, total: int, every: float | None = None, clock=time.monotonic):
        self.label, self.total, self.every, self.clock = label, total, LOG_EVERY_S if every is None else every, clock
        self.done, self.started = 0, clock()
        self.last = self.started

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            spent = now - self.started
            left = spent / self.done * (self.total - self.done) if self.done else float("nan")
            print(f"  {self.label}: {self.done}/{self.total}, {_clock(spent)} so far, about {_clock(left)} left",
                  file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.clock() - self.started >= self.every:  # short steps need no second line
            print(f"  {self.label}: done in {_clock(self.clock() - self.started)}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
