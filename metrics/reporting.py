"""Writing results people read: markdown tables, PNG grids, files replaced atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def markdown_table(before: dict[str, float], after: dict[str, float], names: tuple[str, str] = ("before", "after")) -> str:
    """One row per metric of ``before``: both values and the change."""
    lines = [f"| metric | {names[0]} | {names[1]} | change |", "|---|---:|---:|---:|"]
    for key in before:
        b, a = before[key], after.get(key, float("nan"))
        lines.append(f"| {key} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    return "\n".join(lines)


def image_grid(rows: list[list[np.ndarray]], scale: int = 4) -> Image.Image:
    h, w = rows[0][0].shape[:2]
    grid = Image.new("RGB", (w * scale * len(rows[0]), h * scale * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            grid.paste(tile.resize((w * scale, h * scale), Image.Resampling.NEAREST), (c * w * scale, r * h * scale))
    return grid


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
