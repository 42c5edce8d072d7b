"""Circuits: the local replacement model, attribution graphs, pruning, interventions and graph export.

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.circuits.attribution import Graph, attribute
    from aimri.circuits.config import TraceConfig
    from aimri.circuits.intervene import Change
    from aimri.circuits.pipeline import Traced, trace_prompt
    from aimri.circuits.replacement import ReplacementModel, load_transcoders

__all__ = [
    "Change",
    "Graph",
    "ReplacementModel",
    "TraceConfig",
    "Traced",
    "attribute",
    "load_transcoders",
    "trace_prompt",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "TraceConfig": ".config",
        "trace_prompt": ".pipeline",
        "Traced": ".pipeline",
        "attribute": ".attribution",
        "Graph": ".attribution",
        "ReplacementModel": ".replacement",
        "load_transcoders": ".replacement",
        "Change": ".intervene",
    },
)
