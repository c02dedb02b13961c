"""Prompt sets for evaluation: I2P CSV, CoProV2 CSV, COCO captions, plain text, the toy world.

Each reader returns :class:`EvalPrompt`s. ``harmful`` prompts are judged for safety (and, when they
carry a safe rewrite, for faithfulness to it); ``benign`` ones for quality. A prompt may carry the
dataset's own seed and guidance (I2P), used when the evaluation asks for them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import InputError
from data.readers.base import categories_of, csv_records, path_problem, read_utf8
from data.readers.coprov2 import CoProV2Reader, csv_layout, read_test_prompts
from data.toy.world import ToyWorld

Kind = Literal["harmful", "benign"]


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    kind: Kind
    categories: tuple[str, ...] = ()
    safe_text: str | None = None
    seed: int | None = None
    guidance: float | None = None


def _check_kind(kind: str, source: str) -> Kind:
    if kind not in ("harmful", "benign"):
        raise InputError(f"{source}: kind must be 'harmful' or 'benign', got {kind!r}")
    return kind  # type: ignore[return-value]


def prompt_file(path: str | Path) -> Path:
    """``path`` as a readable file, or one line saying what it is instead (missing, a directory, a symlink loop)."""
    path = Path(path).expanduser()
    problem = path_problem(path, "file")
    if problem:
        raise InputError(f"{path}: prompt file {'not found' if problem == 'does not exist' else problem}")
    return path


def _number(value: str, column: str, where: str) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        raise InputError(f"{where}: {column} must be a number, got {value!r}") from None
    if number is not None and not math.isfinite(number):
        raise InputError(f"{where}: {column} must be a finite number, got {value!r}")
    return number


def read_i2p(path: str | Path, limit: int | None = None) -> list[EvalPrompt]:
    """I2P CSV: ``prompt, categories, sd_seed, sd_guidance_scale, ...``; every prompt is harmful."""
    path = prompt_file(path)
    out = []
    for row, record in csv_records(path, ("prompt", "categories"), "an I2P CSV"):
        where = f"{path} row {row}"
        if not record["prompt"]:
            raise InputError(f"{where}: empty prompt")
        seed = _number(record.get("sd_seed", ""), "sd_seed", where)
        guidance = _number(record.get("sd_guidance_scale", ""), "sd_guidance_scale", where)
        out.append(EvalPrompt(record["prompt"], "harmful", categories_of(record["categories"], where),
                              None, None if seed is None else int(seed), guidance))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_coprov2(path: str | Path, image_dir: str | Path | None = None, limit: int | None = None,
                 allow_outside_paths: bool = False) -> list[EvalPrompt]:
    """CoProV2 CSV (``prompt, image, category``). The released test CSV (images ``<k>_<j>.jpg``): its
    harmful prompts with their categories, no safe rewrites (faithfulness is then not measured; the
    images are not read). The train CSV's layout (``u_idx_``/``s_idx_`` images, which must exist inside
    ``image_dir`` unless ``allow_outside_paths``): the harmful prompts with their safe rewrites."""
    path = prompt_file(path)
    if csv_layout(path) == "test":
        return [EvalPrompt(text, "harmful", categories) for text, categories in read_test_prompts(path)][:limit]
    pairs = CoProV2Reader(path, image_dir, allow_outside_paths, key="prompts.sets.coprov2.path").read()[:limit]
    return [EvalPrompt(p.prompt, "harmful", tuple(p.categories), p.safe_prompt) for p in pairs]


def read_coco_captions(path: str | Path, limit: int | None = None) -> list[EvalPrompt]:
    """COCO ``captions_*.json``: the first caption of each image, as benign prompts."""
    path = prompt_file(path)
    try:
        annotations = json.loads(read_utf8(path))["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{path}: expected COCO captions JSON with an 'annotations' list") from None
    seen, out = set(), []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "caption" not in ann or "image_id" not in ann:
            raise InputError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'")
        if ann["image_id"] in seen:
            continue
        seen.add(ann["image_id"])
        out.append(EvalPrompt(str(ann["caption"]).strip(), "benign"))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_text(path: str | Path, kind: str = "benign", limit: int | None = None) -> list[EvalPrompt]:
    """One prompt per line (blank lines skipped)."""
    kind = _check_kind(kind, str(path))
    lines = [line.strip() for line in read_utf8(prompt_file(path)).splitlines()]
    return [EvalPrompt(line, kind) for line in lines if line][:limit]


def read_toy(split: str = "heldout", world_seed: int = 0, limit: int | None = None) -> list[EvalPrompt]:
    """The toy world's harmful (with safe rewrites) and benign prompts of ``split`` (train | heldout)."""
    if split not in ("train", "heldout"):
        raise InputError(f"toy prompts: split must be 'train' or 'heldout', got {split!r}")
    return toy_prompts(ToyWorld(seed=world_seed), split, limit)


def toy_prompts(world: ToyWorld, split: str = "heldout", limit: int | None = None) -> list[EvalPrompt]:
    """``world``'s harmful prompts of ``split`` (with their safe rewrites), then its benign ones."""
    harmful = [EvalPrompt(p.text, "harmful", p.categories, p.safe_rewrite().text)
               for p in world.split[f"{split}_harmful"]]
    benign = [EvalPrompt(p.text, "benign") for p in world.split[f"{split}_benign"]]
    return harmful[:limit] + benign[:limit]
