"""The registered activation functions: TopK, BatchTopK, JumpReLU, ReLU (+ L1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from aimri.dictionaries.base import ARCHITECTURES as ARCHITECTURES  # the registry these fill
from aimri.dictionaries.base import Dictionary, DictionaryConfig, build, register
from aimri.errors import AimriError

if TYPE_CHECKING:
    from aimri.dictionaries.config import TrainConfig


@register("topk")
class TopK(Dictionary):
    """Keep each token's k largest (non-negative) pre-activations."""

    uses_k = True
    sparse_topk = True
    uses_auxk = True

    def __init__(self, cfg: DictionaryConfig) -> None:
        if cfg.k is None:
            raise AimriError("a topk dictionary needs k (e.g. --k 32)")
        super().__init__(cfg)

    def topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        vals, idx = pre.topk(self.cfg.k or 1, dim=-1, sorted=False)
        return vals.relu(), idx

    def activate(self, pre: Tensor) -> Tensor:
        vals, idx = self.topk(pre)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)


class _Thresholded(Dictionary):
    """Shared by JumpReLU and BatchTopK at inference: a per-latent threshold."""

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def jump(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold)


@register("jumprelu")
class JumpReLU(_Thresholded):
    """pre * (pre > threshold); trained with straight-through threshold gradients and an L0 penalty."""

    bandwidth: float = 0.001

    def activate(self, pre: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return _JumpSTE.apply(pre, self.threshold, self.bandwidth)  # type: ignore[return-value]
        return self.jump(pre)

    def l0(self, pre: Tensor) -> Tensor:
        return _StepSTE.apply(pre, self.threshold, self.bandwidth).sum(-1).mean()  # type: ignore[union-attr]

    def sparsity_loss(self, pre: Tensor, codes: Tensor, tcfg: TrainConfig) -> Tensor | None:
        """The L0 penalty, through the threshold's straight-through pseudo-derivative."""
        return tcfg.l0_coefficient * self.l0(pre)


@register("batchtopk")
class BatchTopK(_Thresholded):
    """Training: keep the batch's k x batch largest activations; inference: JumpReLU with per-latent
    thresholds learned during training (each latent's running minimum selected activation)."""

    uses_k = True
    uses_auxk = True
    saved_architecture = "jumprelu"  # the inference form: JumpReLU with the learned thresholds

    def __init__(self, cfg: DictionaryConfig) -> None:
        if cfg.k is None:
            raise AimriError("a batchtopk dictionary needs k (e.g. --k 32)")
        super().__init__(cfg)
        self.threshold.requires_grad_(False)
        self.threshold.fill_(float("inf"))

    def activate(self, pre: Tensor) -> Tensor:
        if not self.training:
            return self.jump(pre)
        flat = pre.relu().flatten()
        vals, idx = flat.topk(min((self.cfg.k or 1) * pre.shape[0], flat.numel()), sorted=False)
        codes = torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        self._track_thresholds(codes)
        return codes

    @torch.no_grad()
    def _track_thresholds(self, codes: Tensor) -> None:
        """Per-latent minimum positive selected activation, smoothed: the inference thresholds."""
        chosen = torch.where(codes > 0, codes, torch.full_like(codes, float("inf"))).amin(0)
        seen = torch.isfinite(chosen)
        old = self.threshold.data
        fresh = seen & ~torch.isfinite(old)
        old[fresh] = chosen[fresh]
        keep = seen & ~fresh
        old[keep] = 0.99 * old[keep] + 0.01 * chosen[keep]

    def saved_tensors(self) -> dict[str, Tensor]:
        """A latent never selected has no threshold yet (inf): saved with the largest learned one."""
        tensors = super().saved_tensors()
        t = tensors["threshold"]
        finite = t[torch.isfinite(t)]
        tensors["threshold"] = torch.where(torch.isfinite(t), t, finite.max() if len(finite) else torch.zeros(()))
        return tensors


@register("relu")
class ReLU(Dictionary):
    """Plain ReLU, trained with an L1 penalty weighted by decoder-row norms."""

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparsity_loss(self, pre: Tensor, codes: Tensor, tcfg: TrainConfig) -> Tensor | None:
        """L1 of the codes weighted by their decoder rows' norms, per input dimension."""
        return tcfg.l1_coefficient * (codes * self.W_dec.norm(dim=1)).sum(1).mean() / self.cfg.d_in


class _StepSTE(torch.autograd.Function):
    """H(pre - threshold) with a rectangle-kernel pseudo-derivative for the threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        grad_t = (-(1.0 / ctx.bandwidth) * near * grad).reshape(-1, threshold.shape[-1]).sum(0)
        return None, grad_t, None


class _JumpSTE(torch.autograd.Function):
    """pre * H(pre - threshold): exact gradient for pre, pseudo-derivative for the threshold."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre.dtype)
        grad_t = (-(threshold / ctx.bandwidth) * near * grad).reshape(-1, threshold.shape[-1]).sum(0)
        return grad * (pre > threshold), grad_t, None


@register("crosscoder")
class Crosscoder(BatchTopK):
    """One encoder over the same Site in several Subjects (inputs concatenated, source-major) and a
    decoder block per source. Latents compete in BatchTopK on activation x the sum of their per-source
    decoder norms, so decoder norms carry meaning and are not forced to 1: a latent whose decoder is ~0
    in the base model and large in the fine-tune is a concept the fine-tune added."""

    unit_norm_decoder = False  # decoder norms carry meaning
    saved_architecture = "crosscoder"  # its thresholds make it a crosscoder at inference still

    def __init__(self, cfg: DictionaryConfig) -> None:
        sources = int(cfg.extra.get("sources", 2))
        if cfg.d_in % sources:
            raise AimriError(f"crosscoder d_in={cfg.d_in} is not divisible by its {sources} sources")
        super().__init__(cfg)
        self.sources = sources

    def source_norms(self) -> Tensor:
        """[d_sae, sources] decoder norms per source."""
        return self.W_dec.view(self.cfg.d_sae, self.sources, -1).norm(dim=-1)

    def relative_norm(self, source: int = 1) -> Tensor:
        """Per latent: norm in `source` / total norm (1 = only in that source, 0.5 = shared)."""
        norms = self.source_norms()
        return norms[:, source] / norms.sum(1).clamp_min(1e-12)

    def activate(self, pre: Tensor) -> Tensor:
        if not self.training:
            return self.jump(pre)
        acts = pre.relu()
        score = (acts * self.source_norms().sum(1)).flatten()
        idx = score.topk(min((self.cfg.k or 1) * pre.shape[0], score.numel()), sorted=False).indices
        codes = torch.zeros_like(acts).flatten().scatter_(0, idx, acts.flatten()[idx]).view_as(acts)
        self._track_thresholds(codes)
        return codes


@register("identity")
class Identity(Dictionary):
    """A model's own MLP neurons as a dictionary: codes are the positive part of mlp.neurons.L, the
    decoder is the down-projection (so a neuron's logit effects and neighbours are its output direction).
    The baseline that sparse dictionaries are compared against."""

    def pre_acts(self, x: Tensor) -> Tensor:
        return x

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()


def neuron_dictionary(subject: Any, layer: int) -> Dictionary:
    """The identity dictionary over layer `layer`'s MLP neurons, decoding through its down-projection."""
    from aimri.subject.adapters import get_module

    site = f"mlp.neurons.{layer}"
    width = subject.site_dim(site)
    down: Any = get_module(subject.layer(layer), subject.adapter.down_proj)
    weight = down.weight.detach().float()
    W_dec = weight if subject.adapter.o_proj_is_conv1d else weight.T  # [width, d_model]
    cfg = DictionaryConfig(
        "identity", width, width, d_out=subject.d_model, site=site, site_out=f"mlp.out.{layer}",
        model_name=subject.name, model_revision=subject.revision, apply_b_dec_to_input=False,
    )  # fmt: skip
    neurons = build(cfg)
    with torch.no_grad():
        neurons.W_enc.copy_(torch.eye(width))
        neurons.b_enc.zero_()
        neurons.W_dec.copy_(W_dec)
        bias = getattr(down, "bias", None)
        neurons.b_dec.copy_(bias.detach().float() if bias is not None else torch.zeros(subject.d_model))
    return neurons.eval()
