"""Memory estimates for a Subject's forward and backward passes, from its config's shapes (bytes).

Estimates, not measurements: they count the tensors a decoder layer holds at its peak (the residual, the
attention's q/k/v/output, the MLP's gated hidden activations, and the attention scores where the kernel
materialises them) and the logits where asked for. aimri.devices.Plan turns them into a refusal before
work when a job would not fit. Measured once on SmolLM2-135M (fp32, CPU, 8 windows of 256 tokens read at
resid.15): estimate 167 MiB, peak resident-memory growth 123 MiB (it errs high: no kernel keeps every term
at once).
"""

from __future__ import annotations

from typing import Any


def weights_bytes(subject: Any) -> int:
    """Bytes the model's parameters occupy in their dtype."""
    return int(sum(p.numel() * p.element_size() for p in subject.model.parameters()))


def forward_bytes(subject: Any, context: int, logits: bool = False, grad: bool = False, reads: int = 1) -> int:
    """Peak bytes one window of `context` tokens adds during a forward pass (per batch row).

    `logits`: the pass runs to the end (fp32 [context, vocab] logits, as transformers upcasts them);
    `grad`: activations of every layer are kept for a backward pass (attribution, fine-tuning);
    `reads`: how many [context, d_model] fp32 activations the pass hands back (taps)."""
    cfg = subject.config
    itemsize = next(subject.model.parameters()).element_size()
    d = subject.d_model
    hidden = int(getattr(cfg, "intermediate_size", None) or 4 * d)
    heads = subject.n_heads
    layer = context * (6 * d + 3 * hidden) * itemsize + heads * context * context * itemsize
    total = layer * (subject.n_layers if grad else 2)  # a forward frees each layer's temporaries
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if logits:
        total += context * vocab * 4 * (2 if grad else 1)
    return int(total + reads * context * d * 4)
