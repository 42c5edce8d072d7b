"""Sparse dictionaries: one small base class; activation functions registered by name.

Weights follow the SAELens layout so files interoperate: W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_out], b_dec [d_out], optional threshold [d_sae] (JumpReLU) and W_skip [d_in, d_out]
(transcoders). An SAE maps a Site onto itself (d_out = d_in, input centred by b_dec); a transcoder maps
`mlp.in.L` to `mlp.out.L`.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from aimri.errors import AimriError

if TYPE_CHECKING:
    from typing_extensions import Self

    from aimri.dictionaries.config import TrainConfig

ARCHITECTURES: dict[str, type[Dictionary]] = {}
D = TypeVar("D", bound="Dictionary")
# SAELens' `normalize_activations` values a Dictionary computes (the others are folded into the weights or
# refused when a file is loaded: aimri.dictionaries.formats)
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens' run_time_activation_ln_in: x / (std + eps)


def register(name: str) -> Callable[[type[D]], type[D]]:
    """Class decorator: a new architecture is one file with one registered subclass. How the Trainer and
    `save_dictionary` treat it is stated on the class (see `Dictionary`'s class attributes and hooks)."""

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
    # SAEs: SAELens' per-token input normalisation, one of NORMALISATIONS (`Dictionary.normalisation`)
    normalize_activations: str = "none"
    # how the training windows opened (SAELens' metadata.prepend_bos): a prompt fed to this dictionary opens
    # the same way (aimri.dictionaries.prompts.prompt_ids). bos_id None: not recorded, the tokenizer's packing rule
    prepend_bos: bool = True
    bos_id: int | None = None
    # the dtype the model computed the training activations in ("": not recorded); match.check_dtype compares
    # it with a store's before the store's rows are used to judge the dictionary
    model_dtype: str = ""
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
    """encode: x -> sparse codes; decode: codes -> reconstruction; forward: both.

    An architecture states how it is trained and saved with the class attributes and hooks below; the
    defaults describe a plain dictionary (a dense decode of `activate`'s codes, unit-norm decoder rows, no
    sparsity penalty, saved as it is)."""

    architecture: ClassVar[str] = ""  # set by @register
    # it takes k, the active latents per token (the trainers pass their k setting only to such architectures)
    uses_k: ClassVar[bool] = False
    # training: codes are each row's k largest pre-activations, so the Trainer runs the fused sparse TopK
    # kernel (aimri.dictionaries.sparse.topk_autoencode: sparse decode and backward, W_enc stepped through its
    # latent-major storage) instead of `activate` and a dense decode; such an architecture has no sparsity_loss
    sparse_topk: ClassVar[bool] = False
    # training: dead latents are revived with the AuxK loss (Gao et al.)
    uses_auxk: ClassVar[bool] = False
    # training: decoder rows are kept on the unit sphere (False where decoder norms carry meaning)
    unit_norm_decoder: ClassVar[bool] = True
    # saving: the registered architecture the inference form is saved (and loaded back) as; "": its own.
    # A subclass of an architecture that sets it names its own form again.
    saved_architecture: ClassVar[str] = ""

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__()
        if cfg.d_in < 1 or cfg.d_sae < 1:
            raise AimriError(f"dictionary dimensions must be positive (d_in={cfg.d_in}, d_sae={cfg.d_sae})")
        if cfg.k is not None and not 0 < cfg.k <= cfg.d_sae:
            raise AimriError(f"k={cfg.k} must be between 1 and the width d_sae={cfg.d_sae}")
        if cfg.normalize_activations not in NORMALISATIONS:
            raise AimriError(
                f"`normalize_activations`={cfg.normalize_activations!r} is not one of {', '.join(NORMALISATIONS)}"
            )
        if cfg.normalize_activations != "none" and (cfg.is_transcoder or cfg.skip):
            raise AimriError(
                f"`normalize_activations`={cfg.normalize_activations!r} is for SAEs; a transcoder or skip "
                "connection reads its input as it is"
            )
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
    def normalisation(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per token of x, the (shift, scale_in, scale_out) of the dictionary's `normalize_activations`: it
        encodes (x - shift) * scale_in and its reconstruction y returns to x's scale as y * scale_out + shift.
        None for "none" (x is read as it is). SAELens' formulas (sae_lens/saes/sae.py,
        `SAE._setup_activation_normalization`; `process_sae_in` applies them before the b_dec centring):

        - constant_norm_rescale: shift 0, scale_in = sqrt(d_in) / ||x||, scale_out = 1 / scale_in;
        - layer_norm: shift = mean(x), scale_in = 1 / (std(x) + 1e-5), scale_out = std(x), std with Bessel's
          correction (torch.std); the output is not divided by the eps.

        So codes come from the normalised input, and a code's decoder row adds W_dec[i] * scale_out at that
        token in x's space."""
        if self.cfg.normalize_activations == "none":
            return None
        if self.cfg.normalize_activations == "constant_norm_rescale":
            scale_in = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return torch.zeros_like(scale_in), scale_in, 1 / scale_in
        mean = x.mean(dim=-1, keepdim=True)
        std = (x - mean).std(dim=-1, keepdim=True)
        return mean, 1 / (std + LAYER_NORM_EPS), std

    def pre_acts(self, x: Tensor) -> Tensor:
        norm = self.normalisation(x)
        if norm is not None:
            shift, scale_in, _ = norm
            x = (x - shift) * scale_in
        centred = x - self.b_dec if self.cfg.centres_input else x
        return centred @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, codes: Tensor, x: Tensor | None = None) -> Tensor:
        """codes @ W_dec + b_dec (+ x @ W_skip), returned to x's scale when the dictionary normalises its
        input (`normalisation`): then, as with a skip connection, decode needs the input x the codes came from."""
        out = codes @ self.W_dec + self.b_dec
        if self.cfg.normalize_activations != "none":
            if x is None:
                raise AimriError(
                    f"this dictionary normalises its input (normalize_activations={self.cfg.normalize_activations!r}): "
                    "decode(codes, x) needs the input x to return to its scale"
                )
            shift, _, scale_out = self.normalisation(x)  # type: ignore[misc]  (not None: normalising)
            out = out * scale_out + shift
        if self.W_skip is not None:
            if x is None:
                raise AimriError("this transcoder has a skip connection: decode(codes, x) needs the input x")
            out = out + x @ self.W_skip
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    def train(self, mode: bool = True) -> Self:
        """Training mode; refused for a dictionary that normalises its input, which AI MRI reads but does not
        train (the Trainer's reconstruction is codes @ W_dec + b_dec, in the normalised space)."""
        if mode and self.cfg.normalize_activations != "none":
            raise AimriError(
                f"a dictionary with normalize_activations={self.cfg.normalize_activations!r} is inference-only "
                "in AI MRI; train one without it"
            )
        return super().train(mode)

    # -- training and saving hooks ---------------------------------------------------------------
    def sparsity_loss(self, pre: Tensor, codes: Tensor, tcfg: TrainConfig) -> Tensor | None:
        """Training: the penalty added to the reconstruction loss, from a batch's pre-activations and codes
        (the Trainer's scaled inputs); None: none, the architecture is sparse by construction."""
        return None

    def calibrate(self, x: Tensor) -> None:
        """Saving: fit inference-only settings to training rows x [rows, d_in] with the final weights, just
        before the Trainer exports (BatchTopK: its threshold); by default nothing."""

    def saved_tensors(self) -> dict[str, Tensor]:
        """Saving: the tensors `save_dictionary` writes (copies), in the inference form `saved_architecture`
        names; by default the parameters as they are."""
        return {k: v.detach().contiguous().clone() for k, v in self.state_dict().items() if v is not None}

    def on(self, device: torch.device) -> Self:
        """This dictionary on `device`: itself when already there, else a moved copy (the caller's stays put)."""
        return self if self.W_enc.device == device else copy.deepcopy(self).to(device)

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{self.architecture}: {c.site or '?'}{' -> ' + c.site_out if c.is_transcoder else ''}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}"


def architecture_class(name: str) -> type[Dictionary]:
    """The registered class of architecture `name`. The built-in architectures are plug-ins of this registry,
    loaded by name on first use (as entry points would be), so this base module never imports its subclasses.

    Raises AimriError for a name no architecture registered."""
    importlib.import_module("aimri.dictionaries.architectures")

    if name not in ARCHITECTURES:
        raise AimriError(f"unknown dictionary architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def build(cfg: DictionaryConfig) -> Dictionary:
    return architecture_class(cfg.architecture)(cfg)


def dictionary_sha(dictionary: Dictionary) -> str:
    """A short content hash of the weights, so an atlas is never read against another dictionary."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        digest.update(getattr(dictionary, name).detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
