"""Interventions on a graph's features in the real model: set or scale transcoder features at chosen
positions (error terms kept, downstream computed for real) and read the new top logits — the check that
a graph's story is causal."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from aimri.dictionaries.base import Dictionary
from aimri.errors import AimriError
from aimri.steering.interventions import FeatureEdit, to_edits
from aimri.subject.core import Subject

_SPEC = re.compile(r"^(?P<layer>\d+)/(?P<index>\d+)(?:@(?P<pos>[\d,]+))?=(?P<scale>x)?(?P<value>-?[\d.]+(?:e-?\d+)?)$")


@dataclass
class Change:
    layer: int
    index: int
    positions: list[int] | None  # None: every position
    mode: str  # "scale" or "set"
    value: float


def parse_change(spec: str) -> Change:
    """LAYER/INDEX[@POS,POS]=VALUE (set) or =xFACTOR (scale), e.g. 12/3041@5=x-2."""
    m = _SPEC.match(spec.replace(" ", ""))
    if m is None:
        raise AimriError(f"--intervene {spec!r}: write LAYER/FEATURE[@POS,...]=VALUE or =xFACTOR, e.g. 12/3041@5=x-2")
    positions = [int(p) for p in m["pos"].split(",")] if m["pos"] else None
    return Change(int(m["layer"]), int(m["index"]), positions, "scale" if m["scale"] else "set", float(m["value"]))


def top_logits(logits: torch.Tensor, tokenizer: object, k: int = 5) -> list[tuple[str, float]]:
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(k)
    decode = getattr(tokenizer, "decode", None)
    return [(decode([int(i)]) if decode else str(int(i)), float(v)) for v, i in zip(values, ids, strict=True)]


def intervene(
    subject: Subject, transcoders: dict[int, Dictionary], ids: list[int], changes: list[Change], k: int = 5
) -> dict[str, list[tuple[str, float]]]:
    """Top-k next-token predictions before and after the changes."""
    merged: dict[tuple[int, int], Change] = {}
    for c in changes:
        if c.layer not in transcoders:
            raise AimriError(f"intervention: no transcoder for layer {c.layer}")
        if not 0 <= c.index < transcoders[c.layer].cfg.d_sae:
            raise AimriError(
                f"intervention: feature {c.index} is outside layer {c.layer}'s transcoder (0..{transcoders[c.layer].cfg.d_sae - 1})"
            )
        for p in c.positions or []:
            if not 0 <= p < len(ids):
                raise AimriError(f"intervention: position {p} is outside the prompt (0..{len(ids) - 1})")
        key = (c.layer, c.index)
        if key in merged:
            old = merged[key]
            if (old.mode, old.value) != (c.mode, c.value) or old.positions is None or c.positions is None:
                raise AimriError(f"intervention: feature {c.layer}/{c.index} is given twice with different changes")
            old.positions = sorted(set(old.positions) | set(c.positions))
        else:
            merged[key] = Change(c.layer, c.index, c.positions, c.mode, c.value)
    edits = [
        FeatureEdit(
            transcoders[c.layer],
            c.index,
            c.value,
            "scale" if c.mode == "scale" else "clamp",
            "all" if c.positions is None else c.positions,
        )
        for c in merged.values()
    ]
    batch = torch.tensor([ids])
    before = subject.run(batch, stop=False)["logits"][0, -1]
    after = subject.run(batch, edit=to_edits(subject, edits), stop=False)["logits"][0, -1]
    return {"before": top_logits(before, subject.tokenizer, k), "after": top_logits(after, subject.tokenizer, k)}
