"""Runs inside the eai-delphi venv: delphi's latent cache (its first pipeline stage: every nonzero latent
activation over the token windows, then saved as per-split safetensors) for one SAE at one layer.

delphi_cache.py MODEL_DIR SAE_DIR windows.npz LAYER
Prints one JSON line: tokens_per_s, peak_rss_mb, nonzeros.
"""

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from delphi.latents import LatentCache
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir, sae_dir, windows, layer = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_grad_enabled(False)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
weights = load_file(sae_dir / "sae_weights.safetensors")
k = json.loads((sae_dir / "cfg.json").read_text())["k"]
W_enc, b_enc, b_dec = weights["W_enc"].contiguous(), weights["b_enc"], weights["b_dec"]


def encode(x: torch.Tensor) -> torch.Tensor:
    """TopK SAE codes, dense [batch, seq, d_sae], as delphi's sparse-model wrappers hand them over."""
    pre = torch.relu((x.float() - b_dec) @ W_enc + b_enc)
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)


tokens = torch.from_numpy(np.load(windows)["ids"]).long()
cache = LatentCache(model, {f"model.layers.{layer}": encode}, batch_size=32)
cache.run(32 * tokens.shape[1], tokens[:32])  # warm-up batch, outside the timing
cache = LatentCache(model, {f"model.layers.{layer}": encode}, batch_size=32)
start = time.perf_counter()
cache.run(tokens.numel(), tokens)
with tempfile.TemporaryDirectory() as out:
    cache.save_splits(n_splits=5, save_dir=Path(out))
seconds = time.perf_counter() - start
nonzeros = sum(len(v) for v in cache.cache.latent_locations.values())
print(json.dumps({
    "tokens_per_s": tokens.numel() / seconds,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "nonzeros": nonzeros,
}))  # fmt: skip
