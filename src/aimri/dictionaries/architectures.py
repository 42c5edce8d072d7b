"""The registered activation functions: TopK, BatchTopK, JumpReLU, ReLU (+ L1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aimri.dictionaries.base import Dictionary, DictionaryConfig, register
from aimri.errors import AimriError


@register("topk")
class TopK(Dictionary):
    """Keep each token's k largest (non-negative) pre-activations."""

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


@register("batchtopk")
class BatchTopK(_Thresholded):
    """Training: keep the batch's k x batch largest activations; inference: JumpReLU with per-latent
    thresholds learned during training (each latent's running minimum selected activation)."""

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
        with torch.no_grad():  # per-latent minimum positive selected activation, smoothed
            chosen = torch.where(codes > 0, codes, torch.full_like(codes, float("inf"))).amin(0)
            seen = torch.isfinite(chosen)
            old = self.threshold.data
            fresh = seen & ~torch.isfinite(old)
            old[fresh] = chosen[fresh]
            keep = seen & ~fresh
            old[keep] = 0.99 * old[keep] + 0.01 * chosen[keep]
        return codes


@register("relu")
class ReLU(Dictionary):
    """Plain ReLU, trained with an L1 penalty weighted by decoder-row norms."""

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()


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
