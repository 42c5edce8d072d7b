"""Shared benchmark plumbing: the machine's fp32 GEMM rate, peer virtual environments, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
# Each peer gets its own environment: their pins clash (sae-lens wants transformer-lens < 4, etc.).
PEERS: dict[str, list[str]] = {
    "nnsight": ["nnsight==0.8.*"],
    "transformer_lens": ["transformer-lens==4.*"],
    "sae_lens": ["sae-lens==6.*"],
    "sparsify": ["eai-sparsify==1.*"],
    # delphi's own pins pull vLLM (a CUDA torch); its latent cache needs none of that
    "circuit_tracer": ["circuit-tracer==0.5.*", "nnsight==0.6.*"],  # 0.5 imports paths nnsight 0.7 moved
    "delphi": [
        "transformers>=4.56",
        "safetensors",
        "jaxtyping",
        "simple-parsing",
        "orjson",
        "blobfile",
        "asyncer",
        "faiss-cpu",
        "sentence-transformers",
        "tqdm",
        "beartype",
    ],
}
NO_DEPS: dict[str, list[str]] = {"delphi": ["eai-delphi==0.1.3"]}


def gemm_gflops(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> float:
    """Best observed fp32 matmul rate on this machine over a few square sizes (the FLOP roofline)."""
    best_rate = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best_rate


def peer_python(peer: str, log=print) -> Path:
    """The peer's venv interpreter, creating the venv on first use (torch==2.13.0 CPU first)."""
    venv = VENVS / peer
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    if not marker.exists():
        log(f"creating {venv} for {peer} (first run only)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, *PEERS[peer]], check=True)
        if peer in NO_DEPS:
            subprocess.run([*pip, "--no-deps", *NO_DEPS[peer]], check=True)
        marker.touch()
    return python


def run_peer(peer: str, script: str, *args: str, log=print) -> dict:
    python = peer_python(peer, log)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(python), str(BENCH / "peers" / script), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{peer} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(result: dict, as_json: bool) -> None:
    if not as_json:
        for key, value in result.items():
            print(f"{key:>32}: {value}")
    print(json.dumps(result))
