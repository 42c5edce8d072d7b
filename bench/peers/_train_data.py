"""Shared by the peer training scripts: the same cached activations, batches in the same order, and the
same held-out FVU. argv: train.npy heldout.npy width k batch_size steps."""

import json
import resource
import sys

import numpy as np
import torch


def args() -> tuple[np.ndarray, torch.Tensor, int, int, int, int]:
    train = np.load(sys.argv[1], mmap_mode="r")
    heldout = torch.from_numpy(np.load(sys.argv[2]))
    width, k, batch_size, steps = (int(v) for v in sys.argv[3:7])
    return train, heldout, width, k, batch_size, steps


def batches(train: np.ndarray, batch_size: int, steps: int):
    for s in range(steps):
        yield torch.from_numpy(np.ascontiguousarray(train[s * batch_size : (s + 1) * batch_size]))


def report(seconds: float, tokens: int, recon: torch.Tensor, heldout: torch.Tensor, fired: torch.Tensor) -> None:
    fvu = float((recon - heldout).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dead = float((~fired).float().mean())
    print(json.dumps({"tokens_per_s": tokens / seconds, "fvu": fvu, "dead_frac": dead, "peak_mb": peak_mb}))
