"""``str(report)`` for every result the API returns: the short text the CLI prints (``render()``), not the
dataclass repr that lists every field."""

from __future__ import annotations

__all__ = ["Readable"]


class Readable:
    """Mixed into a report dataclass that has ``render() -> str``; ``repr()`` stays the dataclass's."""

    def __str__(self) -> str:
        return self.render()  # type: ignore[attr-defined]
