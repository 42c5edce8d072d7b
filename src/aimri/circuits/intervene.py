"""Interventions on a graph's features in the real model: set or scale transcoder features at chosen
positions (error terms kept, downstream computed for real) and read the new top logits — the check that
a graph's story is causal."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from aimri.circuits.replacement import Transcoders
from aimri.dictionaries.clt import CrossLayerTranscoder
from aimri.errors import AimriError
from aimri.steering.interventions import FeatureEdit, to_edits
from aimri.subject.core import Subject
from aimri.subject.taps import Edit

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


def _clt_edits(clt: CrossLayerTranscoder, changes: list[Change]) -> list[Edit]:
    """A CLT feature changed at its layer L changes what it writes to every layer T >= L: at T's MLP output,
    (new - current activation) x its decoder to T is added, the activation read from the MLP input at L of this
    very pass (so earlier changes propagate); the error terms stay as the model computes them."""
    deltas: dict[int, torch.Tensor] = {}  # change i -> (new - current activation) [batch, seq]
    layers = sorted({c.layer for c in changes})

    def record(layer: int):  # type: ignore[no-untyped-def]
        def fn(x: torch.Tensor) -> torch.Tensor:  # one encoding of the layer serves all its changes
            acts = clt.encode(layer, x.float().reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
            for i, c in enumerate(changes):
                if c.layer == layer:
                    a = acts[..., c.index]
                    delta = (a * c.value if c.mode == "scale" else torch.full_like(a, c.value)) - a
                    if c.positions is not None:
                        keep = torch.zeros(delta.shape[-1], dtype=torch.bool, device=delta.device)
                        keep[c.positions] = True
                        delta = delta * keep
                    deltas[i] = delta
            return x

        return fn

    def shift(target: int):  # type: ignore[no-untyped-def]
        def fn(y: torch.Tensor) -> torch.Tensor:
            out = y.float()
            for i, c in enumerate(changes):
                if c.layer <= target:
                    out = out + deltas[i][..., None] * clt.decoder(c.layer, target).detach()[c.index].to(out)
            return out.to(y)

        return fn

    edits = [Edit(f"mlp.in.{layer}", record(layer)) for layer in layers]
    return edits + [Edit(f"mlp.out.{t}", shift(t)) for t in range(layers[0], clt.n_layers)] if layers else edits


def _width(transcoders: Transcoders, layer: int) -> int | None:
    if isinstance(transcoders, CrossLayerTranscoder):
        return transcoders.cfg.widths[layer] if 0 <= layer < transcoders.n_layers else None
    return transcoders[layer].cfg.d_sae if layer in transcoders else None


def intervene(
    subject: Subject, transcoders: Transcoders, ids: list[int], changes: list[Change],
    k: int = 5,
) -> dict[str, list[tuple[str, float]]]:  # fmt: skip
    """Top-k next-token predictions before and after the changes (per-layer transcoders, or a CLT)."""
    merged: dict[tuple[int, int], Change] = {}
    for c in changes:
        width = _width(transcoders, c.layer)
        if width is None:
            raise AimriError(f"intervention: no transcoder for layer {c.layer}")
        if not 0 <= c.index < width:
            raise AimriError(
                f"intervention: feature {c.index} is outside layer {c.layer}'s transcoder (0..{width - 1})"
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
    batch = torch.tensor([ids])
    before = subject.run(batch, stop=False)["logits"][0, -1]
    if isinstance(transcoders, CrossLayerTranscoder):
        with torch.no_grad():
            after = subject.run(batch, edit=_clt_edits(transcoders, list(merged.values())), stop=False)["logits"][0, -1]
        return {"before": top_logits(before, subject.tokenizer, k), "after": top_logits(after, subject.tokenizer, k)}
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
    after = subject.run(batch, edit=to_edits(subject, edits), stop=False)["logits"][0, -1]
    return {"before": top_logits(before, subject.tokenizer, k), "after": top_logits(after, subject.tokenizer, k)}
