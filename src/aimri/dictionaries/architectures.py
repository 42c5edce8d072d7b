"""The registered activation functions: TopK, BatchTopK, JumpReLU, ReLU (+ L1)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from aimri.dictionaries.base import ARCHITECTURES as ARCHITECTURES  # the registry these fill
from aimri.dictionaries.base import Dictionary, DictionaryConfig, build, register
from aimri.errors import AimriError

if TYPE_CHECKING:
    from typing_extensions import Self

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
    """Training: keep the batch's k x batch largest activations. Inference: one global threshold, the running
    average of each training batch's smallest selected activation (its k x batch-th largest), so a token keeps
    the activations above it and the dictionary keeps k per token on average; saved as a JumpReLU whose every
    latent has that threshold.

    The rule is SAELens' (sae_lens/saes/batchtopk_sae.py: `BatchTopKTrainingSAE.update_topk_threshold`, an
    exponential moving average at rate `topk_threshold_lr` = 0.01 of the smallest positive selected activation,
    and `process_state_dict_for_saving_inference`, `threshold` = that value for every latent);
    dictionary_learning's BatchTopKSAE (trainers/batch_top_k.py, `update_threshold`) is the same at rate 0.001.
    One change: the average is bias-corrected as Adam's moments are (SAELens starts it at 0, so its threshold is
    too low and the inference L0 too high until ~1/rate batches have passed): after one batch it is that batch's
    value, so the inference L0 is about k from the first step. The pipelines that save a dictionary then
    `calibrate` that threshold with the final weights on a batch no step trained on (train.calibrated).

    The average lives in two buffers (`score_average`, `score_weight`: not saved with the dictionary, kept in
    the Trainer's checkpoints and averaged across data-parallel ranks after every step, so each rank holds the
    mean of the ranks' batch values); `threshold` is derived from them when the model leaves training mode."""

    uses_k = True
    uses_auxk = True
    saved_architecture = "jumprelu"  # the inference form: JumpReLU with the global threshold on every latent
    threshold_rate: float = 0.01  # SAELens' topk_threshold_lr
    score_average: Tensor  # sum of rate-weighted batch values (an EMA started at 0)
    score_weight: Tensor  # the same EMA of 1s: score_average / score_weight is the bias-corrected average

    def __init__(self, cfg: DictionaryConfig) -> None:
        if cfg.k is None:
            raise AimriError(f"a {type(self).architecture} dictionary needs k (e.g. --k 32)")
        super().__init__(cfg)
        self.threshold.requires_grad_(False)
        self.register_buffer("score_average", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("score_weight", torch.zeros((), dtype=torch.float64), persistent=False)

    def activate(self, pre: Tensor) -> Tensor:
        if not self.training:
            return self.jump(pre)
        acts = pre.relu()
        return self._select(acts, self.score(acts))

    def score(self, acts: Tensor) -> Tensor:
        """What latents compete on in the batch's top k x rows: the activation itself."""
        return acts

    def _select(self, acts: Tensor, score: Tensor) -> Tensor:
        """The batch's k x rows activations of largest `score`; their smallest positive score feeds the average."""
        flat = score.flatten()
        idx = flat.topk(min((self.cfg.k or 1) * acts.shape[0], flat.numel()), sorted=False).indices
        vals = acts.flatten()[idx]
        with torch.no_grad():
            chosen = flat[idx][vals > 0]
            if chosen.numel():  # (SAELens skips a batch with no positive activation too)
                rate = self.threshold_rate
                self.score_average.mul_(1 - rate).add_(rate * chosen.min().double())
                self.score_weight.mul_(1 - rate).add_(rate)
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)

    def global_threshold(self) -> float | None:
        """The bias-corrected average of the batches' smallest selected score; None before any batch."""
        weight = float(self.score_weight)
        return float(self.score_average) / weight if weight > 0 else None

    @torch.no_grad()
    def refresh_threshold(self, value: float | None = None) -> None:
        """Set the per-latent inference `threshold` from a global one (default: the running average; kept as it
        is without statistics, as in a dictionary loaded from its files)."""
        value = self.global_threshold() if value is None else value
        if value is not None:
            self.threshold.fill_(value)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Before saving: the inference threshold from training rows x [rows, d_in] (as the model is fed them)
        with the final weights: the (k x rows)-th largest score, so the saved dictionary keeps k latents per
        token on the training distribution however fast the weights moved in the last steps (the running
        average lags them: over a short run its L0 was 7-10 for k = 8 on SmolLM2). Calibrating the JumpReLU
        thresholds after BatchTopK training, as crosslayer-coding does. The running average is left as it is."""
        score = self.score(self.pre_acts(x).relu()).flatten()
        n = min((self.cfg.k or 1) * x.shape[0], score.numel())
        value = float(score.topk(n, sorted=False).values.min()) if n else 0.0
        if value > 0:
            self.refresh_threshold(value)

    def train(self, mode: bool = True) -> Self:
        if not mode:  # leaving training: the inference threshold from the average as it now stands
            self.refresh_threshold()
        return super().train(mode)

    def saved_tensors(self) -> dict[str, Tensor]:
        self.refresh_threshold()
        return super().saved_tensors()


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
    saved_architecture = "crosscoder"  # inference: a threshold per latent, the global one over its norm sum

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
        return self._select(acts, self.score(acts))

    def score(self, acts: Tensor) -> Tensor:
        """Latents compete on activation x the sum of their per-source decoder norms."""
        return acts * self.source_norms().sum(1)

    @torch.no_grad()
    def refresh_threshold(self, value: float | None = None) -> None:
        """The global threshold is on activation x decoder-norm sum: on the activation it is, per latent, the
        global one over that latent's norm sum (a latent with no decoder never fires, as in training). Saved
        so, a crosscoder loaded from its files selects as the one trained: the activations are unchanged by the
        scale folded in at export, and the thresholds are taken from the norms they were learned against."""
        value = self.global_threshold() if value is None else value
        if value is not None:
            norms = self.source_norms().sum(1)
            self.threshold.copy_(
                torch.where(norms > 0, value / norms.clamp_min(1e-30), torch.full_like(norms, math.inf))
            )


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
