"""Dictionary-training settings, each written once: its default and the help text `mri` shows for it.

Torch-free, so the CLI reads its options' defaults from here at start-up without importing torch.

    TrainConfig         how the Trainer optimises one dictionary (saved with every checkpoint)
    DictionarySettings  what a user sets for one dictionary: `mri train`, `train_from_store`, `train_from_subject`
    TranscodersConfig   per-layer transcoders: `mri train-transcoders`, `train_transcoders`
    CrosscoderConfig    a crosscoder over several models: `mri train-crosscoder`, `train_crosscoder`
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

# The default learning rate is LR_AT_REFERENCE_WIDTH * sqrt(REFERENCE_WIDTH / width): Gao et al.'s 1/sqrt(width)
# scaling, with the constant measured on SmolLM2 resid.15 at this width (inputs at mean norm sqrt(d)): held-out
# FVU at 1M tokens 0.331 with their 2e-4 * sqrt(16384 / d_sae), 0.223 with 2e-3, 0.217 with 8e-3 (betas 0.9,
# 0.999). The reference width is also the default width.
REFERENCE_WIDTH = 4608
LR_AT_REFERENCE_WIDTH = 3e-3


def default_lr(width: int) -> float:
    """The Adam learning rate a dictionary of `width` latents trains with when none is given."""
    return LR_AT_REFERENCE_WIDTH * math.sqrt(REFERENCE_WIDTH / width)


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class TrainConfig:
    """How the Trainer optimises one dictionary. A checkpoint records it, and resumes only under the same one."""

    total_tokens: int = field(metadata=_help("training tokens (the data is cycled if smaller)"))
    batch_size: int = field(default=4096, metadata=_help("rows per optimiser step"))
    lr: float | None = field(
        default=None,
        metadata=_help(f"Adam learning rate (default: {LR_AT_REFERENCE_WIDTH!r} * sqrt({REFERENCE_WIDTH} / width))"),
    )
    warmup_frac: float = field(default=0.05, metadata=_help("share of the steps spent warming the lr up"))
    decay_frac: float = field(default=0.2, metadata=_help("share of the steps at the end decaying the lr to 0"))
    auxk_alpha: float = field(default=1 / 32, metadata=_help("weight of the AuxK loss that revives dead latents"))
    auxk_k: int | None = field(default=None, metadata=_help("latents AuxK revives per token (default: d_in // 2)"))
    dead_tokens: int | None = field(
        default=None,
        metadata=_help("a latent silent for this many tokens is dead (default: min(1M, total_tokens / 10))"),
    )
    # Adam with less momentum than the usual (0.9, 0.999): measured on SmolLM2 resid.15 (width 4608, k 32,
    # lr 3e-3), held-out FVU at 491k tokens 0.297 -> 0.254, at 1M tokens 0.217 -> 0.203
    betas: tuple[float, float] = field(default=(0.5, 0.95), metadata=_help("Adam's betas"))
    l1_coefficient: float = field(default=5.0, metadata=_help("relu: weight of the L1 sparsity penalty"))
    l0_coefficient: float = field(default=1e-3, metadata=_help("jumprelu: weight of the L0 sparsity penalty"))
    seed: int = field(default=0, metadata=_help("seed of the initialisation and the data order"))
    checkpoint_every: int = field(default=200, metadata=_help("steps between checkpoints"))
    select_dtype: str = field(
        default="auto",
        metadata=_help(
            "topk: dtype of the GEMM that picks each token's k latents (their values are always exact fp32); "
            "auto: bfloat16 on a GPU and where the CPU has bf16 GEMM units (AVX512-BF16, AMX), float32 elsewhere"
        ),
    )
    device: str = field(
        default="auto", metadata=_help("where the dictionary trains: cuda, cuda:N, cpu, or auto (CUDA when present)")
    )

    @property
    def steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    @property
    def dead_after(self) -> int:
        return self.dead_tokens or min(1_000_000, max(self.batch_size, self.total_tokens // 10))


def _as(config: type, name: str) -> Any:
    """A field with the default and help of `config`'s field `name`: the setting is written there, once."""
    source = next(f for f in fields(config) if f.name == name)
    return field(default=source.default, metadata=dict(source.metadata))


@dataclass
class DictionarySettings:
    """One dictionary's shape and training run, as a user sets them (`mri train`'s options): an SAE on a Site,
    or a transcoder from one Site to another. `context` applies when streaming from a model, `heldout_shards`
    when training from a store (the streamed trainings below hold out windows instead)."""

    architecture: str = field(default="topk", metadata=_help("topk, batchtopk, jumprelu or relu"))
    width: int = field(default=REFERENCE_WIDTH, metadata=_help("number of latents (d_sae)"))
    k: int = field(default=32, metadata=_help("active latents per token (topk, batchtopk, crosscoder)"))
    tokens: int = field(default=2_000_000, metadata=_help("training tokens (the store or corpus is cycled if smaller)"))
    batch_size: int = _as(TrainConfig, "batch_size")
    skip: bool = field(default=False, metadata=_help("transcoder: add a linear skip connection"))
    lr: float | None = _as(TrainConfig, "lr")
    seed: int = _as(TrainConfig, "seed")
    context: int = field(default=256, metadata=_help("model source: tokens per window"))
    heldout_shards: int = field(
        default=0, metadata=_help("store: keep its last N shards out of training (for mri eval)")
    )

    def train_config(self) -> TrainConfig:
        """The Trainer's settings for this run (the optimiser's other settings at their defaults)."""
        return TrainConfig(total_tokens=self.tokens, batch_size=self.batch_size, lr=self.lr, seed=self.seed)


@dataclass
class TranscodersConfig(DictionarySettings):
    """Per-layer transcoders mlp.in.L -> mlp.out.L, trained together from one pass over a model's activations
    (`mri train-transcoders`). Every `heldout_every`-th window is held out for their metrics."""

    tokens: int = field(
        default=1_000_000, metadata=_help("training tokens per transcoder (the corpus is cycled if smaller)")
    )
    layers: list[int] | None = field(default=None, metadata=_help("the layers to train (None: every layer)"))
    heldout_every: int = field(
        default=50, metadata=_help("never train on every Nth window: the metrics' held-out windows (0: none)")
    )
    eval_windows: int = field(default=16, metadata=_help("held-out windows for each layer's FVU, L0 and dead"))
    downstream_windows: int = field(
        default=8, metadata=_help("held-out windows for each layer's CE loss recovered (0: skip)")
    )


@dataclass
class CrosscoderConfig(DictionarySettings):
    """A BatchTopK crosscoder over the same Site of several models (`mri train-crosscoder`)."""

    architecture: str = field(
        default="crosscoder", metadata=_help("crosscoder (one encoder over the models' concatenated activations)")
    )
    tokens: int = field(default=1_000_000, metadata=_help("training tokens (the corpus is cycled if smaller)"))


@dataclass
class CLTTrainConfig:
    """A cross-layer transcoder streamed from a model (`mri train-clt`, `train_clt`): BatchTopK per layer while
    training, saved as JumpReLU with per-feature thresholds calibrated afterwards. Every `heldout_every`-th
    window is held out for its metrics."""

    width: int = field(default=1024, metadata=_help("features per layer"))
    widths: list[int] | None = field(default=None, metadata=_help("features of each layer (overrides width)"))
    k: int = field(default=16, metadata=_help("active features per token per layer (BatchTopK, in training)"))
    tokens: int = field(default=200_000, metadata=_help("training tokens (the corpus is cycled if smaller)"))
    batch_size: int = field(default=1024, metadata=_help("rows per optimiser step"))
    lr: float = field(default=2e-3, metadata=_help("Adam learning rate"))
    skip: bool = field(default=False, metadata=_help("add a linear skip term per layer (a skip-CLT)"))
    seed: int = _as(TrainConfig, "seed")
    context: int = field(default=256, metadata=_help("tokens per window"))
    heldout_every: int = field(
        default=50, metadata=_help("never train on every Nth window: the metrics' held-out windows (0: none)")
    )
    eval_windows: int = field(default=8, metadata=_help("held-out windows for each layer's FVU and L0"))
    downstream_windows: int = field(
        default=4, metadata=_help("held-out windows for CE loss recovered with the whole CLT replacing the MLPs")
    )
    checkpoint_every: int = field(default=25, metadata=_help("steps between checkpoints"))
    calibration_batches: int = field(default=4, metadata=_help("batches that set the JumpReLU thresholds"))

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def widths_for(self, n_layers: int) -> list[int]:
        return list(self.widths) if self.widths is not None else [self.width] * n_layers
