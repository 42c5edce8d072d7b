"""Interventions: edits to a forward pass, applied through taps, that turn a feature or a direction up,
down or off.

Feature edits keep the dictionary's error term: only the feature's share of the activation changes,
x + (c - a_i)·W_dec[i] with a_i the feature's current code, so whatever the dictionary fails to
reconstruct passes through untouched. All feature edits on one dictionary read their codes from the
same unedited activation. Each intervention acts at the positions it names: "all", "prompt",
"generated", or explicit absolute positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from aimri.dictionaries.base import Dictionary
from aimri.dictionaries.match import check_model, check_revision
from aimri.errors import AimriError
from aimri.subject.core import Subject
from aimri.subject.taps import Edit, Positions

Where: TypeAlias = "Literal['all', 'prompt', 'generated'] | Sequence[int]"


class SteeringError(AimriError):
    """An intervention that cannot be applied as asked."""


@dataclass
class FeatureEdit:
    """Set feature `feature` of `dictionary` to `value` ("clamp"; 0 = ablate), multiply its current
    activation by `value` ("scale"), or add `value` times its decoder direction ("add")."""

    dictionary: Dictionary
    feature: int
    value: float
    mode: Literal["clamp", "add", "scale"] = "clamp"
    where: Where = "all"

    def describe(self) -> str:
        what = f"{self.dictionary.cfg.site}#{self.feature}"
        return f"{what}={ {'add': '+', 'scale': 'x', 'clamp': ''}[self.mode] }{self.value:g}"


@dataclass
class DirectionEdit:
    """At `site`: add `strength`·vector ("add"), or set the component along the vector's unit direction
    to `mean` ("ablate"; mean 0 = project it out, as Arditi et al. do with the refusal direction)."""

    site: str
    vector: Tensor
    strength: float = 1.0
    mode: Literal["add", "ablate"] = "add"
    mean: float = 0.0
    where: Where = "all"
    # the model the direction was found in, where its file records it (safetensors metadata): checked like a
    # dictionary's (another model's direction is refused unless the transfer is asked for)
    model_name: str = ""
    model_revision: str = ""

    def describe(self) -> str:
        return f"{self.site}:{self.mode}{'' if self.mode == 'ablate' else f'×{self.strength:g}'}"


Intervention: TypeAlias = "FeatureEdit | DirectionEdit"


def ablate(dictionary: Dictionary, feature: int, where: Where = "all") -> FeatureEdit:
    return FeatureEdit(dictionary, feature, 0.0, "clamp", where)


def _positions(where: Where, prompt_len: int | None) -> Positions:
    if isinstance(where, str):
        if where == "all":
            return None
        if where not in ("prompt", "generated"):
            raise SteeringError(f"unknown positions {where!r}: use all, prompt, generated or a list of positions")
        if prompt_len is None:
            raise SteeringError(f"positions {where!r} need the prompt length: steer through aimri.steering.generate")
        return slice(0, prompt_len) if where == "prompt" else slice(prompt_len, None)
    return list(where)


def _check_finite(x: Tensor, what: str, site: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        half = x.dtype in (torch.float16, torch.bfloat16)
        limit = f" (the model computes in {str(x.dtype).removeprefix('torch.')}, largest value {torch.finfo(x.dtype).max:g})"
        raise SteeringError(f"{what} produced NaN/inf activations at {site}{limit if half else ''}; lower its strength")
    return x


def _check(subject: Subject, interventions: Sequence[Intervention], allow_other_model: bool = False) -> None:
    seen: dict[tuple[int, int], str] = {}
    for iv in interventions:
        if isinstance(iv, DirectionEdit):
            dim = subject.site_dim(iv.site)
            if iv.vector.shape != (dim,):
                raise SteeringError(
                    f"a direction of shape {tuple(iv.vector.shape)} cannot edit {iv.site} (width {dim}); give a [{dim}] vector"
                )
            if iv.mode == "ablate" and float(iv.vector.norm()) == 0:
                raise SteeringError(f"cannot ablate a zero vector at {iv.site}")
            if not bool(torch.isfinite(iv.vector).all()) or not torch.isfinite(torch.tensor(iv.strength)):
                raise SteeringError(f"the direction or strength for {iv.site} is NaN/inf")
            try:
                check_revision(f"the direction for {iv.site} was found in", iv.model_name, iv.model_revision,
                               subject.name, subject.revision, allow_other_model)  # fmt: skip
            except AimriError as err:
                raise SteeringError(str(err)) from None
            continue
        cfg = iv.dictionary.cfg
        if not cfg.site:
            raise SteeringError("the dictionary records no site; load it with load_dictionary(path, site=...)")
        subject.site(cfg.site)  # a site the model lacks raises SiteError here
        if cfg.site_out:
            subject.site(cfg.site_out)
        try:
            check_model(cfg, subject, allow_other_model, f"the dictionary of {iv.describe()}")
        except AimriError as err:
            raise SteeringError(str(err)) from None
        if not 0 <= iv.feature < cfg.d_sae:
            raise SteeringError(f"feature {iv.feature} is outside the dictionary (0..{cfg.d_sae - 1})")
        if not torch.isfinite(torch.tensor(iv.value)):
            raise SteeringError(f"the value for feature {iv.feature} is NaN/inf")
        key = (id(iv.dictionary), iv.feature)
        if key in seen:
            raise SteeringError(
                f"feature {cfg.site}#{iv.feature} is given twice ({seen[key]} and {iv.describe()}); give one "
                "intervention per feature"
            )
        seen[key] = iv.describe()


def _direction_fn(iv: DirectionEdit) -> Callable[[Tensor], Tensor]:
    what = iv.describe()
    if iv.mode == "add":
        shift = iv.strength * iv.vector

        def add(x: Tensor) -> Tensor:
            return _check_finite(x + shift.to(x), what, iv.site)

        return add
    unit = iv.vector / iv.vector.norm()

    def ablate_(x: Tensor) -> Tensor:
        # in fp32, rounded once to the model's dtype: a bf16 projection would leave a part of the direction behind
        xf, u = x.float(), unit.to(x.device, torch.float32)
        return _check_finite((xf - ((xf @ u) - iv.mean)[..., None] * u).to(x.dtype), what, iv.site)

    return ablate_


def _feature_edits(dictionary: Dictionary, group: list[FeatureEdit], prompt_len: int | None) -> list[Edit]:
    """One dictionary's feature edits. Codes are read from the input site once per forward, before any of
    these edits; each adds its delta·W_dec[i] at its own positions at the dictionary's output site (the
    input site for an SAE, the MLP output for a transcoder), times the token's output scale for an SAE that
    normalises its input (SAELens' normalize_activations: `Dictionary.normalisation`)."""
    cfg = dictionary.cfg
    site_out = cfg.site_out or cfg.site
    features = torch.tensor([iv.feature for iv in group], device=dictionary.W_enc.device)
    state: dict[str, Tensor] = {}

    def read_input(x: Tensor) -> Tensor:
        with torch.no_grad():
            xd = x.to(dictionary.W_enc)  # the dictionary computes in its own dtype
            state["codes"] = dictionary.encode(xd)[..., features]
            norm = dictionary.normalisation(xd)  # a normalising SAE decodes in a per-token scale
            state["scale_out"] = norm[2] if norm is not None else torch.ones((), dtype=xd.dtype)
        return x

    edits = [Edit(cfg.site, read_input)]  # first at its site, so every edit below sees unedited codes
    for j, iv in enumerate(group):
        direction = dictionary.W_dec[iv.feature].detach()

        def edit(x: Tensor, j: int = j, iv: FeatureEdit = iv, direction: Tensor = direction) -> Tensor:
            current = state["codes"][..., j]
            if iv.mode == "clamp":
                delta = iv.value - current
            elif iv.mode == "scale":
                delta = (iv.value - 1.0) * current
            else:
                delta = torch.full_like(current, iv.value)
            step = delta[..., None] * direction * state["scale_out"]  # W_dec[i] in x's scale (normalising SAEs)
            return _check_finite(x + step.to(x), iv.describe(), site_out)

        edits.append(Edit(site_out, edit, _positions(iv.where, prompt_len)))
    return edits


def to_edits(
    subject: Subject, interventions: Sequence[Intervention], prompt_len: int | None = None,
    allow_other_model: bool = False,
) -> list[Edit]:  # fmt: skip
    """Tap edits for a list of interventions, after checking them against the subject: a feature's dictionary
    must have been trained on this model (aimri.dictionaries.match.check_model; `allow_other_model` for a
    deliberate transfer)."""
    _check(subject, interventions, allow_other_model)
    edits: list[Edit] = []
    groups: dict[int, list[FeatureEdit]] = {}
    for iv in interventions:
        if isinstance(iv, DirectionEdit):
            edits.append(Edit(iv.site, _direction_fn(iv), _positions(iv.where, prompt_len)))
        else:
            groups.setdefault(id(iv.dictionary), []).append(iv)
    for group in groups.values():
        edits += _feature_edits(group[0].dictionary, group, prompt_len)
    return edits
