"""Steering specs: typed (`FeatureSpec`, `DirectionSpec`) for Python and the console, and the CLI's strings
parsed into them. Resolving a spec against its dictionary and atlas happens once, in `resolve_feature`,
whatever the front end; its errors speak of the spec's fields, not of a flag.

--feature SITE/DICT#ID=VALUE      VALUE: x8 (clamp to 8 × the feature's max activation, from its
                                  atlas), 12.5 (clamp to 12.5), +4 (add 4 × its decoder row),
                                  off (ablate). SITE/ may be left out: the dictionary records it.
--direction SITE=FILE@STRENGTH    add STRENGTH × the vector in FILE (.npy or .safetensors)
--direction SITE=FILE@ablate      project the vector's direction out
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from aimri.dictionaries.base import Dictionary
from aimri.errors import AimriError
from aimri.paths import atomic_write_bytes
from aimri.run import Run
from aimri.steering.interventions import DirectionEdit, FeatureEdit, SteeringError, Where
from aimri.subject.sites import KINDS

_KIND = "|".join(re.escape(kind) for kind in KINDS)
_FEATURE = re.compile(rf"^(?:(?P<site>(?:{_KIND})\.-?\d+)/)?(?P<dict>.+)#(?P<id>-?\d+)=(?P<value>\S+)$")


FeatureMode = Literal["times_max", "clamp", "add", "off"]


@dataclass(frozen=True)
class FeatureSpec:
    """A feature edit before it is resolved: which feature of which dictionary, and how.

    mode: "times_max" clamps to `value` × the feature's max activation (from its atlas), "clamp" to `value`,
    "add" adds `value` × its decoder row, "off" ablates it (value ignored). site: the Site the user expects
    the dictionary to read (checked against the dictionary's own; None = take the dictionary's)."""

    dictionary: Path
    feature: int
    mode: FeatureMode
    value: float = 0.0
    site: str | None = None

    def __str__(self) -> str:
        value = {"times_max": f"x{self.value:g}", "clamp": f"{self.value:g}", "add": f"+{self.value:g}", "off": "off"}
        return f"{self.site + '/' if self.site else ''}{self.dictionary}#{self.feature}={value[self.mode]}"


@dataclass
class FeatureChoice:
    """A resolved feature spec: the edit, the feature's max activation (its atlas's, if any) and its label."""

    edit: FeatureEdit
    max_act: float | None
    label: str
    atlas: Path | None


def _atlas_info(atlas_path: Path | None, dictionary: Dictionary, feature: int) -> tuple[float | None, str, Path | None]:
    from aimri.atlas.db import Atlas

    if atlas_path is None or not atlas_path.is_file():
        return None, "", None
    atlas = Atlas(atlas_path)
    atlas.check_dictionary(dictionary)
    card = atlas.card(feature, n_top=0)
    label = next((lab["label"] for lab in reversed(card["labels"]) if lab["label"]), "")
    return float(card["max_act"] or 0.0) or None, label, atlas_path


def resolve_feature(
    spec: FeatureSpec, where: Where = "all", atlas: Path | None = None, cache: dict[Path, Dictionary] | None = None
) -> FeatureChoice:
    """The edit a spec asks for: the dictionary loaded (once per folder, through `cache`), the site and the
    feature's range checked, a multiple of the max activation read from the atlas (`atlas`, default
    DICTIONARY/atlas.sqlite, checked to be this dictionary's).

    Raises SteeringError naming what is wrong: another site, a feature out of range, no atlas for a multiple."""
    from aimri.dictionaries import load_dictionary

    path, feature = Path(spec.dictionary), spec.feature
    cache = {} if cache is None else cache
    if path not in cache:
        cache[path] = load_dictionary(path, site=spec.site or "")
    dictionary = cache[path]
    if spec.site and dictionary.cfg.site and spec.site != dictionary.cfg.site:
        raise SteeringError(f"feature {spec}: {path} was trained on {dictionary.cfg.site}, not {spec.site}")
    if not 0 <= feature < dictionary.cfg.d_sae:
        raise SteeringError(
            f"feature {spec}: feature {feature} is outside the dictionary (0..{dictionary.cfg.d_sae - 1})"
        )
    max_act, label, atlas_used = _atlas_info(atlas or Run.atlas_of(path), dictionary, feature)
    if spec.mode == "off":
        edit = FeatureEdit(dictionary, feature, 0.0, "clamp", where)
    elif spec.mode == "times_max":
        if max_act is None:
            raise SteeringError(
                f"feature {spec}: x{spec.value:g} is a multiple of the feature's max activation, which comes from "
                f"its atlas; build one (`mri atlas {path}`), give `atlas`, or give an absolute value (=12.5)"
            )
        edit = FeatureEdit(dictionary, feature, spec.value * max_act, "clamp", where)
    else:
        edit = FeatureEdit(dictionary, feature, spec.value, spec.mode, where)
    return FeatureChoice(edit, max_act, label, atlas_used)


def parse_feature_spec(text: str) -> FeatureSpec:
    """SITE/DICT#ID=VALUE (the CLI's --feature) as a FeatureSpec. Raises SteeringError on a malformed spec."""
    m = _FEATURE.match(text)
    if m is None:
        raise SteeringError(f"--feature {text!r}: write SITE/DICTIONARY#ID=VALUE, e.g. resid.15/runs/sae#812=x8")
    value = m["value"]
    try:
        if value == "off":
            mode, number = "off", 0.0
        elif value.startswith("x"):
            mode, number = "times_max", float(value[1:])
        elif value.startswith("+"):
            mode, number = "add", float(value[1:])
        else:
            mode, number = "clamp", float(value)
    except ValueError:
        raise SteeringError(f"--feature {text!r}: the value must be x<multiple>, <number>, +<number> or off") from None
    return FeatureSpec(Path(m["dict"]), int(m["id"]), mode, number, m["site"])  # type: ignore[arg-type]


def parse_feature(
    spec: str, where: Where = "all", atlas: Path | None = None, cache: dict[Path, Dictionary] | None = None
) -> FeatureChoice:
    """The CLI's --feature string, parsed and resolved (`resolve_feature(parse_feature_spec(spec), ...)`)."""
    return resolve_feature(parse_feature_spec(spec), where, atlas, cache)


def load_vector(path: Path) -> Tensor:
    """A direction from .npy or .safetensors (the single tensor, or the one named "direction")."""
    if not path.is_file():
        raise AimriError(f"{path} does not exist")
    try:
        if path.suffix == ".npy":
            vector = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1 and "direction" not in tensors:
                raise AimriError(f"{path} holds {sorted(tensors)}; name the direction tensor 'direction'")
            vector = (tensors["direction"] if "direction" in tensors else next(iter(tensors.values()))).float()
        else:
            raise AimriError(f"{path}: give a direction as .npy or .safetensors")
    except (ValueError, OSError) as err:
        raise AimriError(f"{path} is not a readable vector file ({err})") from None
    return vector.reshape(-1)


def vector_model(path: Path) -> tuple[str, str]:
    """The model a direction file records it was found in: (model_name, model_revision) from a .safetensors
    file's metadata (as `save_vector` writes it); ("", "") for a .npy file or none recorded."""
    if path.suffix != ".safetensors":
        return "", ""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return meta.get("model_name", ""), meta.get("model_revision", "")


def save_vector(vector: Tensor, path: Path, subject: Any = None) -> Path:
    """Write a direction [d] as .safetensors (tensor "direction"), recording the Subject it was found in so
    steering another model with it is refused (temp file, rename)."""
    from safetensors.torch import save

    meta = {"model_name": subject.name, "model_revision": subject.revision} if subject is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"direction": vector.detach().float().reshape(-1).contiguous()}, metadata=meta))
    return path


def parse_direction(spec: str, where: Where = "all") -> DirectionEdit:
    site, eq, rest = spec.partition("=")
    file, _, strength = rest.rpartition("@") if "@" in rest else (rest, "", "1")
    if not eq or not file:
        raise SteeringError(f"--direction {spec!r}: write SITE=FILE@STRENGTH or SITE=FILE@ablate")
    vector, (name, revision) = load_vector(Path(file)), vector_model(Path(file))
    if strength == "ablate":
        return DirectionEdit(site, vector, mode="ablate", where=where, model_name=name, model_revision=revision)
    try:
        return DirectionEdit(site, vector, float(strength), where=where, model_name=name, model_revision=revision)
    except ValueError:
        raise SteeringError(f"--direction {spec!r}: the strength must be a number or 'ablate'") from None
