"""Scale-out on this machine, measured in one run on the default model (resid.15):

1. harvest with 1 process vs 2 torchrun ranks (gloo): tokens/s, and that both stores are byte-identical;
2. data-parallel training from that store, 1 vs 2 ranks: seconds for the same steps;
3. TopK training from the store on disk at growing width (16k ... 1M latents): tokens/s, peak memory and
   the FLOP roofline ratio per width, each width in its own process; eai-sparsify on the same rows, batch
   and steps up to --peer-max-width (its dense autograd holds a [batch, width] graph).

    python bench/scale.py --json [--widths 16384,65536,262144,1048576]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, gemm_gflops, run_peer

SITE = "resid.15"


def mri(*args: str, threads: int | None = None) -> float:
    """Run `mri ARGS`; returns wall seconds (start-up included)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aimri.cli", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mri {' '.join(args)} failed: {done.stderr.strip()[-1500:]}")
    return time.perf_counter() - start


def child_train(store_dir: str, width: int, k: int, batch: int, steps: int) -> None:
    """One width, in its own process so its peak memory is its own: prints tokens/s and peak MB. Timed from
    the first step (first touch of the weights and Adam's moments included), as the peer is."""
    from aimri.data.store import ActivationStore
    from aimri.dictionaries import DictionaryConfig, TrainConfig, Trainer
    from aimri.dictionaries.train import store_batches

    store = ActivationStore(store_dir)
    trainer = Trainer(DictionaryConfig("topk", store.d(SITE), width, k=k), TrainConfig(steps * batch, batch))
    batches = store_batches(store, [SITE], batch, seed=0)  # memory-mapped shards: the store is never loaded whole
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(next(batches))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": steps * batch / seconds, "peak_mb": peak, "fvu": trainer.last["fvu"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to harvest")
    parser.add_argument("--widths", default="16384,65536,262144,1048576")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--peers", default="sparsify")
    parser.add_argument("--peer-max-width", type=int, default=262144)
    parser.add_argument("--child", nargs=5, metavar=("STORE", "WIDTH", "K", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        store, width, k, batch, steps = args.child
        child_train(store, int(width), int(k), int(batch), int(steps))
        return
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    from aimri.data.store import ActivationStore

    work = Path(tempfile.mkdtemp(prefix="aimri-scale-"))
    gflops = gemm_gflops()
    threads = os.cpu_count() or 1
    result: dict[str, object] = {"gemm_gflops": round(gflops, 1)}

    # 1. harvest: one process with every core vs two ranks with half each
    common = ["harvest", "--site", SITE, "--max-tokens", str(args.tokens), "--quiet"]
    mri(*common, "--out", str(work / "warm"), "--max-tokens", "512")  # model conversion / corpus build, untimed
    harvest_rate = {}
    for ranks in (1, 2):
        out = work / f"store-{ranks}"
        # one process gets every core; with --nproc each rank gets cores / ranks threads
        nproc = ["--nproc", str(ranks)] if ranks > 1 else []
        wall = mri(*common, "--out", str(out), *nproc, threads=threads if ranks == 1 else None)
        summary = ActivationStore(out).manifest["summary"]
        harvest_rate[ranks] = summary["tokens_forwarded"] / summary["seconds"]
        log(f"harvest, {ranks} rank(s): {harvest_rate[ranks]:,.0f} tok/s in the loop, {wall:.1f} s wall")
        result[f"harvest_wall_s_{ranks}_ranks"] = round(wall, 1)
    one, two = ActivationStore(work / "store-1"), ActivationStore(work / "store-2")
    result["harvest_tokens_per_s_by_ranks"] = {r: round(v, 1) for r, v in harvest_rate.items()}
    result["harvest_speedup_2_ranks"] = round(harvest_rate[2] / harvest_rate[1], 3)
    result["stores_identical"] = [s["files"] for s in one.shards] == [s["files"] for s in two.shards]
    store = work / "store-2"

    # 2. data-parallel training, same global batch and steps
    train_seconds = {}
    for ranks in (1, 2):
        out = work / f"sae-{ranks}"
        mri("train", str(store), "--site", SITE, "--width", "16384", "--k", str(args.k), "--tokens",
            str(8 * args.batch_size), "--batch-size", str(args.batch_size), "--out", str(out), "--quiet",
            *(["--nproc", str(ranks)] if ranks > 1 else []), threads=threads if ranks == 1 else None)  # fmt: skip
        train_seconds[ranks] = json.loads((out / "training.json").read_text())["seconds"]
    result["train_seconds_by_ranks"] = train_seconds
    result["train_speedup_2_ranks"] = round(train_seconds[1] / train_seconds[2], 3)

    # 3. width sweep from the store on disk
    rows = one.rows
    need = args.steps * args.batch_size
    if rows < need:
        raise SystemExit(f"the store holds {rows} rows; --steps x --batch-size needs {need}: raise --tokens")
    train_npy, heldout_npy = work / "train.npy", work / "heldout.npy"
    data = np.concatenate(list(one.batches(SITE, rows, shuffle=True, seed=0)))
    np.save(train_npy, data[:need])
    np.save(heldout_npy, data[need : need + 1024] if rows > need else data[:1024])
    d = data.shape[1]
    by_width: dict[str, dict[str, float]] = {}
    for width in (int(w) for w in args.widths.split(",")):
        command = [sys.executable, __file__, "--child", str(store), str(width), str(args.k), str(args.batch_size),
                   str(args.steps)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"width {width}: failed ({done.stderr.strip()[-300:]})")
            by_width[str(width)] = {"error": done.stderr.strip()[-200:]}  # type: ignore[dict-item]
            continue
        ours = json.loads(done.stdout.strip().splitlines()[-1])
        flops = 2 * d * width + 8 * args.k * d  # the dense encoder GEMM + the k-sparse rest, per token
        entry = {
            "tokens_per_s": round(ours["tokens_per_s"], 1),
            "peak_mb": round(ours["peak_mb"]),
            "roofline_ratio": round(ours["tokens_per_s"] * flops / (gflops * 1e9), 3),
            # W_enc and W_dec, each with its gradient and Adam's two moments: 8 fp32 copies of d x width
            "state_mb": round(8 * d * width * 4 / 2**20),
        }
        for peer in [p for p in args.peers.split(",") if p and width <= args.peer_max_width]:
            try:
                theirs = run_peer(peer, f"{peer}_train.py", str(train_npy), str(heldout_npy), str(width),
                                  str(args.k), str(args.batch_size), str(args.steps), log=log)  # fmt: skip
            except Exception as err:
                entry[f"error_{peer}"] = str(err)[-200:]  # type: ignore[assignment]
                continue
            entry[f"speedup_vs_{peer}"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
            entry[f"{peer}_peak_mb"] = round(theirs["peak_mb"])
        log(f"width {width}: {entry}")
        by_width[str(width)] = entry
    result["by_width"] = by_width
    ok = [w for w, e in by_width.items() if "tokens_per_s" in e]
    result["tokens_per_s_by_width"] = {w: by_width[w]["tokens_per_s"] for w in ok}
    result["peak_mb_by_width"] = {w: by_width[w]["peak_mb"] for w in ok}
    result["max_width_ok"] = max((int(w) for w in ok), default=0)
    speedups = [e["speedup_vs_sparsify"] for e in by_width.values() if "speedup_vs_sparsify" in e]
    if speedups:
        result["speedup_vs_sparsify"] = min(speedups)
    result["roofline_ratio"] = min((by_width[w]["roofline_ratio"] for w in ok), default=0.0)
    result["device"] = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    emit(result, args.json)


if __name__ == "__main__":
    main()
