"""Site names: where activations live, parsed and validated against a Subject."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from aimri.errors import SiteError

KINDS = ("resid", "attn.out", "mlp.in", "mlp.neurons", "mlp.out")
# Order of sites inside one block, used to find the deepest site a tap needs.
_RANK = {"attn.head": 0.0, "attn.out": 0.5, "mlp.in": 1.0, "mlp.neurons": 1.5, "mlp.out": 2.0, "resid": 3.0}
_PATTERN = re.compile(r"^(resid|attn\.out|mlp\.in|mlp\.neurons|mlp\.out)\.(-?\d+)(?:\.h(\d+))?$")


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site; `head` is set only for `attn.out.L.hN`."""

    kind: str
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        base = f"{self.kind}.{self.layer}"
        return base if self.head is None else f"{base}.h{self.head}"

    @property
    def depth(self) -> tuple[int, float]:
        """Execution order key: later sites have larger keys."""
        if self.kind == "resid" and self.layer == -1:
            return (-1, 3.0)
        rank = _RANK["attn.head"] if self.head is not None else _RANK[self.kind]
        return (self.layer, rank)

    def __str__(self) -> str:
        return self.name


def all_site_names(n_layers: int) -> list[str]:
    names = ["resid.-1"]
    for layer in range(n_layers):
        names += [f"{kind}.{layer}" for kind in KINDS]
    return names


def parse_site(name: str, n_layers: int, n_heads: int) -> Site:
    """Parse `name`, raising a SiteError that suggests the nearest valid names."""
    match = _PATTERN.match(name.strip())
    if match is None:
        near = difflib.get_close_matches(name, all_site_names(n_layers), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise SiteError(
            f"unknown site {name!r}: sites are resid.L, attn.out.L[.hN], mlp.in.L, mlp.neurons.L, mlp.out.L "
            f"with L in 0..{n_layers - 1} (resid.-1 = embeddings).{hint}"
        )
    kind, layer_s, head_s = match.groups()
    layer = int(layer_s)
    low = -1 if kind == "resid" else 0
    if not low <= layer < n_layers:
        raise SiteError(
            f"site {name!r}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}"
            + (" (resid.-1 = embeddings)" if kind == "resid" else "")
        )
    head = None
    if head_s is not None:
        if kind != "attn.out":
            raise SiteError(f"site {name!r}: only attn.out sites have heads (attn.out.{layer}.h0)")
        head = int(head_s)
        if head >= n_heads:
            raise SiteError(f"site {name!r}: head {head} is out of range; this model has heads 0..{n_heads - 1}")
    return Site(kind, layer, head)
