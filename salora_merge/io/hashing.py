"""sha256 computed on a helper thread while the caller keeps reading and writing.

``hashlib`` releases the GIL on large updates, so hashing a stream of tensors overlaps the I/O and
arithmetic of the main thread instead of adding to it. The queue is short: at most two buffers wait,
so the memory held for hashing is bounded by two tensors.
"""

from __future__ import annotations

import hashlib
import queue
import threading

__all__ = ["ThreadedSha256"]

_DONE = object()


class ThreadedSha256:
    def __init__(self, initial: bytes = b"") -> None:
        self._digest = hashlib.sha256(initial)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()
        self._result: str | None = None

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            self._digest.update(item)

    def update(self, data) -> None:
        """Queue a bytes-like object; it must not be modified until :meth:`hexdigest` returns."""
        if self._result is not None:
            raise RuntimeError("digest already finished")
        self._queue.put(data)

    def hexdigest(self) -> str:
        if self._result is None:
            self._queue.put(_DONE)
            self._thread.join()
            self._result = self._digest.hexdigest()
        return self._result

    def close(self) -> None:
        """Stop the helper thread without a result (on errors)."""
        if self._result is None:
            self._queue.put(_DONE)
            self._thread.join()
            self._result = ""
