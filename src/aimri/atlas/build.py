"""`build_atlas`: mine a dictionary's features over a corpus and write the atlas database.

The database is written under a temporary name and renamed when complete, so an interrupted build never
leaves a half-written atlas where a finished one was expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aimri.atlas.db import Atlas
from aimri.atlas.mine import HIST_EDGES, Mined, mine, store_windows
from aimri.data.corpus import Corpus
from aimri.dictionaries.base import Dictionary, dictionary_sha
from aimri.dictionaries.match import check_model
from aimri.paths import fsync_dir
from aimri.subject.core import Subject

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def token_strings(tokenizer: Any) -> list[str]:
    """Every vocabulary id decoded on its own (how a card shows tokens: ' Texas', not 'ĠTexas')."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def quantiles_from_hist(hist: Tensor) -> list[dict[str, float] | None]:
    """Per feature, activation quantiles (when firing) read off its log-binned histogram."""
    edges = HIST_EDGES.double()
    mids = torch.cat([edges[:1], (edges[:-1] * edges[1:]).sqrt(), edges[-1:]])
    counts = hist.double()
    total = counts.sum(1, keepdim=True)
    cum = counts.cumsum(1) / total.clamp_min(1)
    out: list[dict[str, float] | None] = []
    where = {q: (cum < q).sum(1).clamp_max(len(mids) - 1) for q in QUANTILES}
    for f in range(len(hist)):
        out.append(None if total[f] == 0 else {str(q): round(float(mids[where[q][f]]), 4) for q in QUANTILES})
    return out


def _top_per_row(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, n_rows: int, n: int) -> list[list]:
    order = np.lexsort((-scores, rows))
    rows, cols, scores = rows[order], cols[order], scores[order]
    starts = np.searchsorted(rows, np.arange(n_rows + 1))
    return [
        [[int(c), round(float(s), 4)] for c, s in zip(cols[a : a + n], scores[a : a + n], strict=True)]
        for a in starts[:-1]
    ]


@torch.no_grad()
def logit_effects(dictionary: Dictionary, subject: Subject, vocab: list[str], n: int = 10) -> list[tuple[list, list]]:
    """Top and bottom tokens of each decoder direction read through the unembedding (W_dec @ W_U^T)."""
    unembed: Any = subject.model.get_output_embeddings()  # type: ignore[operator]
    if unembed is None or unembed.weight.shape[1] != dictionary.cfg.out_dim:
        return [([], [])] * dictionary.d_sae
    W_U = unembed.weight.detach().float()
    out = []
    for start in range(0, dictionary.d_sae, 512):
        logits = dictionary.W_dec[start : start + 512].float().to(W_U.device) @ W_U.T  # on the model's device
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        top, bottom = (type(t)((t.values.cpu(), t.indices.cpu())) for t in (top, bottom))
        for tv, ti, bv, bi in zip(top.values, top.indices, bottom.values, bottom.indices, strict=True):
            out.append(
                (
                    [[vocab[i], round(float(v), 4)] for v, i in zip(tv, ti, strict=True)],
                    [[vocab[i], round(float(v), 4)] for v, i in zip(bv, bi, strict=True)],
                )
            )
    return out


@torch.no_grad()
def decoder_neighbours(dictionary: Dictionary, n: int = 10) -> list[list]:
    W = dictionary.W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = []
    for start in range(0, len(W), 1024):
        cos = W[start : start + 1024] @ W.T
        cos[torch.arange(len(cos)), torch.arange(start, start + len(cos))] = -2.0
        v, i = cos.topk(min(n, len(W) - 1), dim=1)
        out += [
            [[int(a), round(float(b), 4)] for a, b in zip(ii, vv, strict=True)] for ii, vv in zip(i, v, strict=True)
        ]
    return out


def cofiring(mined: Mined, n: int = 10) -> list[list]:
    """Per feature, the features most often firing on the same tokens (Jaccard index); empty lists when
    the dictionary was too wide to count pairs (over 16384 features)."""
    F = len(mined.fires)
    if mined.cofire is None:
        return [[] for _ in range(F)]
    counts = mined.cofire.double()
    diag = counts.diagonal().clone()
    out = []
    for start in range(0, F, 1024):
        block = counts[start : start + 1024]
        jaccard = block / (diag[start : start + 1024, None] + diag[None, :] - block).clamp_min(1)
        jaccard[torch.arange(len(block)), torch.arange(start, start + len(block))] = 0
        v, i = jaccard.topk(min(n, F - 1), dim=1)
        out += [
            [[int(a), round(float(b), 4)] for a, b in zip(ii, vv, strict=True) if b > 0]
            for ii, vv in zip(i, v, strict=True)
        ]
    return out


def build_atlas(
    dictionary: Dictionary,
    subject: Subject,
    corpus: Corpus,
    out: str | Path,
    tokens: int = 1_000_000,
    context: int = 64,
    top_n: int = 20,
    reservoir: int = 64,
    negatives: int = 10,
    dictionary_name: str = "",
    seed: int = 0,
    progress: bool = True,
    allow_other_model: bool = False,
    store: str | Path | None = None,
    batch_windows: int = 32,
) -> Atlas:
    """Mine `dictionary`'s features over `tokens` tokens of `corpus` run through `subject` and write the atlas
    (SQLite) at `out` (temp file, rename). With `store` (a store harvested from `corpus` by `subject` at the
    dictionary's site) its rows are mined instead of running the model again, in its windows (`context` is
    the store's). Raises AimriError when the dictionary was trained on another model
    (aimri.dictionaries.match.check_model; `allow_other_model` for a deliberate transfer), or when the store
    is another model's or no longer matches `corpus`."""
    check_model(dictionary, subject, allow_other_model)
    source = None
    if store is not None:
        from aimri.data.store import ActivationStore
        from aimri.dictionaries.match import check_dtype, check_store

        held = ActivationStore(store)
        check_store(held, f"the model given, {subject.name}", subject.revision, allow_other_model)
        check_dtype(held, dictionary)  # refuses a less precise store; a more precise one is read as fp32
        context = int(held.spec["packing"]["context"])
        tokens = min(tokens, max(end for _, end in (s["windows"] for s in held.shards)) * context)
        source = store_windows(held, subject.site(dictionary.cfg.site).name, subject.tokenizer, corpus)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".atlas-", dir=out.parent))
    try:
        mined = mine(dictionary, subject, corpus, work, tokens=tokens, context=context, top_n=top_n,
                     reservoir=reservoir, seed=seed, progress=progress, source=source,
                     batch_windows=batch_windows)  # fmt: skip
        tmp = work / "atlas.sqlite"
        atlas = Atlas.create(tmp)
        _write(atlas, mined, dictionary, subject, negatives, seed)
        cfg = dictionary.cfg
        atlas.set_meta(
            format="aimri.atlas", version=1, model=subject.name, model_revision=subject.revision, site=cfg.site,
            site_out=cfg.site_out, architecture=cfg.architecture, d_sae=cfg.d_sae, d_in=cfg.d_in,
            dictionary_name=dictionary_name or f"{cfg.architecture}-w{cfg.d_sae}", dictionary_sha=dictionary_sha(dictionary),
            tokens=mined.tokens, windows=mined.windows, context=context, corpus=corpus.fingerprint(),
            cofire_tokens=mined.cofire_tokens, complete=True,
        )  # fmt: skip
        atlas.commit()
        atlas.db.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Atlas(out)


def _write(atlas: Atlas, mined: Mined, dictionary: Dictionary, subject: Subject, negatives: int, seed: int) -> None:
    F = len(mined.fires)
    vocab = token_strings(subject.tokenizer)
    quant = quantiles_from_hist(mined.hist)
    logits = logit_effects(dictionary, subject, vocab)
    neighbours = decoder_neighbours(dictionary)
    cofire = cofiring(mined)
    density = (mined.fires.double() / max(mined.tokens, 1)).tolist()
    mean = (mined.act_sum / mined.fires.clamp_min(1)).tolist()
    atlas.db.executemany(
        "INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (f, int(mined.fires[f]), density[f], mean[f], float(mined.act_max[f]), json.dumps(quant[f]),
             json.dumps(logits[f][0]), json.dumps(logits[f][1]), json.dumps(neighbours[f]), json.dumps(cofire[f]))
            for f in range(F)
        ],
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    feats, wins, kinds, ranks, quants = [], [], [], [], []
    negative_pool = rng.integers(0, mined.windows, size=(F, 3 * negatives))
    pool_acts = mined.example_acts(np.repeat(np.arange(F), 3 * negatives), negative_pool.reshape(-1))
    # negatives: windows where the feature stays under 5% of its largest activation (for a sparse feature:
    # never fires; a dense MLP neuron is positive somewhere in almost every window)
    pool_fired = pool_acts.reshape(F, 3 * negatives, -1).max(-1) > 0.05 * mined.act_max.numpy()[:, None]
    for f in range(F):
        top = mined.top_win[f][torch.isfinite(mined.top_act[f]) & (mined.top_act[f] > 0)].numpy()
        valid = mined.sample_win[f] >= 0
        sample_win = mined.sample_win[f][valid].numpy()[np.argsort(mined.sample_act[f][valid].numpy())]
        deciles = (np.arange(len(sample_win)) * 10 // max(len(sample_win), 1)).tolist()
        neg = np.unique(negative_pool[f][~pool_fired[f]])[:negatives]
        for kind, chosen, q in (("top", top, [None] * len(top)), ("sample", sample_win, deciles),
                                ("negative", neg, [None] * len(neg))):  # fmt: skip
            feats += [f] * len(chosen)
            wins += chosen.tolist()
            kinds += [kind] * len(chosen)
            ranks += list(range(len(chosen)))
            quants += q
    acts = mined.example_acts(np.asarray(feats, np.int64), np.asarray(wins, np.int64))
    peaks = acts.max(1, initial=0.0)
    half = acts.astype(np.float16)
    atlas.db.executemany(
        "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            (feats[i], kinds[i], ranks[i], quants[i], wins[i], float(peaks[i]), half[i].tobytes())
            for i in range(len(feats))
        ),
    )
    used = set(wins)
    ids = mined.window_ids()
    atlas.db.executemany(
        "INSERT INTO windows VALUES (?, ?)", [(w, json.dumps([vocab[i] for i in ids[w]])) for w in sorted(used)]
    )
    atlas.commit()
