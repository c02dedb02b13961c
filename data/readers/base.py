"""The reader interface: a data source turned into :class:`PreferencePair` records; and the checks readers
share, each failing with one line naming the file and row: paths that name readable files, UTF-8 text,
CSV headers and rows, JSONL lines, category cells, image paths that stay inside the dataset's folder."""
from __future__ import annotations

import csv
import errno
import io
import itertools
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from huggingface_hub.constants import HF_HUB_CACHE

from common.errors import InputError
from data.categories import split_categories
from data.pairs import PreferencePair

Want = Literal["file", "dir", "any"]
OUTSIDE_HINT = "data.allow_outside_paths=true allows this for data you trust"


def path_problem(path: Path, want: Want = "any") -> str | None:
    """Why ``path`` cannot be read as a ``want`` (``does not exist``, ``is a symlink loop``, ``is a directory``,
    ``is not readable (permission denied)``, ...), or ``None`` when it can."""
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop"
        if err.errno == errno.EACCES:
            return "is not readable (permission denied on a folder above it)"
        if os.path.islink(path):
            return f"is a broken symlink (to {os.readlink(path)})"
        if err.errno == errno.ENOTDIR:
            return "does not exist (a folder in the path is a file)"
        return "does not exist"
    if want == "file" and stat.S_ISDIR(info.st_mode):
        return "is a directory, expected a file"
    if want == "dir" and not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        return "is not a regular file (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return "is not readable (permission denied)"
    return None


class PairReader:
    """Subclasses implement :meth:`read`; ``stats`` collects counts worth logging (dropped ties, ...).

    ``key`` is the config key that gave ``path`` (``data.path``; a nested reader's own, e.g.
    ``data.reader.harmful.path``), named in errors about it and, via :meth:`option`, about its other keys.
    """

    def __init__(self, path: str | Path, key: str = "data.path") -> None:
        self.key = key
        if path in (None, "", "???"):
            raise InputError(f"{key}: expected a path for {type(self).__name__}, got none (set {key}=...)")
        self.path = Path(path).expanduser()
        problem = path_problem(self.path)
        if problem:
            raise InputError(f"{key}={self.path}: {problem}")
        self.stats: dict[str, int] = {}

    def option(self, name: str) -> str:
        """The config key of this reader's option ``name``: ``data.reader.<name>``, or beside a nested reader's path."""
        return f"data.reader.{name}" if self.key == "data.path" else f"{self.key.rpartition('.')[0]}.{name}"

    def require_file(self, what: str) -> None:
        """Refuse a ``path`` that is not a file (a directory), saying that ``what`` is expected."""
        problem = path_problem(self.path, "file")
        if problem:
            raise InputError(f"{self.key}={self.path}: {problem}; expected {what}")

    def read(self) -> list[PreferencePair]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def read_utf8(file: Path) -> str:
    """The text of a UTF-8 file; a byte-order mark (Excel's "CSV UTF-8") is dropped. Any other encoding is
    refused naming the line of the first byte that is not UTF-8."""
    problem = path_problem(file, "file")
    if problem:
        raise InputError(f"{file}: {problem}")
    data = file.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{file}: the file is UTF-16; expected UTF-8 (e.g. Excel's 'CSV UTF-8')")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{file} line {line}: byte 0x{data[err.start]:02x} is not UTF-8; the file must be UTF-8 "
                         "(e.g. Excel's 'CSV UTF-8', not latin-1 or Windows-1252)") from None


def csv_records(file: Path, columns: Sequence[str], what: str) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row, record)`` for every non-blank row of a UTF-8 CSV that has ``columns`` (and maybe others), rows
    numbered as a spreadsheet shows them (the header is row 1), header names and cells stripped, missing
    trailing cells empty. ``what`` names the format in errors: an empty file, a header without ``columns``
    or naming a column twice, a row with more cells than the header, a quote never closed, no rows."""
    reader = csv.reader(io.StringIO(read_utf8(file), newline=""), strict=True)
    line, rows = 1, 0
    try:
        header = [name.strip() for name in next(reader, [])]
        if not any(header):
            raise InputError(f"{file}: empty file; {what} needs a header with columns {list(columns)}")
        twice = next((name for name in header if name and header.count(name) > 1), None)
        if twice is not None:
            raise InputError(f"{file}: column {twice!r} appears {header.count(twice)} times in the header; "
                             "each column must be named once")
        missing = [c for c in columns if c not in header]
        if missing:
            raise InputError(f"{file}: missing column(s) {missing}; {what} needs {list(columns)}, the header has {header}")
        for row in itertools.count(2):
            line = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                break
            if not any(cell.strip() for cell in cells):
                continue
            if any(cell.strip() for cell in cells[len(header):]):
                raise InputError(f"{file} row {row}: {len(cells)} cells, the header has {len(header)} "
                                 "(a comma in an unquoted cell? quote it)")
            rows += 1
            cells = cells + [""] * (len(header) - len(cells))
            yield row, {name: cell.strip() for name, cell in zip(header, cells) if name}
    except csv.Error as err:
        raise InputError(f"{file} line {line}: not valid CSV ({err}); a quote in the row starting here is not closed, "
                         'or a quote inside a quoted cell is not doubled ("")') from None
    if not rows:
        raise InputError(f"{file}: no rows; {what} needs a header {list(columns)} and at least one row")


def jsonl_records(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every non-blank line of a JSONL file, ``where`` naming file and line for errors."""
    for line_no, line in enumerate(read_utf8(file).splitlines(), start=1):
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


def categories_of(value: Any, where: str, key: str = "categories") -> tuple[str, ...]:
    """A categories cell (``None``, ``"hate, violence"`` or a list of names) as normalized names; refuses
    other types and entries that hold no name (``"???"``)."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        raise InputError(f"{where}: {key} must be a list of names or a comma-separated string, got {value!r}")
    names = split_categories(",".join(parts))
    if "" in names:
        raise InputError(f"{where}: {key} {value!r} holds an entry without a name (letters or digits)")
    return tuple(dict.fromkeys(names))


def outside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies outside the folder ``root`` once symlinks (of either) are resolved; a symlink loop
    is left to the file checks, which name it. A dataset downloaded with huggingface_hub keeps its files as
    symlinks into the hub cache's ``blobs/``: a path inside ``root`` whose link leads there stays inside."""
    try:
        resolved = path.resolve()
        if resolved.is_relative_to(root.resolve()):
            return False
        inside_as_written = Path(os.path.normpath(path)).is_relative_to(os.path.normpath(root))
        return not (inside_as_written and resolved.is_relative_to(Path(HF_HUB_CACHE).expanduser().resolve()))
    except (OSError, RuntimeError):
        return False


def image_file(root: Path, value: Any, key: str, where: str, allow_outside: bool = False) -> Path:
    """An image path of a record, relative to ``root``, that must name a readable file inside ``root``
    (``..``, absolute paths and symlinks leading out are refused unless ``allow_outside``)."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: key {key!r} must be an image path (relative to {root}), got {value!r}")
    image = root / value
    if not allow_outside and outside(image, root):
        raise InputError(f"{where}: {key} {value!r} leads outside the dataset's folder {root} ({OUTSIDE_HINT})")
    problem = path_problem(image, "file")
    if problem == "does not exist":
        raise InputError(f"{where}: image file not found: {image}")
    if problem:
        raise InputError(f"{where}: image file {image} {problem}")
    return image
