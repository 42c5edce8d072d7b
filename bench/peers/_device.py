"""The device and dtype a peer script runs on: bench/common.py's run_peer passes them as AIMRI_BENCH_DEVICE
("cpu", "cuda", "cuda:0"; default cpu) and AIMRI_BENCH_DTYPE (the model's dtype; default float32), so every
peer runs where ours runs. Imported from the peer's own environment: torch only."""

import os

import torch

DEVICE = torch.device(os.environ.get("AIMRI_BENCH_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("AIMRI_BENCH_DTYPE", "float32"))


def synchronize() -> None:
    """Wait for queued GPU work before a host clock is read (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def peak_mb() -> float:
    """Peak memory of this process on its device: the CUDA allocator's peak there, else the peak RSS."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(DEVICE) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
