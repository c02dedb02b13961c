"""Alignment objectives: pure loss math on per-sample errors, and (later) adapter merging."""
from alignment.base import Objective, ObjectiveOutput, PairErrors
from alignment.dpo import DPO
from alignment.sft import SFT

__all__ = ["Objective", "ObjectiveOutput", "PairErrors", "DPO", "SFT"]
