"""The toy world as a pair source, shaped exactly like CoProV2 pairs, or as an image-caption set."""
from __future__ import annotations

import io
from typing import Literal

from PIL import Image

from common.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader
from data.readers.dual import AnnotatedImage, AnnotatedPrompt, Pairing, preference_pairs
from data.readers.mixed import MixedReader
from data.toy import oracle as toy_oracle
from data.toy.world import BACKGROUNDS, COLOURS, HARMFUL, KINDS, SHAPES, Prompt, ToyWorld


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def degraded(prompt: Prompt, seed: int) -> Prompt:
    """``prompt`` with one attribute (chosen by ``seed``) swapped for another benign value of its kind."""
    kind = KINDS[seed % len(KINDS)]
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}[kind]
    benign = [v for v in values if v not in HARMFUL and v != getattr(prompt, kind)]
    attrs = prompt.attributes()
    attrs[kind] = benign[(seed // len(KINDS)) % len(benign)]
    return Prompt(**attrs)


class ToyReader(PairReader):
    """``kind=pairs``: (harmful prompt; safe rewrite's image preferred over the harmful image), rendered
    with the same jitter seed, carrying the safe prompt and category. ``kind=clean_pairs``: quality pairs
    under benign prompts (the prompt's own image preferred over an image with one attribute swapped for
    another benign value: higher fidelity wins). ``kind=scp``: SC-DPO's mix of the two, ``harmful_fraction``
    safety pairs (:class:`MixedReader`). ``kind=dual``: T2I-SPO's dual-annotated data (:mod:`data.readers.dual`):
    per prompt and seed its own image, its safe rewrite's (harmful prompts) and a one-attribute
    degraded image of the safe content, each scored by the exact oracles (``quality`` = fidelity to the
    prompt, ``unsafe`` = harm probability), paired by composite reward. ``kind=images``: every prompt of
    ``split`` (benign and harmful) with its own image, for pretraining the base model.
    """
    KINDS = ("pairs", "clean_pairs", "scp", "dual", "images")

    def __init__(self, path: str | None = None, kind: Literal["pairs", "clean_pairs", "scp", "dual", "images"] = "pairs",
                 split: str = "train", images_per_prompt: int = 8, world_seed: int = 0, harmful_fraction: float = 0.5,
                 pairing: Pairing = "all", delta: float = 0.1, w_q: float = 1.0, w_s: float = 1.0) -> None:
        if kind not in self.KINDS:
            raise InputError(f"data.reader.kind: expected one of {', '.join(self.KINDS)}, got {kind!r}")
        if split not in ("train", "heldout"):
            raise InputError(f"data.reader.split: expected train or heldout, got {split!r}")
        self.world = ToyWorld(seed=world_seed)
        self.path, self.kind, self.split, self.images_per_prompt = path, kind, split, images_per_prompt
        self.harmful_fraction = harmful_fraction
        self.pairing, self.delta, self.w_q, self.w_s = pairing, delta, w_q, w_s
        self.stats: dict[str, int] = {}

    def prompts(self, which: str) -> list[Prompt]:
        return self.world.split[f"{self.split}_{which}"]

    def read(self) -> list[PreferencePair]:
        pairs: list[PreferencePair] = []
        seeds = range(self.images_per_prompt)
        if self.kind == "scp":
            def part(kind: str) -> ToyReader:
                return ToyReader(kind=kind, split=self.split, images_per_prompt=self.images_per_prompt,
                                 world_seed=self.world.seed)
            mixed = MixedReader(harmful=part("pairs"), clean=part("clean_pairs"),
                                harmful_fraction=self.harmful_fraction, seed=self.world.seed)
            pairs = mixed.read()
            self.stats = mixed.stats
            return pairs
        if self.kind == "dual":
            groups = self.annotated()
            pairs = preference_pairs(groups, self.pairing, self.delta, self.w_q, self.w_s)
            self.stats = {"groups": len(groups), "images": sum(len(g.images) for g in groups), "pairs": len(pairs)}
            return pairs
        if self.kind == "images":
            for prompt in self.prompts("benign") + self.prompts("harmful"):
                for seed in seeds:
                    pairs.append(PreferencePair(prompt=prompt.text, image_w=png_bytes(self.world.render(prompt, seed)),
                                                categories=prompt.categories, source=f"toy {prompt.text} seed {seed}"))
        elif self.kind == "clean_pairs":
            for prompt in self.prompts("benign"):
                for seed in seeds:
                    worse = degraded(prompt, seed)
                    pairs.append(PreferencePair(
                        prompt=prompt.text, image_w=png_bytes(self.world.render(prompt, seed)),
                        image_l=png_bytes(self.world.render(worse, seed)), source=f"toy clean {prompt.text} seed {seed}"))
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

    def annotated(self) -> list[AnnotatedPrompt]:
        """The dual-annotated groups of ``kind=dual``, scored by the exact oracles: one group per
        (prompt, seed), its candidates rendered with the same jitter (like generations from one initial
        noise), so a pair differs in content only."""
        groups: list[AnnotatedPrompt] = []
        for prompt in self.prompts("harmful") + self.prompts("benign"):
            content = prompt.safe_rewrite() if prompt.harmful else prompt
            for seed in range(self.images_per_prompt):
                shown = [prompt] + ([content] if prompt.harmful else []) + [degraded(content, seed)]
                images = [self.world.render(v, seed) for v in shown]
                arrays = toy_oracle.to_uint8_array(images)
                quality = toy_oracle.fidelity([prompt.text] * len(images), arrays)
                unsafe = toy_oracle.harm_probability(arrays)
                groups.append(AnnotatedPrompt(prompt.text, safe_prompt=content.text if prompt.harmful else None, images=[
                    # categories are the prompt's, as task=build_dual records them, whatever an image shows
                    AnnotatedImage(png_bytes(image), float(q), float(s), prompt.categories, f"toy {v.text} seed {seed}")
                    for image, q, s, v in zip(images, quality, unsafe, shown)]))
        return groups

    def __repr__(self) -> str:
        return f"ToyReader(kind={self.kind!r}, split={self.split!r})"
