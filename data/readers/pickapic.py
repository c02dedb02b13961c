"""Pick-a-Pic format: ``jpg_0``, ``jpg_1`` (encoded images), ``label_0``, ``caption``.

``label_0 = 1`` prefers ``jpg_0``, ``0`` prefers ``jpg_1``, ``0.5`` is a tie (dropped and counted).
Reads parquet files (one file or a folder of them) or a ``datasets.save_to_disk`` folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import InputError
from data.pairs import PreferencePair, one_line
from data.readers.base import PairReader

log = logging.getLogger(__name__)
COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")


def label_of(value: Any, source: str) -> float:
    """``label_0`` as 0, 0.5 or 1; anything else (null, NaN, text, 0.7) is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in (0.0, 0.5, 1.0):
        raise InputError(f"{source}: label_0 must be 0, 0.5 or 1, got {value!r}")
    return float(value)


def image_bytes(value: Any, column: str, source: str) -> bytes:
    """Encoded image bytes of a cell (plain bytes or the Hugging Face ``Image`` struct's ``bytes``)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None or value == b"":
        found = "null" if value is None else "empty"
        raise InputError(f"{source}: column {column} is {found}; expected encoded image bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise InputError(f"{source}: column {column} must hold encoded image bytes, got {type(value).__name__}")
    return bytes(value)


class PickAPicReader(PairReader):
    def __init__(self, path: str | Path, split: str = "train", key: str = "data.path") -> None:
        super().__init__(path, key)
        self.split = split

    def _tables(self) -> Iterator[tuple[str, pa.Table]]:
        path = self.path
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except (OSError, ValueError, pa.ArrowException) as err:
                raise InputError(f"{path}: cannot load this datasets.save_to_disk folder ({one_line(err)})") from None
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise InputError(f"{path}: no split {self.split!r} (has {sorted(ds)}); set {self.option('split')}")
                ds = ds[self.split]
            yield str(path), ds.data.table
            return
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise InputError(f"{path}: expected parquet files or a datasets.save_to_disk folder, found neither")
        for file in files:
            try:
                schema = pq.read_schema(file)
                table = pq.read_table(file, columns=[c for c in COLUMNS if c in schema.names])
            except (pa.ArrowException, OSError) as err:
                raise InputError(f"{file}: not a readable parquet file ({one_line(err)})") from None
            yield str(file), table

    def read(self) -> list[PreferencePair]:
        pairs: list[PreferencePair] = []
        ties = 0
        for name, table in self._tables():
            missing = [c for c in COLUMNS if c not in table.column_names]
            if missing:
                raise InputError(f"{name}: missing column(s) {missing}; Pick-a-Pic format needs {list(COLUMNS)}")
            columns = {c: table.column(c).to_pylist() for c in COLUMNS}
            for row, (img0, img1, label, caption) in enumerate(zip(*(columns[c] for c in COLUMNS))):
                source = f"{name} row {row}"
                if label_of(label, source) == 0.5:
                    ties += 1
                    continue
                first, second = image_bytes(img0, "jpg_0", source), image_bytes(img1, "jpg_1", source)
                if caption is not None and not isinstance(caption, str):
                    raise InputError(f"{source}: caption must be a string, got {caption!r}")
                # a null caption is an empty one: the DataModule names it, or drops it with on_bad_sample=skip
                win, lose = (first, second) if label == 1 else (second, first)
                pairs.append(PreferencePair(prompt=caption or "", image_w=win, image_l=lose, source=source))
        self.stats = {"pairs": len(pairs), "ties_dropped": ties}
        log.info("Pick-a-Pic %s: %d pairs, %d ties dropped", self.path, len(pairs), ties)
        return pairs
