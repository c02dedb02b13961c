"""CoProV2 format: a CSV ``prompt,image,category`` beside an image folder.

The train CSV names images ``u_idx_<k>_<j>.jpg`` (the harmful prompt's image) and ``s_idx_<k>_<j>.jpg``
(its safe rewrite's). A pair is (harmful prompt; safe image preferred over harmful image), carrying the
safe prompt and the union of the categories on all rows of either image (rows repeat a pair once per
category). The released test CSV names images ``<k>_<j>.jpg`` and holds harmful prompts only: it has
no safe images to pair, and is read as evaluation prompts (:func:`read_test_prompts`).
"""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from data.categories import split_categories
from data.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader

log = logging.getLogger(__name__)
IMAGE_NAME = re.compile(r"^(?P<role>[us])_idx_(?P<k>\d+)_(?P<j>\d+)\.[A-Za-z0-9]+$")
TEST_IMAGE_NAME = re.compile(r"^(?P<k>\d+)_(?P<j>\d+)\.[A-Za-z0-9]+$")
COLUMNS = ("prompt", "image", "category")
Layout = Literal["train", "test"]


@dataclass
class _Side:
    prompt: str
    path: Path
    row: int
    categories: list[str] = field(default_factory=list)


def csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row, record)`` for every row of a CoProV2 CSV, rows numbered as a spreadsheet shows them (the
    header is row 1), cells stripped; refuses a file without the CoProV2 columns."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; CoProV2 format needs {list(COLUMNS)}")
        for row, record in enumerate(reader, start=2):
            yield row, {c: (record[c] or "").strip() for c in COLUMNS}


def csv_layout(path: Path) -> Layout:
    """``test`` when the first row's image is named ``<k>_<j>.<ext>`` (the released test CSV), else ``train``."""
    for _, record in csv_rows(path):
        return "test" if TEST_IMAGE_NAME.match(Path(record["image"]).name) else "train"
    raise InputError(f"{path}: no rows; CoProV2 format needs a header {list(COLUMNS)} and one row per image")


def read_test_prompts(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """The test CSV's harmful prompts, one ``(prompt, categories)`` per image ``<k>_<j>`` in file order,
    with the union of the categories of its rows. Only the names are read: the images need not exist."""
    path = Path(path).expanduser()
    prompts: dict[tuple[int, int], tuple[str, list[str]]] = {}
    for row, record in csv_rows(path):
        where = f"{path} row {row}"
        match = TEST_IMAGE_NAME.match(Path(record["image"]).name)
        if not match:
            raise InputError(f"{where}: image {record['image']!r} is not named <k>_<j>.<ext> like the first row's "
                             "(the CoProV2 test CSV's naming)")
        if not record["prompt"]:
            raise InputError(f"{where}: empty prompt")
        _, categories = prompts.setdefault((int(match["k"]), int(match["j"])), (record["prompt"], []))
        categories += [c for c in split_categories(record["category"]) if c not in categories]
    log.info("CoProV2 test CSV %s: %d harmful prompts", path, len(prompts))
    return [(text, tuple(categories)) for text, categories in prompts.values()]


class CoProV2Reader(PairReader):
    def __init__(self, path: str | Path, image_dir: str | Path | None = None) -> None:
        super().__init__(path)
        self.image_dir = Path(image_dir).expanduser() if image_dir else self.path.parent

    def read(self) -> list[PreferencePair]:
        sides: dict[tuple[int, int], dict[str, _Side]] = {}
        for row, record in csv_rows(self.path):
            where, name = f"{self.path} row {row}", record["image"]
            match = IMAGE_NAME.match(Path(name).name)
            if not match and TEST_IMAGE_NAME.match(Path(name).name):
                raise InputError(f"{where}: image {name!r} is named like the CoProV2 test CSV (<k>_<j>.<ext>: harmful "
                                 "prompts only, no safe images to pair); training needs the train CSV (u_idx_<k>_<j> "
                                 "and s_idx_<k>_<j> images); the test CSV is for evaluation (prompts=coprov2_coco)")
            if not match:
                raise InputError(f"{where}: image {name!r} is not named u_idx_<k>_<j>.<ext> or s_idx_<k>_<j>.<ext>")
            image = self.image_dir / name
            if not image.is_file():
                raise InputError(f"{where}: image file not found: {image}")
            key = (int(match["k"]), int(match["j"]))
            side = sides.setdefault(key, {}).setdefault(match["role"], _Side(record["prompt"], image, row))
            side.categories += [c for c in split_categories(record["category"]) if c not in side.categories]

        pairs = []
        for (k, j), by_role in sorted(sides.items()):
            if set(by_role) != {"u", "s"}:
                have, lacking = next(iter(by_role.values())), ({"u", "s"} - set(by_role)).pop()
                raise InputError(f"{self.path} row {have.row}: {have.path.name} has no {lacking}_idx_{k}_{j} partner row")
            harmful, safe = by_role["u"], by_role["s"]
            categories = tuple(dict.fromkeys(harmful.categories + safe.categories))
            pairs.append(PreferencePair(
                prompt=harmful.prompt, image_w=safe.path, image_l=harmful.path, safe_prompt=safe.prompt,
                categories=categories, source=f"{self.path} row {harmful.row}",
            ))
        self.stats = {"pairs": len(pairs)}
        log.info("CoProV2 %s: %d pairs", self.path, len(pairs))
        return pairs
