"""Treatment: edits of the weights derived from a checkup's findings (direction ablation, feature ablation, a
CAFT repair fine-tune), written as standard Hugging Face model directories, then re-scanned
(`aimri.report.treat_and_rescan`, `mri treat`)."""

from aimri.treatment.apply import METHODS, TreatConfig, treat
from aimri.treatment.caft import repair
from aimri.treatment.edits import (
    TreatmentError,
    WeightEdit,
    ablate_direction,
    ablate_neurons,
    feature_ablation,
    hook_ablation,
)
from aimri.treatment.mechanism import Mechanism, Scan, choose_direction, mechanism_of

__all__ = [
    "METHODS",
    "Mechanism",
    "Scan",
    "TreatConfig",
    "TreatmentError",
    "WeightEdit",
    "ablate_direction",
    "ablate_neurons",
    "choose_direction",
    "feature_ablation",
    "hook_ablation",
    "mechanism_of",
    "repair",
    "treat",
]
