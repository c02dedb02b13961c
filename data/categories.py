"""Harm category names: one canonical spelling per category, so filters and per-category metrics agree.

The aliases cover spelling variants met in CoProV2/I2P-style files; unknown names pass through in
normalized form (lower case, words joined by ``_``) so users' own categories work too.
"""
from __future__ import annotations

import re

ALIASES: dict[str, str] = {
    "hate": "hate",
    "hateful": "hate",
    "harassment": "harassment",
    "harrassment": "harassment",
    "harasment": "harassment",
    "harrasment": "harassment",
    "violence": "violence",
    "violent": "violence",
    "voilence": "violence",
    "self_harm": "self_harm",
    "selfharm": "self_harm",
    "self_harms": "self_harm",
    "sexual": "sexual",
    "sexual_content": "sexual",
    "sexually_explicit": "sexual",
    "nudity": "sexual",
    "shocking": "shocking",
    "shoking": "shocking",
    "shock": "shocking",
    "illegal_activity": "illegal_activity",
    "illegal_activities": "illegal_activity",
    "illegal": "illegal_activity",
    "ilegal_activity": "illegal_activity",
}


def normalize_category(name: str) -> str:
    """``" Self-Harm "`` -> ``"self_harm"``; known misspellings map to their canonical name."""
    key = re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")
    return ALIASES.get(key, key)


def split_categories(field: str) -> list[str]:
    """A cell that may list several categories (``"hate, violence"``) to normalized names."""
    return [normalize_category(part) for part in re.split(r"[,;|]", str(field)) if part.strip()]
