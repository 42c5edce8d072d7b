"""Sparse dictionaries: SAEs, transcoders and crosscoders; training, evaluation, formats.

The names below are exported lazily (`import aimri.dictionaries` imports no torch); the built-in
architectures are registered whenever one is needed (`build`, `load_dictionary`, `ARCHITECTURES`).
Training settings live in the torch-free `aimri.dictionaries.config`."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.dictionaries.architectures import ARCHITECTURES
    from aimri.dictionaries.base import Dictionary, DictionaryConfig, build
    from aimri.dictionaries.config import TrainConfig
    from aimri.dictionaries.formats import load_dictionary, save_dictionary
    from aimri.dictionaries.train import Trainer, fit

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
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"ARCHITECTURES": ".architectures", "Dictionary": ".base", "DictionaryConfig": ".base", "build": ".base",
     "TrainConfig": ".config", "load_dictionary": ".formats", "save_dictionary": ".formats", "Trainer": ".train",
     "fit": ".train"},
)  # fmt: skip
