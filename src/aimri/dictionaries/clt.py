"""Cross-layer transcoders (CLTs): one encoder per layer, reading that layer's MLP input (`mlp.in.L`), whose
features write to the MLP outputs (`mlp.out.T`) of that layer and of every later one.

    pre_L   = x_L @ W_enc[L] + b_enc[L]                        x_L [rows, d_model], pre_L [rows, width_L]
    codes_L = pre_L * (pre_L > threshold[L])                   JumpReLU (ReLU where no threshold)
    out_T   = sum_{L <= T} codes_L @ W_dec[L][:, T - L] + b_dec[T]   (+ x_T @ W_skip[T])     out_T [rows, d_model]

Method: Ameisen et al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language Models"
(transformer-circuits.pub), as circuit-tracer's `CrossLayerTranscoder` computes it. Shapes follow circuit-tracer:
W_enc[L] [width_L, d_model], W_dec[L] [width_L, n_layers - L, d_model], b_dec [n_layers, d_model], W_skip
[n_layers, d_model, d_model]. Widths may differ per layer (circuit-tracer's own files need them equal).
Files: aimri.dictionaries.clt_formats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from aimri.dictionaries.base import DictionaryConfig
from aimri.errors import AimriError

ACTIVATIONS = ("jumprelu", "relu")


@dataclass
class CLTConfig:
    """A CLT's shape and provenance. `k`: active features per token per layer it was trained for (BatchTopK);
    the saved CLT is JumpReLU with thresholds calibrated after training (`activation`)."""

    n_layers: int
    d_model: int
    widths: list[int]
    k: int | None = None
    activation: str = "jumprelu"
    skip: bool = False
    model_name: str = ""
    model_revision: str = ""
    prepend_bos: bool = True
    bos_id: int | None = None
    model_dtype: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raises AimriError for a shape that cannot be built."""
        if self.n_layers < 1 or self.d_model < 1:
            raise AimriError(f"a CLT needs n_layers and d_model >= 1, got {self.n_layers} and {self.d_model}")
        if len(self.widths) != self.n_layers or min(self.widths) < 1:
            raise AimriError(
                f"a CLT needs one positive width per layer: {self.n_layers} layers, widths {self.widths[:8]}"
                f"{'...' if len(self.widths) > 8 else ''}"
            )
        if self.activation not in ACTIVATIONS:
            raise AimriError(f"CLT activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.k is not None and not 0 < self.k <= min(self.widths):
            raise AimriError(f"k={self.k} must be between 1 and the narrowest layer's width {min(self.widths)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def layer_config(self, layer: int) -> DictionaryConfig:
        """Layer `layer`'s encoder seen as a transcoder mlp.in.L -> mlp.out.L: what the model and prompt
        checks (aimri.dictionaries.match) read."""
        return DictionaryConfig(
            "jumprelu", self.d_model, self.widths[layer], d_out=self.d_model, k=self.k, site=f"mlp.in.{layer}",
            site_out=f"mlp.out.{layer}", model_name=self.model_name, model_revision=self.model_revision,
            prepend_bos=self.prepend_bos, bos_id=self.bos_id, model_dtype=self.model_dtype,
        )  # fmt: skip


class CrossLayerTranscoder(nn.Module):
    """A CLT (see the module docstring). Parameters are fp32; `encode` and `decode` take rows of any float
    dtype and compute in the weights' dtype."""

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        L, d = cfg.n_layers, cfg.d_model
        self.W_enc = nn.ParameterList([nn.Parameter(torch.zeros(w, d)) for w in cfg.widths])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(w)) for w in cfg.widths])
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(w, L - i, d)) for i, w in enumerate(cfg.widths)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None
        for i, w in enumerate(cfg.widths):
            self.register_buffer(f"threshold_{i}", torch.zeros(w))

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def threshold(self, layer: int) -> Tensor:
        """[width_L]: layer L's JumpReLU thresholds (zeros: ReLU)."""
        return self.get_buffer(f"threshold_{layer}")

    def set_threshold(self, layer: int, value: Tensor) -> None:
        self.threshold(layer).copy_(value)

    def encoder(self, layer: int) -> Tensor:
        """[d_model, width_L]: layer L's encoder as a transcoder's W_enc reads (a view)."""
        return self.W_enc[layer].t()

    def decoder(self, source: int, target: int) -> Tensor:
        """[width_source, d_model]: what source-layer features write to layer `target`'s MLP output (a view).

        Raises AimriError for target < source (a CLT writes forwards only)."""
        if not 0 <= source <= target < self.n_layers:
            raise AimriError(f"layer {source}'s features write to layers {source}..{self.n_layers - 1}, not {target}")
        return self.W_dec[source][:, target - source]

    def pre_acts(self, layer: int, x: Tensor) -> Tensor:
        """x [rows, d_model] (layer L's MLP input) -> [rows, width_L]."""
        return x.to(self.b_dec) @ self.encoder(layer) + self.b_enc[layer]

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        """JumpReLU at the layer's thresholds, clamped at 0 (a negative threshold would let negative
        pre-activations through, which no trained CLT means; circuit-tracer does not clamp); or ReLU."""
        if self.cfg.activation == "relu":
            return pre.relu()
        return pre * (pre > self.threshold(layer).clamp_min(0))

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """x [rows, d_model] -> codes [rows, width_L]."""
        return self.activate(layer, self.pre_acts(layer, x))

    def decode(self, target: int, codes: Mapping[int, Tensor], x: Tensor | None = None) -> Tensor:
        """Layer `target`'s MLP output [rows, d_model] from the codes of layers <= target ({layer: [rows,
        width]}; a missing layer counts as silent; with no codes at all, b_dec as [1, d_model], broadcastable).
        With a skip term, x is layer `target`'s MLP input.

        Raises AimriError when the skip term needs x and none is given."""
        out = self.b_dec[target].expand(1, -1)
        for source in range(target + 1):
            if source in codes:
                out = out + codes[source].to(self.b_dec) @ self.decoder(source, target)
        if self.W_skip is not None:
            if x is None:
                raise AimriError("this CLT has a skip term: decode(target, codes, x) needs layer target's MLP input")
            out = out + x.to(self.b_dec) @ self.W_skip[target]
        return out

    def reconstruct(self, layer: int, x: Tensor, codes: dict[int, Tensor]) -> Tensor:
        """Layer L's MLP output from its input x, in a pass that goes up the layers: encodes x into `codes[layer]`
        and decodes from every layer's codes so far (`evaluate.replaced_metrics`' reconstruct)."""
        codes[layer] = self.encode(layer, x)
        return self.decode(layer, codes, x)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Every layer's MLP input [rows, d_model] -> every layer's reconstructed MLP output."""
        codes = {layer: self.encode(layer, x) for layer, x in enumerate(xs)}
        return [self.decode(t, codes, xs[t]) for t in range(self.n_layers)]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.cfg
        widths = f"{c.widths[0]} features per layer" if len(set(c.widths)) == 1 else f"widths {c.widths}"
        return f"CLT over {c.n_layers} layers, d_model={c.d_model}, {widths}, k={c.k}, {c.activation}"


def clt_parameter_count(n_layers: int, d_model: int, widths: Sequence[int], skip: bool = False) -> int:
    """Parameters of a CLT of this shape (for memory estimates before it is built)."""
    enc = sum(w * (d_model + 1) for w in widths)
    dec = sum(w * (n_layers - i) * d_model for i, w in enumerate(widths))
    return enc + dec + n_layers * d_model + (n_layers * d_model * d_model if skip else 0)
