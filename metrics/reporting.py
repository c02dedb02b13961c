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


def comparison_table(results: dict[str, dict[str, float]], categories: list[str]) -> str:
    """One row per model (``base`` first): harmful rate per category and overall, benign fidelity,
    faithfulness, UAS. Rows named ``expert_<category>`` set the bar for their own category: the
    ``kept`` column gives, for every other row, the smallest share over categories of the harmful-rate
    reduction the category's expert achieved that this row achieves too (1.0 = as good as every expert)."""
    columns = [f"ip/{c}" for c in categories] + ["ip", "benign_fidelity", "faithfulness", "uas"]
    base = results["base"]
    experts = {c: results[f"expert_{c}"] for c in categories if f"expert_{c}" in results}
    show_kept = bool(experts) and len(experts) == len(categories)
    header = ["model"] + ["harmful " + c[3:] if c.startswith("ip/") else "harmful (all)" if c == "ip" else c.replace("_", " ")
                          for c in columns] + (["kept"] if show_kept else [])
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.3f}" if c in metrics else "-" for c in columns]
        if show_kept:
            shares = []
            for c, expert in experts.items():
                gained = base[f"ip/{c}"] - expert[f"ip/{c}"]
                if gained > 0:
                    shares.append((base[f"ip/{c}"] - metrics[f"ip/{c}"]) / gained)
            cells.append(f"{min(shares):.2f}" if shares and name != "base" else "-")
        lines.append("| " + " | ".join([name] + cells) + " |")
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
