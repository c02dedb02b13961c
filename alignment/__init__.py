"""Alignment objectives: pure loss math on per-sample errors (and the cost model's losses)."""
from alignment.base import Objective, ObjectiveOutput, PairErrors
from alignment.dpo import DPO
from alignment.scdpo import SCDPO
from alignment.sft import SFT
from alignment.spo import SPO

__all__ = ["DPO", "SCDPO", "SFT", "SPO", "Objective", "ObjectiveOutput", "PairErrors"]
