"""Circuits: the local replacement model, attribution graphs, pruning, interventions and graph export.

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.circuits.attribution import Graph, attribute
    from aimri.circuits.config import TraceConfig
    from aimri.circuits.intervene import Change, intervene
    from aimri.circuits.pipeline import Traced, trace_prompt
    from aimri.circuits.prune import prune
    from aimri.circuits.replacement import ReplacementModel, load_transcoders

__all__ = [
    "Change",
    "Graph",
    "ReplacementModel",
    "TraceConfig",
    "Traced",
    "attribute",
    "intervene",
    "load_transcoders",
    "prune",
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
        "prune": ".prune",
        "intervene": ".intervene",
        "Change": ".intervene",
    },
)
