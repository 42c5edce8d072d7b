"""A stand-in for wandb on the GPU machine (bench/gpu.sh copies it into sae-lens's package folder when no
wandb is installed there): sae-lens imports wandb at module level but calls it only when logging to Weights
& Biases, which the bench never does (SAETrainerConfig's logger has log_to_wandb=False). The real wheel is
20 MB of the 64 MiB a GPU run may carry. Any use fails loudly, naming this file."""

from typing import Any

__version__ = "0.0.0+aimri-bench-stub"


def __getattr__(name: str) -> Any:
    raise AttributeError(f"wandb.{name}: this is bench/gpu_stubs/wandb, a stand-in that logs nothing")
