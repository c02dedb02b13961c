"""Pick-a-Pic format: ``jpg_0``, ``jpg_1`` (encoded images), ``label_0``, ``caption``.

``label_0 = 1`` prefers ``jpg_0``, ``0`` prefers ``jpg_1``, ``0.5`` is a tie (dropped and counted).
Reads parquet files (one file or a folder of them) or a ``datasets.save_to_disk`` folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader

log = logging.getLogger(__name__)
COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")


class PickAPicReader(PairReader):
    def __init__(self, path: str | Path, split: str = "train") -> None:
        super().__init__(path)
        self.split = split

    def _tables(self) -> Iterator[tuple[str, pa.Table]]:
        path = self.path
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise InputError(f"{path}: no split {self.split!r} (has {sorted(ds)}); set data.reader.split")
                ds = ds[self.split]
            yield str(path), ds.data.table
            return
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise InputError(f"{path}: expected parquet files or a datasets.save_to_disk folder, found neither")
        for file in files:
            try:
                schema = pq.read_schema(file)
            except (pa.ArrowInvalid, OSError) as err:
                raise InputError(f"{file}: not a readable parquet file ({err})") from None
            yield str(file), pq.read_table(file, columns=[c for c in COLUMNS if c in schema.names])

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
                if label is None or float(label) not in (0.0, 0.5, 1.0):
                    raise InputError(f"{source}: label_0 must be 0, 0.5 or 1, got {label!r}")
                if float(label) == 0.5:
                    ties += 1
                    continue
                for col, img in (("jpg_0", img0), ("jpg_1", img1)):
                    if not isinstance(img, (bytes, bytearray)) or not img:
                        raise InputError(f"{source}: column {col} must hold encoded image bytes, got {type(img).__name__}")
                if not isinstance(caption, str):
                    raise InputError(f"{source}: caption must be a string, got {caption!r}")
                win, lose = (img0, img1) if float(label) == 1.0 else (img1, img0)
                pairs.append(PreferencePair(prompt=caption, image_w=bytes(win), image_l=bytes(lose), source=source))
        self.stats = {"pairs": len(pairs), "ties_dropped": ties}
        log.info("Pick-a-Pic %s: %d pairs, %d ties dropped", self.path, len(pairs), ties)
        return pairs
