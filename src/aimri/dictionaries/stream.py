"""Training batches straight from a Subject, for when a store would not fit on disk (e.g. mlp.in and
mlp.out of every layer: 138 KB per token for SmolLM2).

Rows pass through a shuffle buffer; the sequence is a pure function of (corpus, model, seed), so a
resumed run replays it and skips the batches already trained on (the forward passes are recomputed)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from aimri.data.corpus import Corpus, Packing, pack
from aimri.errors import AimriError
from aimri.subject.core import Subject


def subject_batches(
    subject: Subject,
    corpus: Corpus,
    sites: Sequence[str],
    batch_size: int = 4096,
    context: int = 256,
    forward_batch: int = 8,
    buffer_rows: int = 65_536,
    seed: int = 0,
    sink_ratio: float = 20.0,
    epochs: int = 1_000_000,
) -> Iterator[dict[str, Tensor]]:
    """Yield {site: [batch_size, d]} with rows drawn at random from a buffer refilled by forward passes
    over packed windows (position 0, special tokens and attention sinks excluded, as in a harvest)."""
    names = [subject.site(s).name for s in sites]
    packing = Packing.for_tokenizer(subject.tokenizer, context)
    rng = np.random.default_rng(seed)
    buffer: dict[str, list[Tensor]] = {s: [] for s in names}
    buffered = 0
    for _epoch in range(epochs):
        windows = pack(corpus, subject.tokenizer, packing)
        produced = False
        while group := list(itertools.islice(windows, forward_batch)):
            produced = True
            ids = torch.from_numpy(np.stack([w.ids for w in group]))
            att = torch.from_numpy(np.stack([w.attention for w in group])).long()
            valid = torch.from_numpy(np.stack([w.valid for w in group]))
            acts = subject.run(ids, att, read=names)
            for s in names:
                if sink_ratio > 0 and valid.any():
                    norms = acts[s].norm(dim=-1)
                    valid &= norms <= sink_ratio * norms[valid].median()
            for s in names:
                if not torch.isfinite(acts[s][valid]).all():
                    raise AimriError(f"the model produced NaN/inf at {s}; check the model weights and dtype")
                buffer[s].append(acts[s][valid])
            buffered += int(valid.sum())
            if buffered >= buffer_rows:
                yield from _drain(buffer, names, batch_size, rng, keep=buffer_rows // 2)
                buffered = sum(len(t) for t in buffer[names[0]])
        if not produced:
            raise AimriError("the corpus yields no windows; check the corpus paths")


def _drain(
    buffer: dict[str, list[Tensor]], names: list[str], batch_size: int, rng: np.random.Generator, keep: int
) -> Iterator[dict[str, Tensor]]:
    """Shuffle the buffer, emit full batches until `keep` rows remain (they mix with the next refill)."""
    joined = {s: torch.cat(buffer[s]) for s in names}
    order = torch.from_numpy(rng.permutation(len(joined[names[0]])))
    n_out = max(0, (len(order) - keep) // batch_size) * batch_size
    for b in range(0, n_out, batch_size):
        idx = order[b : b + batch_size]
        yield {s: joined[s][idx] for s in names}
    rest = order[n_out:]
    for s in names:
        buffer[s] = [joined[s][rest]]
