"""Dictionary training throughput and quality: our TopK trainer, sae-lens and eai-sparsify on the same
cached activations (resid.15 of the default model), architecture, width, k and token count, in one run,
all on one device (--device; on a GPU every side's training rows are uploaded once, before its clock).
--dtype is the dtype of the model that harvests the activations (the store keeps them in fp32).

    python bench/train.py --json [--store DIR] [--device cuda] [--model DIR] [--corpus FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aimri
from aimri.data.corpus import Corpus
from aimri.data.default_corpus import default_corpus_path
from aimri.data.harvest import harvest
from aimri.data.store import ActivationStore
from aimri.dictionaries import DictionaryConfig, TrainConfig, Trainer
from aimri.dictionaries.train import bf16_gemm_is_fast
from aimri.paths import aimri_home
from aimri.subject.names import model_name
from common import add_device_args, device_label, dtype_name, emit, peak_gflops, resolve, run_peer, synchronize


def cached_rows(
    store_dir: Path | None, site: str, rows: int, log, model: str = "smollm2-135m-instruct",
    corpus: Path | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None,
) -> np.ndarray:  # fmt: skip
    """The first `rows` activations of a store, harvesting one (cached under $AIMRI_HOME) if needed."""
    if store_dir is None:
        name = "smollm2" if model == "smollm2-135m-instruct" else model_name(model)
        store_dir = aimri_home() / "bench" / f"{name}-{site}-{rows}"
        if not (store_dir / "manifest.json").exists() or not ActivationStore(store_dir).complete:
            log(f"harvesting {rows:,} rows of {site} into {store_dir} (cached for later runs)")
            subject = aimri.load(model, device=device, dtype=dtype)
            harvest(
                subject,
                Corpus.from_paths([corpus or default_corpus_path(log=log)]),
                [site],
                store_dir,
                max_tokens=int(rows * 1.02) + 4096,
                progress=False,
            )
            del subject
    store = ActivationStore(store_dir)
    if store.rows < rows:
        raise SystemExit(f"{store_dir} holds {store.rows} rows; need {rows}")
    return np.concatenate(list(store.batches(site, rows, shuffle=True, seed=0)))[:rows]


def train_config(device: torch.device, **settings: object) -> TrainConfig:
    """TrainConfig on `device`. A TrainConfig without a device field (an aimri before device support) is
    accepted on the CPU only."""
    if "device" in {f.name for f in dataclasses.fields(TrainConfig)}:
        return TrainConfig(**settings, device=str(device))  # type: ignore[arg-type]
    if device.type != "cpu":
        raise SystemExit(f"this aimri's TrainConfig has no `device` field: cannot train on {device}")
    return TrainConfig(**settings)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--store", type=Path, default=None, help="store holding the site (default: harvest a cached one)"
    )
    parser.add_argument("--site", default="resid.15")
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--heldout", type=int, default=8192)
    parser.add_argument("--peers", default="sae_lens,sparsify")
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="the model harvested when --store is not given"
    )
    parser.add_argument("--corpus", type=Path, default=None, help="text to harvest (default: the default corpus)")
    parser.add_argument("--peer-timeout", type=float, default=None, help="seconds each peer run may take")
    add_device_args(parser)
    args = parser.parse_args()
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    device, dtype = resolve(args)

    train_rows = args.steps * args.batch_size
    rows = cached_rows(args.store, args.site, train_rows + args.heldout, log, args.model, args.corpus, device, dtype)
    work = Path(tempfile.mkdtemp(prefix="aimri-train-bench-"))
    np.save(work / "train.npy", rows[:train_rows])
    np.save(work / "heldout.npy", rows[train_rows:])
    heldout = torch.from_numpy(rows[train_rows:].copy()).to(device)
    d = rows.shape[1]
    gflops = peak_gflops(device)
    # every side gets its rows on the device before its clock starts (on the CPU: views, no copy)
    on_device = torch.from_numpy(rows[:train_rows]).to(device)
    batches = [on_device[s * args.batch_size : (s + 1) * args.batch_size] for s in range(args.steps)]

    chosen: list[str] = []  # the Trainer's resolved selection dtype ("auto" resolved by device)

    def train_ours(select_dtype: str) -> tuple[float, float, float]:
        """tokens/s, held-out FVU and dead fraction of our TopK trainer."""
        trainer = Trainer(
            DictionaryConfig("topk", d, args.width, k=args.k),
            train_config(device, total_tokens=train_rows, batch_size=args.batch_size, select_dtype=select_dtype),
        )
        chosen.append(trainer.select_dtype)
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            trainer.step(batch)
        synchronize(device)
        seconds = time.perf_counter() - start
        model = trainer.export().to(device)
        with torch.no_grad():
            codes = model.encode(heldout)
            fvu = float((model.decode(codes) - heldout).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum())
            dead = float((~(codes > 0).any(0)).float().mean())
        return train_rows / seconds, fvu, dead

    # on the CPU: bf16 selection where the CPU multiplies bf16 natively, checked against fp32; on a GPU the
    # Trainer's own choice ("auto"), one run
    select = "auto" if device.type != "cpu" else ("bfloat16" if bf16_gemm_is_fast() else "float32")
    warm = Trainer(
        DictionaryConfig("topk", d, args.width, k=args.k), train_config(device, total_tokens=4 * args.batch_size)
    )
    for s in range(3):  # first-touch allocations and GEMM kernel selection, outside the timing
        warm.step(batches[s % len(batches)])
    del warm
    ours, fvu, dead = train_ours(select)
    exact_rate, exact_fvu, _ = train_ours("float32") if select == "bfloat16" else (ours, fvu, dead)
    # FLOPs we actually perform per token: the dense encoder GEMM, plus k-row sparse work (decode forward,
    # the three sparse backward products); the roofline is the GEMM rate measured now (fp32 on the CPU, also
    # for a bf16 selection; bf16 on a GPU)
    flops = 2 * d * args.width + 8 * args.k * d
    result: dict[str, object] = {
        "tokens_per_s": round(ours, 1),
        "roofline_ratio": round(ours * flops / (gflops * 1e9), 3),
        "gflop_per_token": round(flops / 1e9, 6),
        "fvu": round(fvu, 4),
        "dead_frac": round(dead, 4),
        "select_dtype": chosen[0],
        "tokens_per_s_fp32_select": round(exact_rate, 1),
        "fvu_fp32_select": round(exact_fvu, 4),
        "gemm_gflops": round(gflops, 1),
        "site": args.site,
        "model_dtype": dtype_name(dtype),
        "width": args.width,
        "k": args.k,
        "train_tokens": train_rows,
        "heldout_tokens": args.heldout,
    }
    args_peer = [
        str(work / "train.npy"),
        str(work / "heldout.npy"),
        str(args.width),
        str(args.k),
        str(args.batch_size),
        str(args.steps),
    ]
    for peer in [p for p in args.peers.split(",") if p]:
        try:
            theirs = run_peer(peer, f"{peer}_train.py", *args_peer, log=log, device=device, timeout=args.peer_timeout)
        except Exception as err:
            log(f"{peer}: {err}")
            result[f"error_{peer}"] = str(err)[-300:]
            continue
        result[f"speedup_vs_{peer}"] = round(ours / theirs["tokens_per_s"], 3)
        result[f"fvu_{peer}"] = round(theirs["fvu"], 4)
        result[f"dead_frac_{peer}"] = round(theirs["dead_frac"], 4)
        result[f"{peer}_tokens_per_s"] = round(theirs["tokens_per_s"], 1)
    result["device"] = device_label(device)
    emit(result, args.json)


if __name__ == "__main__":
    main()
