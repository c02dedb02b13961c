"""Readers that turn a data source into :class:`~data.pairs.PreferencePair` records."""
from data.readers.base import PairReader
from data.readers.coprov2 import CoProV2Reader
from data.readers.jsonl import JsonlReader
from data.readers.pickapic import PickAPicReader

__all__ = ["PairReader", "CoProV2Reader", "JsonlReader", "PickAPicReader"]
