"""The reader interface: a data source turned into :class:`PreferencePair` records."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

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


def jsonl_records(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every non-blank line of a JSONL file, ``where`` naming file and line for errors."""
    for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file} line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object")
        yield where, record


def image_file(root: Path, value: Any, key: str, where: str) -> Path:
    """An image path of a record, relative to ``root``, that must name an existing file."""
    if not isinstance(value, str):
        raise InputError(f"{where}: key {key!r} must be an image path (relative to {root})")
    image = root / value
    if not image.is_file():
        raise InputError(f"{where}: image file not found: {image}")
    return image
