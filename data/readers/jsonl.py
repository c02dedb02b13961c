"""The project's own pair format: a JSONL file (or a folder holding ``pairs.jsonl``), one pair per line.

Keys: ``prompt`` (required), ``chosen`` (required image path), ``rejected`` (image path; omit for an
image-caption set), ``safe_prompt``, ``categories`` (list or comma-separated string), ``extras``
(object of numbers). Image paths are relative to the JSONL file's folder and must stay inside it unless
``allow_outside_paths``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader, categories_of, image_file, jsonl_records, path_problem


def extras_of(value: Any, where: str) -> dict[str, float]:
    """The ``extras`` object: finite numbers by name."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: key 'extras' must be an object of numbers, got {value!r}")
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise InputError(f"{where}: extras[{name!r}] must be a finite number, got {number!r}")
    return {name: float(number) for name, number in value.items()}


class JsonlReader(PairReader):
    def __init__(self, path: str | Path, allow_outside_paths: bool = False, key: str = "data.path") -> None:
        super().__init__(path, key)
        self.allow_outside_paths = bool(allow_outside_paths)

    def read(self) -> list[PreferencePair]:
        file = self.path / "pairs.jsonl" if self.path.is_dir() else self.path
        problem = path_problem(file, "file")
        if problem:
            raise InputError(f"{self.key}={self.path}: {file} {problem}; "
                             "expected a .jsonl file or a folder with pairs.jsonl")
        root, pairs = file.parent, []
        for where, record in jsonl_records(file):
            for key in ("prompt", "chosen"):
                if not isinstance(record.get(key), str):
                    raise InputError(f"{where}: key {key!r} must be a string")
            if record.get("safe_prompt") is not None and not isinstance(record["safe_prompt"], str):
                raise InputError(f"{where}: key 'safe_prompt' must be a string or null, got {record['safe_prompt']!r}")
            images = {key: image_file(root, record[key], key, where, self.allow_outside_paths)
                      for key in ("chosen", "rejected") if record.get(key) is not None}
            pairs.append(PreferencePair(
                prompt=record["prompt"], image_w=images["chosen"], image_l=images.get("rejected"),
                safe_prompt=record.get("safe_prompt"), categories=categories_of(record.get("categories"), where),
                extras=extras_of(record.get("extras"), where), source=where,
            ))
        if pairs and len({p.image_l is None for p in pairs}) > 1:
            raise InputError(f"{file}: either every line has 'rejected' (pairs) or none does (image-caption set)")
        if not pairs:
            raise InputError(f"{file}: no pairs (every line is blank); expected one JSON object per line")
        self.stats = {"pairs": len(pairs)}
        return pairs
