"""Harvest: stream a Corpus through a Subject and write Site activations to an ActivationStore."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aimri.data.corpus import Corpus, Packing, Window, pack
from aimri.data.store import ActivationStore, ShardData, StoreWriter
from aimri.devices import Plan, dtype_name, out_of_memory
from aimri.distributed import Group
from aimri.errors import AimriError, StoreError
from aimri.progress import progress_bar
from aimri.subject.core import Subject
from aimri.subject.memory import forward_bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16}  # on disk (numpy, the shards' format, has no bfloat16)


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab_sha256": hashlib.sha256(vocab).hexdigest()}


def keep_rows(
    acts: dict[str, torch.Tensor], sites: Sequence[str], valid: torch.Tensor, sink_ratio: float, where: str
) -> torch.Tensor:
    """The harvest rule, shared by everything that reads activations for statistics or training: refuse
    NaN/inf at the candidate tokens, then drop attention sinks — tokens whose norm at any site exceeds
    `sink_ratio` x that batch's median there (0 keeps them). Returns the narrowed [batch, seq] mask, on
    `valid`'s device (the activations may be on another: a GPU's)."""
    for s in sites:
        if not torch.isfinite(acts[s][valid.to(acts[s].device)]).all():
            raise AimriError(f"the model produced NaN/inf at {s} in {where}; check the model weights and dtype")
    keep = valid.clone()
    if sink_ratio > 0:
        for s in sites:
            if keep.any():  # norms in fp32 whatever the model's dtype, on the mask's device (a [batch, seq] copy)
                norms = torch.linalg.vector_norm(acts[s], dim=-1, dtype=torch.float32).to(keep.device)
                keep &= norms <= sink_ratio * norms[keep].median()
    return keep


def harvest_plan(subject: Subject, context: int, batch_size: int, sites: int = 1) -> Plan:
    """The harvest's peak memory beyond the loaded model: `batch_size` windows of `context` tokens through
    the model, stopped after the last read Site (see aimri.subject.memory)."""
    per_window = forward_bytes(subject, context, reads=sites)
    return Plan("the harvest", subject.device, "`batch_size`", batch_size, per_window)


def _recorded_batch_size(out: str | Path) -> int | None:
    """The batch size a store at `out` was harvested with (None: no store there yet)."""
    manifest = Path(out) / "manifest.json"
    try:
        return int(json.loads(manifest.read_text())["spec"]["batch_size"]) if manifest.exists() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: StoreWriter says what is wrong with it


def _batched(it: Iterator[Window], n: int) -> Iterator[list[Window]]:
    while batch := list(itertools.islice(it, n)):
        yield batch


def harvest(
    subject: Subject,
    corpus: Corpus,
    sites: Sequence[str],
    out: str | Path,
    context: int = 256,
    batch_size: int | None = None,
    windows_per_shard: int = 32,
    max_tokens: int | None = None,
    dtype: str = "float32",
    exclude_special: bool = True,
    exclude_chat: bool = True,
    sink_ratio: float = 20.0,
    progress: bool = True,
    ranks: Group | None = None,
) -> ActivationStore:
    """Write activations of `sites` at every valid token of `corpus` into a store at `out`.

    Rerunning with the same arguments after an interruption (even `kill -9`) resumes after the last
    finished shard, and the result is identical to an uninterrupted run. With `ranks` (the torchrun group,
    `aimri.distributed.init_from_env()`) the ranks write alternate shards of the one store; None: a single
    process.

    Position 0 is never harvested, and neither is any token whose norm at a harvested site exceeds
    `sink_ratio` x the batch median there (0 disables): Llama-family models park "massive activations"
    (norms ~100x the rest) on the first token and on some early delimiters, and a few such rows would
    dominate every statistic and every dictionary trained on the store. Their count is in the manifest.

    The forward passes run on the Subject's device in its dtype (recorded as spec.model.dtype); rows are
    cast to the store's `dtype` there and copied to the host once. `batch_size` None: from the device's free
    memory (at most 8 windows on the CPU, 64 on a GPU), or the one a store being resumed recorded (the sink
    rule compares tokens within a batch, so the batch size is part of the store's spec). Raises DeviceError
    before any work when the batch will not fit (the estimate and the batch size that fits), and on an
    out-of-memory error mid-run (the finished shards are kept; a rerun resumes)."""
    if subject.tokenizer is None:
        raise AimriError("this Subject has no tokenizer; load it with aimri.load(...) or pass one")
    if not sites:
        raise AimriError("no sites to harvest; give `site` names, e.g. resid.15")
    parsed = [subject.site(s).name for s in sites]
    if len(set(parsed)) != len(parsed):
        raise AimriError(f"duplicate sites in {parsed}")
    if context > subject.context_length:
        raise AimriError(
            f"context {context} exceeds the model's {subject.context_length} positions; use `context` {subject.context_length} or less"
        )
    if dtype not in DTYPES:
        raise AimriError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    plan = harvest_plan(subject, context, batch_size or 1, len(parsed))
    if batch_size is None:  # the batch's median decides which tokens are sinks: a resumed store keeps its own
        batch_size = _recorded_batch_size(out) or plan.default_units(cap=8 if subject.device.type == "cpu" else 64)
    plan.units = batch_size
    if batch_size < 1 or windows_per_shard < 1:
        raise AimriError("batch size and windows per shard must be positive")
    plan.check()
    packing = Packing.for_tokenizer(subject.tokenizer, context, exclude_special, exclude_chat)
    max_windows = math.ceil(max_tokens / context) if max_tokens else None
    spec = {
        "model": {
            "name": subject.name,
            "revision": subject.revision,
            "architecture": type(subject.model).__name__,
            "n_layers": subject.n_layers,
            "dtype": dtype_name(subject.dtype),  # the precision the activations were computed in
        },
        "sites": parsed,
        "d": {s: subject.site_dim(s) for s in parsed},
        "dtype": dtype,
        "tokenizer": tokenizer_identity(subject.tokenizer),
        "packing": packing.describe(),
        "corpus": {"fingerprint": corpus.fingerprint()},
        "max_windows": max_windows,
        "sink_ratio": sink_ratio,
        "windows_per_shard": windows_per_shard,
        "batch_size": batch_size,
    }
    ranks = ranks or Group()
    ranks.agree("the harvest (model revision, sites, corpus, settings)", hashlib.sha256(
        json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest())  # fmt: skip
    writer = _open_writer(out, spec, ranks)
    if writer.manifest.get("complete"):
        return ActivationStore(out)
    kept = (
        "the finished shards are kept: resume with more free memory (a store keeps its batch size), or harvest "
        "into a new `out` with the lower one"
    )
    with writer.locked(), progress_bar(disable=not progress) as bar, out_of_memory(plan, kept):
        windows = pack(corpus, subject.tokenizer, packing)
        if max_windows is not None:
            windows = itertools.islice(windows, max_windows)
        mine = None if max_windows is None else math.ceil(max_windows / ranks.world)
        label = f"harvest {', '.join(parsed)}" + (f" (rank {ranks.rank}/{ranks.world})" if ranks.active else "")
        task = bar.add_task(label, total=mine, rate="")
        done = writer.done_indices
        bar.update(task, completed=len(done) * windows_per_shard)
        start, tokens_done, sinks, shards_seen = time.perf_counter(), 0, 0, 0
        for shard_index, shard_windows in enumerate(_batched(windows, windows_per_shard)):
            shards_seen = shard_index + 1
            if not writer.owns(shard_index) or shard_index in done:  # another rank's, or finished before
                continue
            acts: dict[str, list[np.ndarray]] = {s: [] for s in parsed}
            sinks_before = sinks
            index: dict[str, list[np.ndarray]] = {k: [] for k in ("tokens", "doc", "pos", "window", "offset")}
            for b, batch in enumerate(_batched(iter(shard_windows), batch_size)):
                ids = torch.from_numpy(np.stack([w.ids for w in batch]))
                attention = torch.from_numpy(np.stack([w.attention for w in batch]))
                valid = np.stack([w.valid for w in batch])
                out_acts = subject.run(ids, attention.long(), read=parsed, stop=True)
                sel = keep_rows(out_acts, parsed, torch.from_numpy(valid), sink_ratio, f"shard {shard_index}")
                sinks += int(valid.sum()) - int(sel.sum())
                valid = sel.numpy()
                on_device = sel.to(subject.device)
                for s in parsed:  # cast on the device, then one copy of the kept rows to the host
                    acts[s].append(out_acts[s][on_device].to(DTYPES[dtype]).cpu().numpy())
                first = shard_index * windows_per_shard + b * batch_size
                win_idx = np.broadcast_to(np.arange(first, first + len(batch))[:, None], valid.shape)
                offsets = np.broadcast_to(np.arange(valid.shape[1], dtype=np.int32), valid.shape)
                index["tokens"].append(ids.numpy()[valid])
                index["doc"].append(np.stack([w.doc for w in batch])[valid])
                index["pos"].append(np.stack([w.pos for w in batch])[valid])
                index["window"].append(win_idx[valid].astype(np.int64))
                index["offset"].append(offsets[valid])
                tokens_done += int(attention.sum())
                rate = tokens_done / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=len(batch), rate=f"{rate:,.0f} tok/s")
            writer.write_shard(
                ShardData(
                    {s: np.concatenate(v) for s, v in acts.items()}, {k: np.concatenate(v) for k, v in index.items()}
                ),
                extra={
                    "windows": [shard_index * windows_per_shard, shard_index * windows_per_shard + len(shard_windows)],
                    "sinks_excluded": sinks - sinks_before,
                },
                index=shard_index,
            )
        if ranks.world == 1 and shards_seen < len(done):
            raise AimriError(f"{out} has more shards than this corpus yields windows: the corpus changed")
        elapsed = time.perf_counter() - start
    totals = ranks.sum_(torch.tensor([tokens_done, sinks], dtype=torch.float64), "the harvest's last step")
    # these reductions also mean every rank has recorded its shards before rank 0 merges them
    elapsed = float(ranks.max_(torch.tensor([elapsed], dtype=torch.float64), "the harvest's last step")[0])
    if ranks.leader:
        writer.finish(
            tokens_forwarded=int(totals[0]), seconds=round(elapsed, 3), sinks_excluded=int(totals[1]), ranks=ranks.world
        )
    ranks.barrier("the harvest's last step")
    return ActivationStore(out)


def _open_writer(out: str | Path, spec: dict[str, Any], ranks: Group) -> StoreWriter:
    """Rank 0 checks (or creates) the store first, so every rank raises the same error or none."""
    problem = None
    writer = None
    rank, world = ranks.rank, ranks.world
    if ranks.leader:
        try:
            writer = StoreWriter(out, spec, rank, world)
            if world > 1 and not writer.manifest.get("complete"):  # before the others look at the folder
                writer.path.mkdir(parents=True, exist_ok=True)
                writer.write_manifest()
        except AimriError as err:
            problem = str(err)
    problem = ranks.all_gather(problem, "opening the store")[0]
    if problem:
        raise StoreError(problem)
    return writer or StoreWriter(out, spec, rank, world)
