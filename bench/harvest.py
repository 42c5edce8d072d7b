"""Harvest throughput: tokens/s writing resid.15 of the default model to a store, on real text.

Ratios measured in this run: against the FLOP roofline (the GEMM rate measured now: fp32 on the CPU, bf16
on a GPU) and against nnsight 0.8 and transformer-lens 4.x doing the same job on the same batches, each in
its own venv, on the same device and in the same dtype (--device / --dtype, passed to the peers).

    python bench/harvest.py --json [--device cuda] [--model DIR] [--corpus FILE]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aimri
from aimri.data.corpus import Corpus, Packing, pack
from aimri.data.default_corpus import default_corpus_path
from aimri.data.harvest import harvest
from common import add_device_args, device_label, dtype_name, emit, peak_gflops, resolve, run_peer, synchronize


def flops_per_token(subject: aimri.Subject, layer: int, context: int) -> float:
    """Multiply-adds x 2 of blocks 0..layer: every Linear in a block, plus causal attention
    (QK^T and AV over (context+1)/2 keys on average). Embedding lookup costs none; the stop skips the rest."""
    block = subject.layer(0)
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * 2 * subject.n_heads * subject.head_dim * (context + 1) / 2
    return (layer + 1) * (2 * linear + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--site", default="resid.15")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", default="nnsight,transformer_lens", help="comma list; empty for none")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, .gguf file or HF directory")
    parser.add_argument("--corpus", type=Path, default=None, help="text corpus (default: the default corpus)")
    parser.add_argument("--peer-timeout", type=float, default=None, help="seconds each peer run may take")
    add_device_args(parser)
    args = parser.parse_args()
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    layer = int(args.site.split(".")[1])

    device, dtype = resolve(args)
    subject = aimri.load(args.model, device=device, dtype=dtype)
    model_dir = str(subject.model.name_or_path)  # the HF directory it loaded (a GGUF's converted copy)
    corpus = Corpus.from_paths([args.corpus or default_corpus_path(log=log)])
    n_windows = args.batches * args.batch_size
    tokens = n_windows * args.context
    packing = Packing.for_tokenizer(subject.tokenizer, args.context)
    windows = list(itertools.islice(pack(corpus, subject.tokenizer, packing), n_windows))
    if len(windows) < n_windows:
        raise SystemExit(f"the corpus gives {len(windows)} windows of {args.context} tokens; {n_windows} needed")
    shape = (args.batches, args.batch_size, args.context)
    batches = {k: np.stack([getattr(w, k) for w in windows]).reshape(shape) for k in ("ids", "attention", "valid")}
    work = Path(tempfile.mkdtemp(prefix="aimri-bench-"))
    np.savez(
        work / "batches.npz",
        ids=batches["ids"],
        attention=batches["attention"].astype(np.int64),
        valid=batches["valid"],
    )

    gflops = peak_gflops(device)
    fpt = flops_per_token(subject, layer, args.context)

    # ours, the real job: pack + forward (stopped after the site) + write a checksummed store
    ids0 = torch.from_numpy(batches["ids"][0])
    subject.run(ids0, torch.from_numpy(batches["attention"][0]).long(), read=[args.site])  # warm-up
    synchronize(device)
    peers = [p for p in ("nnsight", "transformer_lens") if p in args.peers.split(",")]
    ours_s = fwd_s = float("inf")
    theirs: dict[str, float] = {}
    checksum = 0.0
    errors: dict[str, str] = {}
    # Rounds interleave ours and the peers, keeping each one's best: this machine's timings wander ~10%.
    for attempt in range(args.rounds):
        start = time.perf_counter()
        store = harvest(subject, corpus, [args.site], work / f"store{attempt}", context=args.context,
                        batch_size=args.batch_size, windows_per_shard=args.batch_size * 4, max_tokens=tokens,
                        progress=False)  # fmt: skip
        ours_s = min(ours_s, time.perf_counter() - start)  # the store is on disk: the device's work is done
        shutil.rmtree(work / f"store{attempt}")
        # ours, forward only (rows copied to host memory, as the peers' are): the part every library shares
        start = time.perf_counter()
        checksum = 0.0
        for b in range(args.batches):
            ids_b, att_b = torch.from_numpy(batches["ids"][b]), torch.from_numpy(batches["attention"][b]).long()
            acts = subject.run(ids_b, att_b, read=[args.site])
            act = acts[args.site]
            rows = act[torch.from_numpy(batches["valid"][b]).to(act.device)].float().cpu().numpy()
            checksum += float(rows.astype(np.float64).sum())
        synchronize(device)
        fwd_s = min(fwd_s, time.perf_counter() - start)
        for peer in peers:
            if peer in errors:
                continue
            try:
                out = run_peer(
                    peer,
                    f"{peer}_harvest.py",
                    str(model_dir),
                    str(work / "batches.npz"),
                    str(layer),
                    log=log,
                    device=device,
                    dtype=dtype,
                    timeout=args.peer_timeout,
                )
            except Exception as err:  # report, do not hide: the figure is then missing from the JSON
                log(f"{peer}: {err}")
                errors[peer] = str(err)[-300:]
                continue
            theirs[peer] = max(theirs.get(peer, 0.0), out["tokens_per_s"])
            # the same job: the peer's activations at the same valid tokens sum to the same value
            theirs[f"{peer}_rel_diff"] = abs(out["checksum"] - checksum) / abs(checksum)
    ours, ours_fwd = tokens / ours_s, tokens / fwd_s

    result: dict[str, object] = {
        "tokens_per_s": round(ours, 1),
        "tokens_per_s_forward_only": round(ours_fwd, 1),
        "roofline_ratio": round(ours * fpt / (gflops * 1e9), 3),
        "roofline_ratio_forward_only": round(ours_fwd * fpt / (gflops * 1e9), 3),
        "gemm_gflops": round(gflops, 1),
        "model": subject.name,
        "dtype": dtype_name(dtype),
        "gflop_per_token": round(fpt / 1e9, 4),
        "tokens": tokens,
        "batch_size": args.batch_size,
        "context": args.context,
        "site": args.site,
        "rows_stored": store.rows,
        "rounds": args.rounds,
    }
    for peer in peers:
        if peer in errors:
            result[f"error_{peer}"] = errors[peer]
            continue
        result[f"{peer}_tokens_per_s"] = round(theirs[peer], 1)
        result[f"speedup_vs_{peer}"] = round(ours / theirs[peer], 3)
        result[f"{peer}_checksum_rel_diff"] = float(f"{theirs[f'{peer}_rel_diff']:.2e}")
    result["device"] = device_label(device)
    shutil.rmtree(work, ignore_errors=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
