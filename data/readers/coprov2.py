"""CoProV2 format: a CSV ``prompt,image,category`` beside an image folder.

The train CSV names images ``u_idx_<k>_<j>.jpg`` (the harmful prompt's image) and ``s_idx_<k>_<j>.jpg``
(its safe rewrite's). A pair is (harmful prompt; safe image preferred over harmful image), carrying the
safe prompt and the union of the categories on all rows of either image (rows repeat a pair once per
category). The released test CSV names images ``<k>_<j>.jpg`` and holds harmful prompts only: it has
no safe images to pair, and is read as evaluation prompts (:func:`read_test_prompts`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from common.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader, categories_of, csv_records, image_file, path_problem

log = logging.getLogger(__name__)
IMAGE_NAME = re.compile(r"^(?P<role>[us])_idx_(?P<k>\d+)_(?P<j>\d+)\.[A-Za-z0-9]+$")
TEST_IMAGE_NAME = re.compile(r"^(?P<k>\d+)_(?P<j>\d+)\.[A-Za-z0-9]+$")
COLUMNS = ("prompt", "image", "category")
Layout = Literal["train", "test"]


@dataclass
class _Side:
    prompt: str
    path: Path
    name: str
    row: int
    categories: list[str] = field(default_factory=list)


def csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row, record)`` for every row of a CoProV2 CSV, rows numbered as a spreadsheet shows them (the
    header is row 1), cells stripped; refuses a file without the CoProV2 columns (see :func:`csv_records`)."""
    for row, record in csv_records(path, COLUMNS, "the CoProV2 format"):
        yield row, {c: record[c] for c in COLUMNS}


def csv_layout(path: Path) -> Layout:
    """``test`` when the first row's image is named ``<k>_<j>.<ext>`` (the released test CSV), else ``train``."""
    for _, record in csv_rows(path):
        return "test" if TEST_IMAGE_NAME.match(Path(record["image"]).name) else "train"
    raise AssertionError("unreachable: csv_rows refuses a file without rows")


def same_key(path: Path, row: int, name: str, first: _Side | tuple[int, str], key: str) -> InputError:
    """The error for two differently named images whose numbers are equal (``u_idx_0_0``, ``u_idx_000_0``)."""
    first_row, first_name = (first.row, first.name) if isinstance(first, _Side) else first
    return InputError(f"{path} row {row}: image {name!r} has the pair key {key} of row {first_row}'s image "
                      f"{first_name!r} (the same numbers, written differently); give each image one name")


def read_test_prompts(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """The test CSV's harmful prompts, one ``(prompt, categories)`` per image ``<k>_<j>`` in file order,
    with the union of the categories of its rows. Only the names are read: the images need not exist."""
    path = Path(path).expanduser()
    prompts: dict[tuple[int, int], tuple[str, list[str]]] = {}
    names: dict[tuple[int, int], tuple[int, str]] = {}
    for row, record in csv_rows(path):
        where = f"{path} row {row}"
        match = TEST_IMAGE_NAME.match(Path(record["image"]).name)
        if not match:
            raise InputError(f"{where}: image {record['image']!r} is not named <k>_<j>.<ext> like the first row's "
                             "(the CoProV2 test CSV's naming)")
        if not record["prompt"]:
            raise InputError(f"{where}: empty prompt")
        key = (int(match["k"]), int(match["j"]))
        first = names.setdefault(key, (row, record["image"]))
        if first[1] != record["image"]:
            raise same_key(path, row, record["image"], first, f"{key[0]}_{key[1]}")
        _, categories = prompts.setdefault(key, (record["prompt"], []))
        categories += [c for c in categories_of(record["category"], where, "category") if c not in categories]
    log.info("CoProV2 test CSV %s: %d harmful prompts", path, len(prompts))
    return [(text, tuple(categories)) for text, categories in prompts.values()]


class CoProV2Reader(PairReader):
    """The train CSV's pairs. Image names are relative to ``image_dir`` (default: the CSV's folder) and must
    stay inside it unless ``allow_outside_paths``."""

    def __init__(self, path: str | Path, image_dir: str | Path | None = None, allow_outside_paths: bool = False,
                 key: str = "data.path") -> None:
        super().__init__(path, key)
        self.require_file("the CoProV2 CSV file")
        self.image_dir = Path(image_dir).expanduser() if image_dir else self.path.parent
        problem = path_problem(self.image_dir, "dir")
        if problem:
            raise InputError(f"{self.option('image_dir')}={self.image_dir}: {problem}; "
                             "expected the folder of the CSV's images")
        self.allow_outside_paths = bool(allow_outside_paths)

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
            key = (int(match["k"]), int(match["j"]))
            side = sides.setdefault(key, {}).get(match["role"])
            if side is None:
                image = image_file(self.image_dir, name, "image", where, self.allow_outside_paths)
                side = sides[key][match["role"]] = _Side(record["prompt"], image, name, row)
            elif side.name != name:
                raise same_key(self.path, row, name, side, f"{match['role']}_idx_{key[0]}_{key[1]}")
            side.categories += [c for c in categories_of(record["category"], where, "category") if c not in side.categories]

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
