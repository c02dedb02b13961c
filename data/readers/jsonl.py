"""The project's own pair format: a JSONL file (or a folder holding ``pairs.jsonl``), one pair per line.

Keys: ``prompt`` (required), ``chosen`` (required image path), ``rejected`` (image path; omit for an
image-caption set), ``safe_prompt``, ``categories`` (list or comma-separated string), ``extras``
(object of numbers). Image paths are relative to the JSONL file's folder.
"""
from __future__ import annotations

from data.categories import split_categories
from data.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader, image_file, jsonl_records


class JsonlReader(PairReader):
    def read(self) -> list[PreferencePair]:
        file = self.path / "pairs.jsonl" if self.path.is_dir() else self.path
        if not file.is_file():
            raise InputError(f"{self.path}: expected a .jsonl file or a folder with pairs.jsonl")
        root, pairs = file.parent, []
        for where, record in jsonl_records(file):
            for key in ("prompt", "chosen"):
                if not isinstance(record.get(key), str):
                    raise InputError(f"{where}: key {key!r} must be a string")
            images = {key: image_file(root, record[key], key, where)
                      for key in ("chosen", "rejected") if record.get(key) is not None}
            cats = record.get("categories") or []
            categories = split_categories(",".join(cats) if isinstance(cats, list) else cats)
            pairs.append(PreferencePair(
                prompt=record["prompt"], image_w=images["chosen"], image_l=images.get("rejected"),
                safe_prompt=record.get("safe_prompt"), categories=tuple(categories),
                extras={k: float(v) for k, v in (record.get("extras") or {}).items()}, source=where,
            ))
        if pairs and len({p.image_l is None for p in pairs}) > 1:
            raise InputError(f"{file}: either every line has 'rejected' (pairs) or none does (image-caption set)")
        self.stats = {"pairs": len(pairs)}
        return pairs
