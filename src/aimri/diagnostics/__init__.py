"""Diagnostics: anatomy, probes, refusal, model diffing, organisms, the checkup and the sealed holdout.

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.diagnostics.checkup import run_checkup
    from aimri.diagnostics.findings import Finding
    from aimri.diagnostics.holdout import Holdout, seal
    from aimri.diagnostics.organisms import ORGANISMS, build_organism
    from aimri.diagnostics.probes import Probe, train_probe

__all__ = [
    "ORGANISMS",
    "Finding",
    "Holdout",
    "Probe",
    "build_organism",
    "run_checkup",
    "seal",
    "train_probe",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "run_checkup": ".checkup",
        "Finding": ".findings",
        "train_probe": ".probes",
        "Probe": ".probes",
        "ORGANISMS": ".organisms",
        "build_organism": ".organisms",
        "Holdout": ".holdout",
        "seal": ".holdout",
    },
)
