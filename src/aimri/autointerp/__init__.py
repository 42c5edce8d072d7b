"""Autointerpretability: explainers that label features and scorers that measure the labels on held-out examples.

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.autointerp.config import LabelConfig
    from aimri.autointerp.label import label_atlas, label_features, select_features
    from aimri.autointerp.llm import ChatClient, HFChat
    from aimri.autointerp.report import compare_atlases

__all__ = [
    "ChatClient",
    "HFChat",
    "LabelConfig",
    "compare_atlases",
    "label_atlas",
    "label_features",
    "select_features",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "LabelConfig": ".config",
        "label_atlas": ".label",
        "label_features": ".label",
        "select_features": ".label",
        "compare_atlases": ".report",
        "ChatClient": ".llm",
        "HFChat": ".llm",
    },
)
