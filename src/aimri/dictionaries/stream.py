"""Training batches straight from Subjects, for when a store would not fit on disk (e.g. mlp.in and
mlp.out of every layer: 138 KB per token for SmolLM2), and for crosscoders (two models, same tokens).

Rows pass through a shuffle buffer; the sequence is a pure function of (corpus, models, seed), so a
resumed run replays it and skips the batches already trained on (the forward passes are recomputed)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aimri.data.corpus import Corpus, Packing, Window, pack
from aimri.data.harvest import keep_rows
from aimri.errors import AimriError
from aimri.subject.core import Subject

Reader = Callable[[Tensor, Tensor], dict[str, Tensor]]


def training_windows(tokenizer: Any, corpus: Corpus, context: int, heldout_every: int = 0) -> Iterator[Window]:
    """The corpus' windows minus every `heldout_every`-th one (0: none held out)."""
    windows = pack(corpus, tokenizer, Packing.for_tokenizer(tokenizer, context))
    if not heldout_every:
        return windows
    return (w for i, w in enumerate(windows) if i % heldout_every != heldout_every - 1)


def heldout_windows(tokenizer: Any, corpus: Corpus, context: int, heldout_every: int, n: int) -> list[Window]:
    """The first `n` windows a stream with `heldout_every` never trains on."""
    windows = pack(corpus, tokenizer, Packing.for_tokenizer(tokenizer, context))
    return list(itertools.islice(itertools.islice(windows, heldout_every - 1, None, heldout_every), n))


def _stream(
    tokenizer: Any, corpus: Corpus, read: Reader, names: list[str], batch_size: int, context: int,
    forward_batch: int, buffer_rows: int | None, seed: int, sink_ratio: float, heldout_every: int = 0,
) -> Iterator[dict[str, Tensor]]:  # fmt: skip
    rng = np.random.default_rng(seed)
    buffer: dict[str, list[Tensor]] = {s: [] for s in names}
    buffered = 0
    while True:  # epochs
        windows = training_windows(tokenizer, corpus, context, heldout_every)
        produced = False
        while group := list(itertools.islice(windows, forward_batch)):
            produced = True
            ids = torch.from_numpy(np.stack([w.ids for w in group]))
            att = torch.from_numpy(np.stack([w.attention for w in group])).long()
            valid = torch.from_numpy(np.stack([w.valid for w in group]))
            acts = read(ids, att)
            valid = keep_rows(acts, names, valid, sink_ratio, "a training stream")
            for s in names:
                buffer[s].append(acts[s][valid])
            buffered += int(valid.sum())
            if buffer_rows is None:  # sized from the first batch's row width
                buffer_rows = shuffle_rows(sum(4 * acts[s].shape[-1] for s in names), batch_size)
            if buffered >= buffer_rows:
                yield from _drain(buffer, names, batch_size, rng, keep=buffer_rows // 2)
                buffered = sum(len(t) for t in buffer[names[0]])
        if not produced:
            raise AimriError("the corpus yields no windows; check the corpus paths")


def shuffle_rows(row_bytes: int, batch_size: int, budget_bytes: int = 2 << 30, most: int = 65_536) -> int:
    """Rows the shuffle buffer holds: `most`, or fewer when they would not fit in `budget_bytes` (the drain
    briefly doubles it): sixty sites of a 576-wide model are 138 KB a row. At least two batches."""
    return max(2 * batch_size, min(most, budget_bytes // max(1, row_bytes)))


def _drain(
    buffer: dict[str, list[Tensor]], names: list[str], batch_size: int, rng: np.random.Generator, keep: int
) -> Iterator[dict[str, Tensor]]:
    """Shuffle the buffer, emit full batches until `keep` rows remain (they mix with the next refill)."""
    joined = {s: torch.cat(buffer[s]) for s in names}  # on the model's device: a GPU's rows stay there
    order = torch.from_numpy(rng.permutation(len(joined[names[0]]))).to(joined[names[0]].device)
    n_out = max(0, (len(order) - keep) // batch_size) * batch_size
    for b in range(0, n_out, batch_size):
        idx = order[b : b + batch_size]
        yield {s: joined[s][idx] for s in names}
    rest = order[n_out:]
    for s in names:
        buffer[s] = [joined[s][rest]]


def stream_memory(
    subject: Subject, sites: Sequence[str], batch_size: int, context: int, forward_batch: int = 8
) -> dict[str, float]:
    """A training stream's fixed memory on the model's device (bytes): the shuffle buffer (doubled while it
    drains) and one forward pass of `forward_batch` windows reading `sites`; for aimri.devices.Plan."""
    from aimri.subject.memory import forward_bytes

    row = 4 * sum(subject.site_dim(s) for s in sites)
    return {
        "shuffle buffer": 2.0 * shuffle_rows(row, batch_size) * row,
        "forward pass": float(forward_batch * forward_bytes(subject, context, reads=len(sites))),
    }


def subject_batches(
    subject: Subject, corpus: Corpus, sites: Sequence[str], batch_size: int = 4096, context: int = 256,
    forward_batch: int = 8, buffer_rows: int | None = None, seed: int = 0, sink_ratio: float = 20.0,
    heldout_every: int = 0,
) -> Iterator[dict[str, Tensor]]:  # fmt: skip
    """Yield {site: [batch_size, d]}: rows of one Subject at several Sites (position 0, special tokens and
    attention sinks excluded, as in a harvest), shuffled through a buffer; every `heldout_every`-th
    window is left out (see `heldout_windows`)."""
    names = [subject.site(s).name for s in sites]

    def read(ids: Tensor, att: Tensor) -> dict[str, Tensor]:  # fp32 rows from any model dtype: training is fp32
        return {k: v.float() for k, v in subject.run(ids, att, read=names).items()}

    options = (batch_size, context, forward_batch, buffer_rows, seed, sink_ratio, heldout_every)
    return _stream(subject.tokenizer, corpus, read, names, *options)


def paired_batches(
    subjects: Sequence[Subject], corpus: Corpus, site: str, batch_size: int = 4096, context: int = 256,
    forward_batch: int = 8, buffer_rows: int | None = None, seed: int = 0, sink_ratio: float = 20.0,
) -> Iterator[Tensor]:  # fmt: skip
    """Crosscoder data: the same Site of several Subjects on the same tokens, concatenated source-major
    ([batch, sources x d]). The Subjects must share a tokenizer (a model and its fine-tune do)."""
    from aimri.data.harvest import tokenizer_identity

    first = tokenizer_identity(subjects[0].tokenizer)["vocab_sha256"]
    for other in subjects[1:]:
        if tokenizer_identity(other.tokenizer)["vocab_sha256"] != first:
            raise AimriError(
                f"{subjects[0].name} and {other.name} have different tokenizers; a crosscoder needs the same tokens"
            )
    name = subjects[0].site(site).name
    names = [f"{i}:{name}" for i in range(len(subjects))]

    def read(ids: Tensor, att: Tensor) -> dict[str, Tensor]:
        home = subjects[0].device  # the models may sit on different devices; the rows meet on the first's
        return {n: s.run(ids, att, read=[name])[name].float().to(home) for n, s in zip(names, subjects, strict=True)}

    options = (batch_size, context, forward_batch, buffer_rows, seed, sink_ratio)
    stream = _stream(subjects[0].tokenizer, corpus, read, names, *options)
    for batch in stream:
        yield torch.cat([batch[n] for n in names], dim=1)
