"""The toy world as a pair source, shaped exactly like CoProV2 pairs, or as an image-caption set."""
from __future__ import annotations

import io
from typing import Literal

from PIL import Image

from data.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader
from data.toy.world import Prompt, ToyWorld


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ToyReader(PairReader):
    """``kind=pairs``: (harmful prompt; safe rewrite's image preferred over the harmful image), rendered
    with the same jitter seed, carrying the safe prompt and category. ``kind=images``: every prompt of
    ``split`` (benign and harmful) with its own image, for pretraining the base model.
    """

    def __init__(self, path: str | None = None, kind: Literal["pairs", "images"] = "pairs", split: str = "train",
                 images_per_prompt: int = 8, world_seed: int = 0) -> None:
        if kind not in ("pairs", "images"):
            raise InputError(f"data.reader.kind: expected pairs or images, got {kind!r}")
        if split not in ("train", "heldout"):
            raise InputError(f"data.reader.split: expected train or heldout, got {split!r}")
        self.world = ToyWorld(seed=world_seed)
        self.path, self.kind, self.split, self.images_per_prompt = path, kind, split, images_per_prompt
        self.stats: dict[str, int] = {}

    def prompts(self, which: str) -> list[Prompt]:
        return self.world.split[f"{self.split}_{which}"]

    def read(self) -> list[PreferencePair]:
        pairs: list[PreferencePair] = []
        seeds = range(self.images_per_prompt)
        if self.kind == "images":
            for prompt in self.prompts("benign") + self.prompts("harmful"):
                for seed in seeds:
                    pairs.append(PreferencePair(prompt=prompt.text, image_w=png_bytes(self.world.render(prompt, seed)),
                                                categories=prompt.categories, source=f"toy {prompt.text} seed {seed}"))
        else:
            for prompt in self.prompts("harmful"):
                safe = prompt.safe_rewrite()
                for seed in seeds:
                    pairs.append(PreferencePair(
                        prompt=prompt.text, image_w=png_bytes(self.world.render(safe, seed)),
                        image_l=png_bytes(self.world.render(prompt, seed)), safe_prompt=safe.text,
                        categories=prompt.categories, source=f"toy {prompt.text} seed {seed}",
                    ))
        self.stats = {"pairs": len(pairs)}
        return pairs

    def __repr__(self) -> str:
        return f"ToyReader(kind={self.kind!r}, split={self.split!r})"
