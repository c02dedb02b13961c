"""CoProV2 format: a CSV ``prompt,image,category`` beside an image folder.

``u_idx_<k>_<j>.jpg`` is the harmful prompt's image, ``s_idx_<k>_<j>.jpg`` its safe rewrite's. A pair
is (harmful prompt; safe image preferred over harmful image), carrying the safe prompt and the
union of the categories on all rows of either image (rows repeat a pair once per category).
"""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from data.categories import split_categories
from data.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader

log = logging.getLogger(__name__)
IMAGE_NAME = re.compile(r"^(?P<role>[us])_idx_(?P<k>\d+)_(?P<j>\d+)\.[A-Za-z0-9]+$")
COLUMNS = ("prompt", "image", "category")


@dataclass
class _Side:
    prompt: str
    path: Path
    row: int
    categories: list[str] = field(default_factory=list)


class CoProV2Reader(PairReader):
    def __init__(self, path: str | Path, image_dir: str | Path | None = None) -> None:
        super().__init__(path)
        self.image_dir = Path(image_dir).expanduser() if image_dir else self.path.parent

    def read(self) -> list[PreferencePair]:
        sides: dict[tuple[int, int], dict[str, _Side]] = {}
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{self.path}: missing column(s) {missing}; CoProV2 format needs {list(COLUMNS)}")
            for row, record in enumerate(reader, start=2):  # row numbers as a spreadsheet shows them
                where = f"{self.path} row {row}"
                name = (record["image"] or "").strip()
                match = IMAGE_NAME.match(Path(name).name)
                if not match:
                    raise InputError(f"{where}: image {name!r} is not named u_idx_<k>_<j>.<ext> or s_idx_<k>_<j>.<ext>")
                image = self.image_dir / name
                if not image.is_file():
                    raise InputError(f"{where}: image file not found: {image}")
                key = (int(match["k"]), int(match["j"]))
                side = sides.setdefault(key, {}).setdefault(match["role"], _Side((record["prompt"] or "").strip(), image, row))
                side.categories += [c for c in split_categories(record["category"] or "") if c not in side.categories]

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
