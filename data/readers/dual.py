"""Dual-annotated data (T2I-SPO / LibraAlign style, docs/methods/spo.md) and the pairs built from it.

One row per image, in JSONL or parquet, rows of one prompt grouped by their ``prompt`` text:

- ``prompt`` (string, required); ``safe_prompt`` (string, optional: its safe rewrite)
- ``image``: JSONL: a path relative to the file's folder; parquet: encoded bytes, a path (relative to the
  file's folder), or a ``{bytes, path}`` struct (the Hugging Face ``Image`` feature). Paths must stay inside
  that folder unless ``allow_outside_paths``.
- ``quality`` (number in [0, 1], required): how well the image shows the prompt, how good it looks
- ``unsafe`` (number in [0, 1], or null: then a cost model supplies ``sigmoid(C(x))``)
- ``categories`` (list or comma-separated string, optional): the harm categories involved

Pairs: the composite reward ``R = w_q * q - w_s * s`` orders the images of one prompt; ``pairing=all``
keeps every pair with ``R_w - R_l >= delta``, ``extremes`` only best against worst. Each pair carries
``reward_w``/``reward_l`` (``spo``'s margin) and the images' ``quality``/``unsafe`` as extras.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import pyarrow.parquet as pq
from torch import Tensor

from common.errors import InputError
from data.pairs import ImageRef, PreferencePair, one_line
from data.readers.base import PairReader, categories_of, image_file, jsonl_records

Pairing = Literal["all", "extremes"]
ANNOTATIONS_FILE = "annotations.jsonl"


@dataclass
class AnnotatedImage:
    image: ImageRef
    quality: float
    unsafe: float | None
    categories: tuple[str, ...] = ()
    source: str = ""


@dataclass
class AnnotatedPrompt:
    """A prompt and its scored images (several per prompt, from one or more generators)."""

    prompt: str
    images: list[AnnotatedImage] = field(default_factory=list)
    safe_prompt: str | None = None


def composite_reward(quality: float, unsafe: float, w_q: float = 1.0, w_s: float = 1.0) -> float:
    """``R = w_q * q - w_s * s``: higher is better; a safe, faithful image beats an unsafe one."""
    return w_q * quality - w_s * unsafe


def _unit_interval(value: Any, key: str, where: str, optional: bool = False) -> float | None:
    """A score in [0, 1]; null (or NaN, as pandas writes a missing number) only when ``optional``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if optional:
            return None
        raise InputError(f"{where}: key {key!r} must be a number in [0, 1], got {'none' if value is None else 'NaN'}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{where}: key {key!r} must be a number in [0, 1], got {value!r}")
    return float(value)


def group_rows(rows: Iterable[tuple[str, dict[str, Any], ImageRef]]) -> list[AnnotatedPrompt]:
    """``(where, row, image)`` triples -> one :class:`AnnotatedPrompt` per prompt text, in first-seen order."""
    groups: dict[str, AnnotatedPrompt] = {}
    for where, row, image in rows:
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise InputError(f"{where}: key 'prompt' must be a string")
        safe = row.get("safe_prompt")
        if safe is not None and not isinstance(safe, str):
            raise InputError(f"{where}: key 'safe_prompt' must be a string or null")
        group = groups.setdefault(prompt, AnnotatedPrompt(prompt, safe_prompt=safe or None))
        group.safe_prompt = group.safe_prompt or safe or None
        group.images.append(AnnotatedImage(
            image=image, quality=_unit_interval(row.get("quality"), "quality", where),
            unsafe=_unit_interval(row.get("unsafe"), "unsafe", where, optional=True),
            categories=categories_of(row.get("categories"), where), source=where))
    return list(groups.values())


def read_jsonl(file: Path, allow_outside: bool = False) -> list[AnnotatedPrompt]:
    return group_rows((where, row, image_file(file.parent, row.get("image"), "image", where, allow_outside))
                      for where, row in jsonl_records(file))


def read_parquet(file: Path, allow_outside: bool = False) -> list[AnnotatedPrompt]:

    try:
        table = pq.read_table(file)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"{file}: cannot read parquet ({one_line(err)})") from None
    missing = [c for c in ("prompt", "image", "quality") if c not in table.column_names]
    if missing:
        raise InputError(f"{file}: missing column(s) {missing}; expected prompt, image, quality "
                         f"[, unsafe, categories, safe_prompt], got {table.column_names}")

    def rows():
        for index, row in enumerate(table.to_pylist()):
            where = f"{file} row {index}"
            value = row["image"]
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if value is None:
                raise InputError(f"{where}: column 'image' is null; expected encoded image bytes or a path")
            if isinstance(value, str):
                value = image_file(file.parent, value, "image", where, allow_outside)
            elif not isinstance(value, (bytes, bytearray)) or not value:
                raise InputError(f"{where}: column 'image' must hold encoded image bytes or a path, got {type(value).__name__}")
            else:
                value = bytes(value)
            yield where, row, value

    return group_rows(rows())


def read_annotations(path: str | Path, allow_outside: bool = False) -> list[AnnotatedPrompt]:
    """A ``.jsonl`` or ``.parquet`` file, or a folder holding ``annotations.jsonl`` or ``*.parquet`` files;
    image paths must stay inside the file's folder unless ``allow_outside``."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / ANNOTATIONS_FILE).exists():
            return read_jsonl(path / ANNOTATIONS_FILE, allow_outside)
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise InputError(f"{path}: expected {ANNOTATIONS_FILE} or *.parquet files in this folder")
        return [g for f in files for g in read_parquet(f, allow_outside)]
    if path.suffix == ".jsonl":
        return read_jsonl(path, allow_outside)
    if path.suffix == ".parquet":
        return read_parquet(path, allow_outside)
    raise InputError(f"{path}: expected a .jsonl or .parquet file (or a folder of them)")


def preference_pairs(groups: Sequence[AnnotatedPrompt], pairing: Pairing = "all", delta: float = 0.1,
                     w_q: float = 1.0, w_s: float = 1.0) -> list[PreferencePair]:
    """Pairs within each prompt, the higher composite reward preferred (every ``unsafe`` must be set)."""
    if pairing not in ("all", "extremes"):
        raise InputError(f"data.reader.pairing: expected all or extremes, got {pairing!r}")
    if delta < 0:
        raise InputError(f"data.reader.delta: expected a number >= 0, got {delta}")
    pairs: list[PreferencePair] = []
    for group in groups:
        scored = []
        for image in group.images:
            if image.unsafe is None:
                raise InputError(f"{image.source}: 'unsafe' is null and no cost model scored it (set data.reader.cost_model=...)")
            scored.append((composite_reward(image.quality, image.unsafe, w_q, w_s), image))
        # stable order: best first; ties keep file order, so the pairs do not depend on sorting details
        scored.sort(key=lambda item: -item[0])
        if pairing == "extremes":
            candidates = [(scored[0], scored[-1])] if len(scored) >= 2 else []
        else:
            candidates = [(scored[i], scored[j]) for i in range(len(scored)) for j in range(i + 1, len(scored))]
        for (r_w, win), (r_l, lose) in candidates:
            if r_w - r_l < delta or r_w == r_l:
                continue
            pairs.append(PreferencePair(
                prompt=group.prompt, image_w=win.image, image_l=lose.image, safe_prompt=group.safe_prompt,
                categories=tuple(dict.fromkeys(win.categories + lose.categories)),
                extras={"reward_w": r_w, "reward_l": r_l, "quality_w": win.quality, "quality_l": lose.quality,
                        "unsafe_w": win.unsafe, "unsafe_l": lose.unsafe},
                source=f"{win.source} > {lose.source}"))
    return pairs


def fill_unsafe(groups: Sequence[AnnotatedPrompt], cost_model: str | Path, cache_dir: str | Path,
                image_costs: Callable[..., Tensor]) -> int:
    """Score every image without ``unsafe`` with a cost model: ``s = sigmoid(C(x))``; returns how many.
    ``image_costs(images, sources, cost_model, cache_dir)`` gives ``C(x)`` (``models.pair_costs.image_costs``)."""
    todo = [image for group in groups for image in group.images if image.unsafe is None]
    if todo:
        costs = image_costs([i.image for i in todo], [i.source for i in todo], cost_model, cache_dir)
        for image, cost in zip(todo, costs.sigmoid().tolist()):
            image.unsafe = float(cost)
    return len(todo)


class DualAnnotatedReader(PairReader):
    """Pairs from a dual-annotated file: ``python train.py objective=spo data=dual data.path=...``."""
    def __init__(self, path: str | Path, pairing: Pairing = "all", delta: float = 0.1, w_q: float = 1.0,
                 w_s: float = 1.0, cost_model: str | Path | None = None, cache_dir: str | Path = ".cache/latents",
                 allow_outside_paths: bool = False, key: str = "data.path",
                 cost_scorer: Callable[..., Tensor] | None = None) -> None:
        super().__init__(path, key)
        if cost_model and cost_scorer is None:
            raise InputError("data.reader.cost_scorer: data.reader.cost_model is set but nothing scores the images; "
                             "expected {_target_: models.pair_costs.image_costs, _partial_: true}")
        self.cost_scorer = cost_scorer
        self.pairing, self.delta, self.w_q, self.w_s = pairing, float(delta), float(w_q), float(w_s)
        self.cost_model, self.cache_dir = cost_model, cache_dir
        self.allow_outside_paths = bool(allow_outside_paths)

    def groups(self) -> list[AnnotatedPrompt]:
        return read_annotations(self.path, self.allow_outside_paths)

    def read(self) -> list[PreferencePair]:
        groups = self.groups()
        scored = fill_unsafe(groups, self.cost_model, self.cache_dir, self.cost_scorer) if self.cost_model else 0
        pairs = preference_pairs(groups, self.pairing, self.delta, self.w_q, self.w_s)
        self.stats = {"prompts": len(groups), "images": sum(len(g.images) for g in groups), "pairs": len(pairs),
                      "scored_by_cost_model": scored}
        return pairs
