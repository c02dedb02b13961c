"""Prompt sets for evaluation: I2P CSV, CoProV2 CSV, COCO captions, plain text, the toy world.

Each reader returns :class:`EvalPrompt`s. ``harmful`` prompts are judged for safety (and, when they
carry a safe rewrite, for faithfulness to it); ``benign`` ones for quality. A prompt may carry the
dataset's own seed and guidance (I2P), used when the evaluation asks for them.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data.categories import split_categories
from data.errors import InputError

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


def _open_csv(path: Path, needed: tuple[str, ...]):
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    handle = open(path, newline="", encoding="utf-8")
    reader = csv.DictReader(handle)
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        handle.close()
        raise InputError(f"{path}: missing column(s) {missing}; expected at least {list(needed)}")
    return handle, reader


def read_i2p(path: str | Path, limit: int | None = None) -> list[EvalPrompt]:
    """I2P CSV: ``prompt, categories, sd_seed, sd_guidance_scale, ...``; every prompt is harmful."""
    path = Path(path).expanduser()
    handle, reader = _open_csv(path, ("prompt", "categories"))
    out = []
    with handle:
        for row, record in enumerate(reader, start=2):
            text = (record["prompt"] or "").strip()
            if not text:
                raise InputError(f"{path} row {row}: empty prompt")
            try:
                seed = int(float(record["sd_seed"])) if record.get("sd_seed") not in (None, "") else None
                guidance = float(record["sd_guidance_scale"]) if record.get("sd_guidance_scale") not in (None, "") else None
            except ValueError as error:
                raise InputError(f"{path} row {row}: sd_seed/sd_guidance_scale must be numbers ({error})") from None
            out.append(EvalPrompt(text, "harmful", tuple(split_categories(record["categories"] or "")), None,
                                  seed, guidance))
            if limit is not None and len(out) >= limit:
                break
    return out


def read_coprov2(path: str | Path, image_dir: str | Path | None = None, limit: int | None = None) -> list[EvalPrompt]:
    """CoProV2 CSV (``prompt, image, category``). The released test CSV (images ``<k>_<j>.jpg``): its
    harmful prompts with their categories, no safe rewrites (faithfulness is then not measured; the
    images are not read). The train CSV's layout (``u_idx_``/``s_idx_`` images, which must exist): the
    harmful prompts with their safe rewrites."""
    from data.readers.coprov2 import CoProV2Reader, csv_layout, read_test_prompts

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    if csv_layout(path) == "test":
        return [EvalPrompt(text, "harmful", categories) for text, categories in read_test_prompts(path)][:limit]
    pairs = CoProV2Reader(path, image_dir).read()[:limit]
    return [EvalPrompt(p.prompt, "harmful", tuple(p.categories), p.safe_prompt) for p in pairs]


def read_coco_captions(path: str | Path, limit: int | None = None) -> list[EvalPrompt]:
    """COCO ``captions_*.json``: the first caption of each image, as benign prompts."""
    path = Path(path).expanduser()
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except FileNotFoundError:
        raise InputError(f"{path}: prompt file not found") from None
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
    path = Path(path).expanduser()
    kind = _check_kind(kind, str(path))
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [EvalPrompt(line, kind) for line in lines if line][:limit]


def read_toy(split: str = "heldout", world_seed: int = 0, limit: int | None = None) -> list[EvalPrompt]:
    """The toy world's harmful (with safe rewrites) and benign prompts of ``split`` (train | heldout)."""
    from data.toy.world import ToyWorld

    if split not in ("train", "heldout"):
        raise InputError(f"toy prompts: split must be 'train' or 'heldout', got {split!r}")
    world = ToyWorld(seed=world_seed)
    harmful = [EvalPrompt(p.text, "harmful", p.categories, p.safe_rewrite().text)
               for p in world.split[f"{split}_harmful"]]
    benign = [EvalPrompt(p.text, "benign") for p in world.split[f"{split}_benign"]]
    return harmful[:limit] + benign[:limit]
