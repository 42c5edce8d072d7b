"""Streaming feature statistics: one pass over a corpus, memory fixed by the dictionary's width, never by
the corpus' length. Per feature it keeps running moments, the top windows by peak activation, a uniform
reservoir of activating windows (for quantile-stratified examples), a log-spaced histogram (for
quantiles) and co-firing counts; each window's token ids and its tokens' top codes go to disk, so the
per-token activations of the chosen examples can be read back at the end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aimri.data.corpus import Corpus, Packing, pack
from aimri.data.harvest import keep_rows
from aimri.data.store import ActivationStore
from aimri.devices import Plan, out_of_memory
from aimri.dictionaries.base import Dictionary
from aimri.dictionaries.match import packing_for
from aimri.errors import AimriError
from aimri.progress import progress_bar
from aimri.subject.core import Subject
from aimri.subject.memory import forward_bytes

HIST_EDGES = torch.logspace(-4, 4, 65)  # activation histogram bins (log10 -4 .. 4), for quantiles


@dataclass
class Mined:
    """What one pass leaves: per-feature arrays plus the on-disk windows and codes."""

    tokens: int
    windows: int
    context: int
    fires: Tensor  # [F] tokens the feature fired on
    act_sum: Tensor
    act_max: Tensor
    hist: Tensor  # [F, bins] counts of positive activations per log bin
    top_act: Tensor  # [F, N] peak activation of the top windows (-inf: empty)
    top_win: Tensor  # [F, N]
    sample_act: Tensor  # [F, R] peak activation of reservoir-sampled activating windows
    sample_win: Tensor  # [F, R] (-1: empty)
    cofire: Tensor | None  # dense [F, F] int32 co-firing token counts (first `cofire_tokens` tokens; F <= 16384)
    cofire_tokens: int
    ids_path: Path  # [windows, context] int32 token ids
    codes_path: Path  # [windows, context, k] (int32 index, float16 value) per token
    k_stored: int
    extra: dict = field(default_factory=dict)

    def window_ids(self) -> np.ndarray:
        return np.memmap(self.ids_path, dtype=np.int32, mode="r", shape=(self.windows, self.context))

    def window_codes(self) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.windows, self.context, self.k_stored)
        idx = np.memmap(self.codes_path, dtype=np.int32, mode="r", shape=shape)
        val = np.memmap(self.codes_path.with_suffix(".val"), dtype=np.float16, mode="r", shape=shape)
        return idx, val

    def example_acts(self, features: np.ndarray, windows: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """[n, context]: the activation of features[i] on every token of windows[i], for many pairs at once."""
        idx, val = self.window_codes()
        out = np.zeros((len(features), self.context), np.float32)
        order = np.argsort(windows, kind="stable")  # memmap reads in file order
        for start in range(0, len(order), chunk):
            sel = order[start : start + chunk]
            w = windows[sel]
            hit = idx[w] == features[sel][:, None, None]
            out[sel] = np.where(hit, val[w].astype(np.float32), 0.0).sum(-1)
        return out


def _merge_top(vals: Tensor, refs: Tensor, new_vals: Tensor, new_refs: Tensor) -> tuple[Tensor, Tensor]:
    """Keep each row's N largest of (vals ++ new_vals), with their refs."""
    all_vals = torch.cat([vals, new_vals], 1)
    all_refs = torch.cat([refs, new_refs], 1)
    best, where = all_vals.topk(vals.shape[1], dim=1)
    return best, all_refs.gather(1, where)


def add_cofiring(cofire: Tensor, on: Tensor, idx: Tensor, dense: bool | None = None) -> None:
    """cofire[F*F] += how many tokens fire each pair, from per-token kept codes `idx` [T, k] firing where
    `on`. Sparse codes add their pairs; dense firing (neurons) takes one GEMM instead of a pair list
    that would not fit in memory."""
    F = math.isqrt(len(cofire))
    if dense is None:
        dense = int(on.sum(1).pow(2).sum()) > len(on) * F
    if not dense:
        both = on[:, :, None] & on[:, None, :]
        flat = (idx[:, :, None] * F + idx[:, None, :])[both]
        cofire.index_add_(0, flat, torch.ones(len(flat), dtype=torch.int32))
    else:
        hits = torch.zeros(len(on), F).scatter_(1, idx, on.float())
        cofire += (hits.T @ hits).round().int().view(-1)


def store_windows(
    store: ActivationStore, site: str, tokenizer: Any, corpus: Corpus, batch_windows: int = 32
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """A harvested store's rows put back into their windows, for `mine(source=...)`: (ids [B, context],
    valid [B, context] bool: the rows the harvest kept, activations [B, context, d] fp32, zero where not valid), in window order. The token ids of the positions the harvest left out
    (BOS, special tokens, sinks) come from packing `corpus` again as the store's spec says.

    Raises AimriError when `corpus` no longer yields the store's tokens or `site` is not in the store."""
    spec = store.spec
    recorded = spec["packing"]  # the harvest's flags, read back from what they produced
    packing = Packing.for_tokenizer(tokenizer, int(recorded["context"]), bool(recorded["exclude_ids"]),
                                    int(recorded.get("n_newline_ids", 0)) > 0)  # fmt: skip
    if packing.describe() != spec["packing"]:
        raise AimriError(f"{store.path} was packed with another tokenizer's rules; mine it with its own model")
    windows = pack(corpus, tokenizer, packing)
    next_window = 0
    for i, shard in enumerate(store.shards):
        first, end = shard["windows"]
        if first < next_window:
            raise AimriError(f"{store.path}: shards are out of window order; run `mri store verify {store.path}`")
        for _ in itertools.islice(windows, first - next_window):  # windows of shards not in the store
            pass
        group = list(itertools.islice(windows, end - first))
        next_window = end
        if len(group) != end - first:
            raise AimriError(f"the corpus yields fewer windows than {store.path} was harvested from: it changed")
        acts, win, off, toks = (store.array(i, n) for n in (site, "window", "offset", "tokens"))
        ids = torch.from_numpy(np.stack([w.ids for w in group]))
        rows, cols = torch.from_numpy(win - first), torch.from_numpy(off.astype(np.int64))
        if not torch.equal(ids[rows, cols], torch.from_numpy(np.array(toks))):
            raise AimriError(f"the corpus no longer yields the tokens {store.path} was harvested from: it changed")
        valid = torch.zeros(ids.shape, dtype=torch.bool)
        valid[rows, cols] = True
        full = torch.zeros(*ids.shape, acts.shape[1])
        full[rows, cols] = torch.from_numpy(np.array(acts, dtype=np.float32))
        for b in range(0, len(group), batch_windows):
            yield ids[b : b + batch_windows], valid[b : b + batch_windows], full[b : b + batch_windows]


def atlas_plans(
    subject: Subject, F: int, context: int, batch_windows: int, top_n: int, reservoir: int, from_model: bool = True
) -> list[Plan]:
    """The atlas pass's peak memory: on the host, the per-feature statistics (top examples, reservoir, histogram,
    co-firing counts up to 16,384 features) and each batch's dense codes; on the model's device, the forward
    pass and the codes (a GPU's come back to the host once per batch). Bytes, estimated from the shapes."""
    stats = F * (8 * (2 + len(HIST_EDGES) + 1) + 12 * (top_n + 2 * reservoir))
    host = Plan("the atlas (host)", torch.device("cpu"), "`batch_windows`", batch_windows, 8.0 * context * F,
                {"feature statistics": stats, "co-firing counts": 4.0 * F * F if F <= 16384 else 0.0})  # fmt: skip
    if subject.device.type == "cpu" or not from_model:
        return [host]
    per_window = forward_bytes(subject, context) + 4.0 * context * F
    return [host, Plan("the atlas (model)", subject.device, "`batch_windows`", batch_windows, per_window)]


@torch.no_grad()
def mine(
    dictionary: Dictionary,
    subject: Subject,
    corpus: Corpus,
    workdir: Path,
    tokens: int = 1_000_000,
    context: int = 64,
    batch_windows: int = 32,
    top_n: int = 20,
    reservoir: int = 64,
    cofire_tokens: int = 200_000,
    k_stored: int | None = None,
    seed: int = 0,
    sink_ratio: float = 20.0,
    progress: bool = True,
    source: Iterable[tuple[Tensor, Tensor, Tensor]] | None = None,
) -> Mined:
    """One pass over `tokens` tokens of `corpus` in windows of `context` (opened as the dictionary's training
    windows were), or over `source`'s batches of (ids [B, context], valid [B, context] bool, activations
    [B, context, d]) already read from the model (e.g. `store_windows`: a harvested store's
    rows, so the model is not run twice); `tokens` then caps the windows read. The dictionary encodes on the
    Subject's device (a GPU's codes come back to the host once per batch); the statistics are kept on the host."""
    cfg = dictionary.cfg
    site = subject.site(cfg.site).name
    if subject.site_dim(site) != cfg.d_in:
        raise AimriError(f"{site} is {subject.site_dim(site)} wide; the dictionary expects d_in={cfg.d_in}")
    F = cfg.d_sae
    dictionary = dictionary.on(subject.device)  # encoded on the model's device; statistics on the host
    packing = packing_for(dictionary, subject.tokenizer, context)  # windows open as the dictionary's training ones
    n_windows = max(1, tokens // context)
    plans = atlas_plans(subject, F, context, batch_windows, top_n, reservoir, from_model=source is None)
    for plan in plans:
        plan.check()  # refused before any work, with the estimate and the `batch_windows` that fits
    workdir.mkdir(parents=True, exist_ok=True)
    ids_path, codes_path = workdir / "windows.i32", workdir / "codes.idx"
    ids_mm = np.memmap(ids_path, dtype=np.int32, mode="w+", shape=(n_windows, context))
    idx_mm = val_mm = None  # sized at the first batch, from its L0
    gen = torch.Generator().manual_seed(seed)
    fires = torch.zeros(F, dtype=torch.int64)
    act_sum, act_max = torch.zeros(F, dtype=torch.float64), torch.zeros(F)
    hist = torch.zeros(F, len(HIST_EDGES) + 1, dtype=torch.int64)
    top_act, top_win = torch.full((F, top_n), -float("inf")), torch.full((F, top_n), -1, dtype=torch.int64)
    keys = torch.full((F, reservoir), -float("inf"))
    sample_act, sample_win = torch.zeros(F, reservoir), torch.full((F, reservoir), -1, dtype=torch.int64)
    cofire = torch.zeros(F * F, dtype=torch.int32) if F <= 16384 else None
    seen_tokens = cofire_seen = done = 0
    dictionary.eval()

    def from_model() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        windows = pack(corpus, subject.tokenizer, packing)
        while group := list(itertools.islice(windows, batch_windows)):
            ids = torch.from_numpy(np.stack([w.ids for w in group]))
            att = torch.from_numpy(np.stack([w.attention for w in group])).long()
            acts = subject.run(ids, att, read=[site])
            valid = keep_rows(
                acts, [site], torch.from_numpy(np.stack([w.valid for w in group])), sink_ratio, "the atlas"
            )
            yield ids, valid, acts[site]

    batches = iter(source) if source is not None else from_model()
    with (
        progress_bar(disable=not progress) as bar,
        out_of_memory(plans[-1], "nothing is written until the atlas is whole"),
    ):
        task = bar.add_task("atlas", total=n_windows, rate="")
        while done < n_windows and (batch := next(batches, None)) is not None:
            ids, valid, site_acts = (t[: n_windows - done] for t in batch)
            B = len(ids)
            if ids.shape[1] != context:
                raise AimriError(f"the activations come in windows of {ids.shape[1]} tokens, not the atlas' {context}")
            # the dictionary computes in its dtype (a bf16 model's activations are cast to it), statistics in fp32
            codes = dictionary.encode(site_acts.reshape(B * context, -1).to(dictionary.W_enc)).float().cpu()
            codes = codes.reshape(B, context, F)
            codes = codes * valid[..., None]
            if not torch.isfinite(codes).all():
                raise AimriError(f"the dictionary produced NaN/inf codes at windows {done}..{done + B}")
            win = torch.arange(done, done + B)
            if idx_mm is None or val_mm is None:  # per token, the k largest codes are kept for the examples:
                # enough for every firing code at this batch's largest L0 (up to 512)
                most = int((codes > 0).sum(-1).max())
                k_stored = k_stored or min(F, max(64, 1 << max(0, most - 1).bit_length()), 512)
                shape = (n_windows, context, k_stored)
                idx_mm = np.memmap(codes_path, dtype=np.int32, mode="w+", shape=shape)
                val_mm = np.memmap(codes_path.with_suffix(".val"), dtype=np.float16, mode="w+", shape=shape)
            top_vals, top_idx = codes.topk(int(k_stored or F), dim=-1)
            ids_mm[done : done + B] = ids.numpy()
            idx_mm[done : done + B] = top_idx.int().numpy()
            val_mm[done : done + B] = top_vals.clamp_min(0).half().numpy()
            active = codes > 0
            fires += active.sum((0, 1))
            act_sum += codes.sum((0, 1)).double()
            act_max = torch.maximum(act_max, codes.amax((0, 1)))
            positive = codes[active]
            feats = active.nonzero()[:, 2]
            bins = torch.bucketize(positive, HIST_EDGES)
            hist.view(-1).index_add_(0, feats * hist.shape[1] + bins, torch.ones_like(bins))
            peak = codes.amax(1).T.contiguous()  # [F, B]: each window's peak per feature
            top_act, top_win = _merge_top(top_act, top_win, peak, win.expand(F, B))
            fired_win = peak > 0
            new_keys = torch.where(fired_win, torch.rand(F, B, generator=gen), torch.tensor(-float("inf")))
            merged_keys = torch.cat([keys, new_keys], 1)
            keys, where = merged_keys.topk(reservoir, dim=1)
            sample_act = torch.cat([sample_act, peak], 1).gather(1, where)
            sample_win = torch.cat([sample_win, win.expand(F, B)], 1).gather(1, where)
            sample_win[~torch.isfinite(keys)] = -1
            if cofire is not None and cofire_seen < cofire_tokens:  # pairs of firing codes on each token
                keep = valid.reshape(-1)
                on = top_vals.reshape(B * context, -1)[keep] > 0
                idx = top_idx.reshape(B * context, -1)[keep]
                add_cofiring(cofire, on, idx)
                cofire_seen += int(keep.sum())
            seen_tokens += int(valid.sum())
            done += B
            bar.update(task, advance=B, rate=f"{seen_tokens:,} tokens")
    if done == 0 or idx_mm is None or val_mm is None or k_stored is None:
        raise AimriError("the corpus yields no windows; check the corpus paths")
    for mm in (ids_mm, idx_mm, val_mm):
        mm.flush()
    return Mined(
        tokens=seen_tokens, windows=done, context=context, fires=fires, act_sum=act_sum, act_max=act_max,
        hist=hist, top_act=top_act, top_win=top_win, sample_act=sample_act, sample_win=sample_win,
        cofire=None if cofire is None else cofire.view(F, F), cofire_tokens=cofire_seen, ids_path=ids_path, codes_path=codes_path, k_stored=k_stored,
    )  # fmt: skip
