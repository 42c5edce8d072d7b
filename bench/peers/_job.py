"""The harvest job every peer script times the same way (imported from the peer's own venv), on the device
bench/common.py's run_peer names (_device.DEVICE)."""

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch


def load_batches() -> tuple[str, torch.Tensor, torch.Tensor, np.ndarray, int]:
    """argv: model_dir batches.npz layer -> (model_dir, ids, attention, valid, layer)."""
    model_dir, batches_path, layer = sys.argv[1], sys.argv[2], int(sys.argv[3])
    data = np.load(batches_path)
    return model_dir, torch.from_numpy(data["ids"]), torch.from_numpy(data["attention"]), data["valid"], layer


def time_job(one: Callable[[int], np.ndarray], n_batches: int, n_tokens: int) -> None:
    """One timed pass (after a warm-up batch) of: activations of every batch at its valid tokens, saved to
    disk. One pass per round, like ours: the bench keeps each side's best round. `one` returns host (numpy)
    rows, so a GPU's work is finished when the clock stops."""
    one(0)  # warm-up
    out = tempfile.mkdtemp()
    elapsed, rows = float("inf"), []
    for _ in range(1):
        start = time.perf_counter()
        rows = [one(b) for b in range(n_batches)]
        for b, r in enumerate(rows):
            np.save(f"{out}/batch{b}.npy", r)
        elapsed = min(elapsed, time.perf_counter() - start)
    shutil.rmtree(out)
    checksum = float(sum(float(r.astype(np.float64).sum()) for r in rows))
    print(
        json.dumps({"tokens_per_s": n_tokens / elapsed, "rows": int(sum(len(r) for r in rows)), "checksum": checksum})
    )
