"""SCP-style mixed data (docs/methods/scdpo.md): safety pairs under harmful prompts and quality pairs under clean
prompts, at a configured ratio. Any two readers combine; the DataModule sees one list of pairs."""
from __future__ import annotations

import logging
import random
from typing import Any, Mapping

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from common.errors import InputError
from data.pairs import PreferencePair
from data.readers.base import PairReader

log = logging.getLogger(__name__)


def nested_reader(reader: PairReader | Mapping[str, Any], role: str) -> PairReader:
    """A reader, or built here from its config (``data=scp`` passes them unbuilt, ``_recursive_: false``) so
    that its errors name its own key, ``data.reader.<role>.path``."""
    if isinstance(reader, PairReader):
        return reader

    try:
        return instantiate(reader, key=f"data.reader.{role}.path")
    except InstantiationException as err:
        if isinstance(err.__cause__, InputError):
            raise err.__cause__ from None
        raise


class MixedReader(PairReader):
    """``harmful_fraction`` of the result comes from ``harmful``; the clean pairs are subsampled, or
    repeated when there are too few, deterministically from ``seed``."""
    def __init__(self, path: str | None = None, *, harmful: PairReader | Mapping[str, Any],
                 clean: PairReader | Mapping[str, Any],
                 harmful_fraction: float = 0.5, seed: int = 0) -> None:
        if not 0.0 < harmful_fraction <= 1.0:
            raise InputError(f"data.reader.harmful_fraction: expected a number in (0, 1], got {harmful_fraction}")
        self.path, self.harmful, self.clean = path, nested_reader(harmful, "harmful"), nested_reader(clean, "clean")
        self.harmful_fraction, self.seed = harmful_fraction, seed
        self.world = getattr(self.harmful, "world", None)  # the toy report evaluates on the toy world, if that is the source
        self.kind = "pairs"
        self.stats: dict[str, int] = {}

    def read(self) -> list[PreferencePair]:
        harmful, clean = self.harmful.read(), self.clean.read()
        if not harmful:
            raise InputError(f"{self.harmful}: no harmful pairs to mix")
        want = round(len(harmful) * (1 - self.harmful_fraction) / self.harmful_fraction)
        if want and not clean:
            raise InputError(f"{self.clean}: no clean pairs to mix (harmful_fraction={self.harmful_fraction})")
        rng = random.Random(self.seed)
        order = list(range(len(clean)))
        rng.shuffle(order)
        picked = [clean[order[i % len(order)]] for i in range(want)] if want else []
        self.stats = {"harmful_pairs": len(harmful), "clean_pairs": len(picked), "clean_available": len(clean)}
        log.info("mixed data: %d harmful + %d clean pairs (from %d)", len(harmful), len(picked), len(clean))
        return harmful + picked

    def __repr__(self) -> str:
        return f"MixedReader(harmful={self.harmful!r}, clean={self.clean!r}, harmful_fraction={self.harmful_fraction})"
