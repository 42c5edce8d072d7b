"""Corpora, packing, the ActivationStore and harvesting (activation caching).

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.data.corpus import Corpus, Packing, pack
    from aimri.data.default_corpus import build_default_corpus, default_corpus_path
    from aimri.data.store import ActivationStore

__all__ = [
    "ActivationStore",
    "Corpus",
    "Packing",
    "build_default_corpus",
    "default_corpus_path",
    "pack",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Corpus": ".corpus",
        "Packing": ".corpus",
        "pack": ".corpus",
        "ActivationStore": ".store",
        "default_corpus_path": ".default_corpus",
        "build_default_corpus": ".default_corpus",
    },
)
