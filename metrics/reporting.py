"""Writing results people read: markdown tables and PNG grids."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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
    categories = [c for c in categories if all(f"ip/{c}" in m for m in results.values())]  # measured by every row
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


def _shorten(text: str, width: int, font) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels in ``font``."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def image_grid(rows: list[list[np.ndarray]], scale: int = 4, columns: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None, label_width: int = 220) -> Image.Image:
    """A PNG-ready grid of images in [0, 1] (``[H, W, 3]`` arrays), each enlarged ``scale`` times; with
    ``columns`` a title above each column, with ``row_labels`` (e.g. the prompts, shortened to fit) a label
    left of each row, so the grid says what it shows when read alone."""
    font = ImageFont.load_default()
    h, w = rows[0][0].shape[:2]
    tile_h, tile_w = h * scale, w * scale
    top = 18 if columns else 0
    left = label_width if row_labels else 0
    grid = Image.new("RGB", (left + tile_w * len(rows[0]), top + tile_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(columns or []):
        draw.text((left + c * tile_w + 4, 3), _shorten(str(title), tile_w - 8, font), fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        if row_labels:
            draw.text((4, top + r * tile_h + tile_h // 2 - 6), _shorten(str(row_labels[r]), label_width - 8, font),
                      fill=(0, 0, 0), font=font)
        for c, image in enumerate(row):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
            grid.paste(tile.resize((tile_w, tile_h), Image.Resampling.NEAREST), (left + c * tile_w, top + r * tile_h))
    return grid
