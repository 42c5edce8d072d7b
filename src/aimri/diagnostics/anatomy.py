"""Anatomy: the cheap, always-on part of a checkup. A logit lens per layer, attention-head roles
(previous-token, duplicate-token, induction) by their standard scores, and activation-norm outliers
(attention sinks and massive dimensions), which every later statistic must know about."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from aimri.progress import progress_bar
from aimri.subject.core import Subject


def unembed(subject: Subject, resid: Tensor) -> Tensor:
    """Logits from a residual [..., d_model] (any dtype; computed in the model's): the model's final norm and
    unembedding (the logit lens), [..., vocab] in fp32."""
    model: Any = subject.model
    weight = model.get_output_embeddings().weight  # on the model's device (an offloaded one: accelerate places it)
    resid = resid.to(device=subject.device, dtype=weight.dtype)
    norm = model.model.norm if hasattr(model, "model") and hasattr(model.model, "norm") else None
    if norm is None:
        norm = getattr(getattr(model, "transformer", None), "ln_f", None) or getattr(
            getattr(model, "gpt_neox", None), "final_layer_norm", None
        )
    h = norm(resid) if norm is not None else resid
    return model.get_output_embeddings()(h).float()


@torch.no_grad()
def logit_lens(subject: Subject, windows: Tensor, skip_first: int = 1) -> list[dict[str, float]]:
    """Per layer: KL(final ‖ lens) and how often the lens's top token is the model's, over positions after
    the first `skip_first` (position 0 is an attention sink whose residual is ~100x larger)."""
    layers = list(range(subject.n_layers))
    kl = torch.zeros(len(layers))
    agree = torch.zeros(len(layers))
    count = 0
    with progress_bar() as bar:
        task = bar.add_task("logit lens", total=len(windows))
        for w in windows.split(4):
            acts = subject.run(w, read=[f"resid.{layer}" for layer in layers], stop=False)
            final = acts["logits"][:, skip_first:].float().log_softmax(-1)
            top = final.argmax(-1)
            for layer in layers:
                lens = unembed(subject, acts[f"resid.{layer}"][:, skip_first:]).float().log_softmax(-1)
                kl[layer] += float((final.exp() * (final - lens)).sum(-1).sum())  # summed on the model's device
                agree[layer] += int((lens.argmax(-1) == top).sum())
            count += final.shape[0] * final.shape[1]
            bar.advance(task, len(w))
    return [
        {"layer": layer, "kl": float(kl[layer] / count), "top1_agree": float(agree[layer] / count)} for layer in layers
    ]


@contextmanager
def eager_attention(subject: Subject) -> Iterator[None]:
    """Attention weights are only returned by the eager kernel; switch to it for the duration."""
    model: Any = subject.model
    before = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before:
            model.set_attn_implementation(before)


@torch.no_grad()
def head_roles(subject: Subject, n: int = 8, length: int = 48, seed: int = 0) -> dict[str, Any]:
    """Standard head scores on random tokens repeated twice: previous-token (attention to i-1), duplicate-token
    (to the earlier copy of the same token) and induction (to the token after the earlier copy)."""
    vocab = int(subject.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    bos = subject.tokenizer.bos_token_id
    rand = torch.randint(min(1000, vocab // 4), min(vocab, 30000), (n, length), generator=g)  # skip special tokens
    seq = torch.cat([rand, rand], 1)
    if bos is not None:
        seq = torch.cat([torch.full((n, 1), bos), seq], 1)
    off = 1 if bos is not None else 0
    with eager_attention(subject):
        out: Any = subject.model(input_ids=seq.to(subject.device), output_attentions=True, use_cache=False)
    L, H = subject.n_layers, subject.n_heads
    scores = {k: torch.zeros(L, H) for k in ("previous_token", "duplicate_token", "induction")}
    second = torch.arange(off + length, off + 2 * length)
    for layer, att in enumerate(out.attentions):  # [n, H, T, T]
        a = att.float()
        first_half = torch.arange(off + 1, off + length)
        scores["previous_token"][layer] = a[:, :, first_half, first_half - 1].mean((0, 2))
        scores["duplicate_token"][layer] = a[:, :, second, second - length].mean((0, 2))
        scores["induction"][layer] = a[:, :, second[:-1] + 1, second[:-1] - length + 1].mean((0, 2))
    top = {
        k: [
            {"layer": int(i // H), "head": int(i % H), "score": float(v.flatten()[i])}
            for i in v.flatten().topk(5).indices
        ]
        for k, v in scores.items()
    }
    return {"scores": {k: v.tolist() for k, v in scores.items()}, "top": top}


@torch.no_grad()
def norm_outliers(subject: Subject, windows: Tensor) -> dict[str, Any]:
    """Residual norm by layer at position 0 against the rest, and the dimensions with massive activations."""
    layers = list(range(subject.n_layers))
    acts = subject.run(windows[:8], read=[f"resid.{layer}" for layer in layers])
    rows = []
    massive: list[dict[str, Any]] = []
    for layer in layers:
        a = acts[f"resid.{layer}"].float()
        first, rest = a[:, 0].norm(dim=-1).mean(), a[:, 1:].norm(dim=-1).mean()
        rows.append({"layer": layer, "norm_pos0": float(first), "norm_rest": float(rest), "ratio": float(first / rest)})
        peak = a[:, 1:].abs().amax((0, 1))
        typical = a[:, 1:].abs().median()
        for dim in (peak / typical.clamp_min(1e-6)).topk(2).indices.tolist():
            ratio = float(peak[dim] / typical.clamp_min(1e-6))
            if ratio > 100:
                massive.append({"layer": layer, "dim": dim, "peak_over_median": ratio})
    return {"by_layer": rows, "massive_dims": sorted(massive, key=lambda m: -m["peak_over_median"])[:10]}
