"""The reader interface: a data source turned into :class:`PreferencePair` records."""
from __future__ import annotations

from pathlib import Path

from data.errors import InputError
from data.pairs import PreferencePair


class PairReader:
    """Subclasses implement :meth:`read`; ``stats`` collects counts worth logging (dropped ties, ...)."""

    def __init__(self, path: str | Path) -> None:
        if path in (None, "", "???"):
            raise InputError(f"data.reader.path: expected a path for {type(self).__name__}, got none (set data.path=...)")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise InputError(f"data.path={self.path}: no such file or directory")
        self.stats: dict[str, int] = {}

    def read(self) -> list[PreferencePair]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"
