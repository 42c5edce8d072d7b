"""Sparse dictionaries: one small base class; activation functions registered by name.

Weights follow the SAELens layout so files interoperate: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_out], b_dec [d_out], optional threshold [d_sae] (JumpReLU) and W_skip [d_in, d_out]
(transcoders). An SAE maps a Site onto itself (d_out = d_in, input centred by b_dec); a transcoder maps
`mlp.in.L` to `mlp.out.L`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from aimri.errors import AimriError

ARCHITECTURES: dict[str, type[Dictionary]] = {}
D = TypeVar("D", bound="Dictionary")


def register(name: str) -> Callable[[type[D]], type[D]]:
    """Class decorator: a new architecture is one file with one registered subclass."""

    def wrap(cls: type[D]) -> type[D]:
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return wrap


@dataclass
class DictionaryConfig:
    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None = None  # None: an SAE (d_out = d_in)
    k: int | None = None  # TopK / BatchTopK
    l1_coefficient: float = 0.0  # ReLU
    skip: bool = False  # transcoder linear skip connection
    site: str = ""
    site_out: str = ""  # transcoders: where the output lives
    model_name: str = ""
    model_revision: str = ""
    apply_b_dec_to_input: bool = True  # SAEs: encode x - b_dec (Gemma Scope's JumpReLU SAEs do not)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None and (self.site_out or "") != (self.site or "")

    @property
    def centres_input(self) -> bool:
        return self.apply_b_dec_to_input and not self.is_transcoder and not self.skip

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Dictionary(nn.Module):
    """encode: x -> sparse codes; decode: codes -> reconstruction; forward: both."""

    architecture: ClassVar[str] = ""

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__()
        if cfg.d_in < 1 or cfg.d_sae < 1:
            raise AimriError(f"dictionary dimensions must be positive (d_in={cfg.d_in}, d_sae={cfg.d_sae})")
        if cfg.k is not None and not 0 < cfg.k <= cfg.d_sae:
            raise AimriError(f"k={cfg.k} must be between 1 and the width d_sae={cfg.d_sae}")
        self.cfg = cfg
        d_out = cfg.out_dim
        # [d_in, d_sae] as the field reads it, stored as the transpose of a contiguous [d_sae, d_in]: each
        # latent's encoder row is contiguous, which the forward GEMM and the sparse backward both prefer
        self.W_enc = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in).t())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, d_out)) if cfg.skip else None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows; encoder initialised to the decoder's transpose (when shapes allow)."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.out_dim, generator=generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            if self.cfg.out_dim == self.cfg.d_in:
                self.W_enc.copy_(self.W_dec.T)
            else:
                e = torch.randn(self.cfg.d_in, self.cfg.d_sae, generator=generator)
                self.W_enc.copy_(e / e.norm(dim=0, keepdim=True))

    # -- the interface -------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        centred = x - self.b_dec if self.cfg.centres_input else x
        return centred @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, codes: Tensor, x: Tensor | None = None) -> Tensor:
        out = codes @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise AimriError("this transcoder has a skip connection: decode(codes, x) needs the input x")
            out = out + x @ self.W_skip
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{self.architecture}: {c.site or '?'}{' -> ' + c.site_out if c.is_transcoder else ''}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}"


def build(cfg: DictionaryConfig) -> Dictionary:
    if cfg.architecture not in ARCHITECTURES:
        raise AimriError(
            f"unknown dictionary architecture {cfg.architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[cfg.architecture](cfg)
