"""Intervention specs as the CLI takes them, resolved against a Subject.

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

import numpy as np
import torch
from torch import Tensor

from aimri.dictionaries.base import Dictionary
from aimri.errors import AimriError
from aimri.steering.interventions import DirectionEdit, FeatureEdit, SteeringError, Where
from aimri.subject.sites import KINDS

_KIND = "|".join(re.escape(kind) for kind in KINDS)
_FEATURE = re.compile(rf"^(?:(?P<site>(?:{_KIND})\.-?\d+)/)?(?P<dict>.+)#(?P<id>-?\d+)=(?P<value>\S+)$")


@dataclass
class FeatureChoice:
    """A resolved --feature: the edit, the feature's max activation (its atlas's, if any) and its label."""

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


def parse_feature(
    spec: str, where: Where = "all", atlas: Path | None = None, cache: dict[Path, Dictionary] | None = None
) -> FeatureChoice:
    from aimri.dictionaries import load_dictionary

    m = _FEATURE.match(spec)
    if m is None:
        raise SteeringError(f"--feature {spec!r}: write SITE/DICTIONARY#ID=VALUE, e.g. resid.15/runs/sae#812=x8")
    path, feature, value = Path(m["dict"]), int(m["id"]), m["value"]
    cache = {} if cache is None else cache
    if path not in cache:
        cache[path] = load_dictionary(path, site=m["site"] or "")
    dictionary = cache[path]
    if m["site"] and dictionary.cfg.site and m["site"] != dictionary.cfg.site:
        raise SteeringError(f"--feature {spec!r}: {path} was trained on {dictionary.cfg.site}, not {m['site']}")
    if not 0 <= feature < dictionary.cfg.d_sae:
        raise SteeringError(
            f"--feature {spec!r}: feature {feature} is outside the dictionary (0..{dictionary.cfg.d_sae - 1})"
        )
    max_act, label, atlas_used = _atlas_info(atlas or path / "atlas.sqlite", dictionary, feature)
    try:
        if value == "off":
            edit = FeatureEdit(dictionary, feature, 0.0, "clamp", where)
        elif value.startswith("x"):
            if max_act is None:
                raise SteeringError(
                    f"--feature {spec!r}: {value} is a multiple of the feature's max activation, which comes from its "
                    f"atlas; build one (`mri atlas {path}`), pass --atlas, or give an absolute value (=12.5)"
                )
            edit = FeatureEdit(dictionary, feature, float(value[1:]) * max_act, "clamp", where)
        elif value.startswith("+"):
            edit = FeatureEdit(dictionary, feature, float(value[1:]), "add", where)
        else:
            edit = FeatureEdit(dictionary, feature, float(value), "clamp", where)
    except ValueError:
        raise SteeringError(f"--feature {spec!r}: the value must be x<multiple>, <number>, +<number> or off") from None
    return FeatureChoice(edit, max_act, label, atlas_used)


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


def parse_direction(spec: str, where: Where = "all") -> DirectionEdit:
    site, eq, rest = spec.partition("=")
    file, _, strength = rest.rpartition("@") if "@" in rest else (rest, "", "1")
    if not eq or not file:
        raise SteeringError(f"--direction {spec!r}: write SITE=FILE@STRENGTH or SITE=FILE@ablate")
    vector = load_vector(Path(file))
    if strength == "ablate":
        return DirectionEdit(site, vector, mode="ablate", where=where)
    try:
        return DirectionEdit(site, vector, float(strength), where=where)
    except ValueError:
        raise SteeringError(f"--direction {spec!r}: the strength must be a number or 'ablate'") from None
