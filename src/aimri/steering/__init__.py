"""Steering: clamp / add / ablate features and directions while a Subject runs or generates.

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.steering.generate import compare
    from aimri.steering.interventions import DirectionEdit, FeatureEdit, ablate
    from aimri.steering.specs import FeatureSpec, load_vector, parse_feature_spec, resolve_feature, save_vector
    from aimri.steering.tradeoff import sweep, sweep_feature

__all__ = [
    "DirectionEdit",
    "FeatureEdit",
    "FeatureSpec",
    "ablate",
    "compare",
    "load_vector",
    "parse_feature_spec",
    "resolve_feature",
    "save_vector",
    "sweep",
    "sweep_feature",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "FeatureEdit": ".interventions",
        "DirectionEdit": ".interventions",
        "ablate": ".interventions",
        "FeatureSpec": ".specs",
        "resolve_feature": ".specs",
        "parse_feature_spec": ".specs",
        "load_vector": ".specs",
        "save_vector": ".specs",
        "compare": ".generate",
        "sweep": ".tradeoff",
        "sweep_feature": ".tradeoff",
    },
)
