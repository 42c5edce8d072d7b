"""Shared benchmark plumbing: the machine's GEMM rate (fp32 on the CPU, the model dtype's on a GPU), the
--device / --dtype options, peer environments (virtual environments here; plain folders on PYTHONPATH where
`AIMRI_PEER_SITES` names them, as on the GPU machine, see bench/gpu.sh), JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, as the `mri` commands take them (aimri.devices); the peers get the same ones."""
    parser.add_argument("--device", default="auto", help="auto (cuda when torch sees one, else cpu), cuda, cuda:N, cpu")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the model's dtype: auto (fp32 on cpu, bf16 on cuda), float32, bfloat16, float16",
    )


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The torch device and model dtype that --device / --dtype name on this machine."""
    from aimri.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work before a host clock is read (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device}: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def peak_gflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 10) -> float:
    """The GEMM rate the roofline ratios divide by, measured now: on the CPU, `gemm_gflops` (the best fp32
    rate over a few sizes: bf16 is emulated on most CPUs); on a GPU, an n x n x n product in `dtype` on
    random data (never zeros: they run faster), mean of `repeats` timed with CUDA events after 3 warm-ups.
    `AIMRI_BENCH_PEAK_GFLOPS` (bench/gpu.sh measures it once per run) overrides the measurement."""
    if os.environ.get("AIMRI_BENCH_PEAK_GFLOPS"):
        return float(os.environ["AIMRI_BENCH_PEAK_GFLOPS"])
    if device.type != "cuda":
        return gemm_gflops()
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.mm(a, b)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds / 1e9


def peer_env(peer: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = "float32") -> dict[str, str]:
    """The environment a peer script runs in: offline, and told the device and dtype to run on
    (AIMRI_BENCH_DEVICE / AIMRI_BENCH_DTYPE, read by bench/peers/_device.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "AIMRI_BENCH_DEVICE": str(device),
           "AIMRI_BENCH_DTYPE": dtype if isinstance(dtype, str) else dtype_name(dtype)}  # fmt: skip
    sites = os.environ.get("AIMRI_PEER_SITES")
    if sites:  # the GPU machine: no venvs, the peer's packages in their own folder ahead of the rest
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(sites) / peer), env.get("PYTHONPATH", "")) if p)
    return env


def peer_python(peer: str, log=print) -> Path:
    """The peer's interpreter: this one where `AIMRI_PEER_SITES` holds the peers' packages (bench/gpu.sh),
    else its venv, created on first use (torch==2.13.0 CPU first) unless `AIMRI_BENCH_NO_PEER_INSTALL` is set."""
    sites = os.environ.get("AIMRI_PEER_SITES")
    if sites:
        if not (Path(sites) / peer).is_dir():
            raise RuntimeError(f"{peer} is not installed under {sites} (see bench/gpu_wheels.txt)")
        return Path(sys.executable)
    venv = VENVS / peer
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    if not marker.exists() and os.environ.get("AIMRI_BENCH_NO_PEER_INSTALL"):
        raise RuntimeError(f"{peer}: no ready venv at {venv} and AIMRI_BENCH_NO_PEER_INSTALL is set")
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


def run_peer(
    peer: str,
    script: str,
    *args: str,
    log=print,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = "float32",
    timeout: float | None = None,
) -> dict:
    """Run bench/peers/SCRIPT in the peer's environment on `device` in `dtype`; its last stdout line, as JSON.
    Raises RuntimeError (with the end of its stderr) when it fails or outlasts `timeout` seconds."""
    python = peer_python(peer, log)
    env = peer_env(peer, device, dtype)
    try:
        done = subprocess.run([str(python), str(BENCH / "peers" / script), *args], capture_output=True, text=True,
                              env=env, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{peer} did not finish in {timeout:.0f} s") from err
    if done.returncode != 0:
        raise RuntimeError(f"{peer} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(result: dict, as_json: bool) -> None:
    if not as_json:
        for key, value in result.items():
            print(f"{key:>32}: {value}")
    print(json.dumps(result))
