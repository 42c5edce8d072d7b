"""Sparse dictionaries: SAEs, transcoders (and, to come, crosscoders); training, formats."""

from aimri.dictionaries import architectures as architectures  # registers the architectures
from aimri.dictionaries.base import ARCHITECTURES, Dictionary, DictionaryConfig, build
from aimri.dictionaries.formats import load_dictionary, save_dictionary
from aimri.dictionaries.train import TrainConfig, Trainer, fit

__all__ = [
    "ARCHITECTURES",
    "Dictionary",
    "DictionaryConfig",
    "TrainConfig",
    "Trainer",
    "build",
    "fit",
    "load_dictionary",
    "save_dictionary",
]
