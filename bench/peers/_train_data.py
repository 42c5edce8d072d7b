"""Shared by the peer training scripts: the same cached activations, batches in the same order, and the
same held-out FVU, on the bench's device (_device). argv: train.npy heldout.npy width k batch_size steps.

On a GPU the training rows are uploaded once before the clock starts (as bench/train.py does for ours), so
no side times host-to-device copies; on the CPU they stream from the memory-mapped file."""

import json
import sys

import numpy as np
import torch
from _device import DEVICE, peak_mb


def args() -> tuple[np.ndarray, torch.Tensor, int, int, int, int]:
    train = np.load(sys.argv[1], mmap_mode="r")
    heldout = torch.from_numpy(np.load(sys.argv[2])).to(DEVICE)
    width, k, batch_size, steps = (int(v) for v in sys.argv[3:7])
    return train, heldout, width, k, batch_size, steps


def batches(train: np.ndarray, batch_size: int, steps: int):
    if DEVICE.type != "cpu":
        rows = torch.from_numpy(np.ascontiguousarray(train[: steps * batch_size])).to(DEVICE)
        for s in range(steps):
            yield rows[s * batch_size : (s + 1) * batch_size]
        return
    for s in range(steps):
        yield torch.from_numpy(np.ascontiguousarray(train[s * batch_size : (s + 1) * batch_size]))


def report(seconds: float, tokens: int, recon: torch.Tensor, heldout: torch.Tensor, fired: torch.Tensor) -> None:
    fvu = float((recon.float() - heldout).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum())
    dead = float((~fired).float().mean())
    print(json.dumps({"tokens_per_s": tokens / seconds, "fvu": fvu, "dead_frac": dead, "peak_mb": peak_mb()}))
