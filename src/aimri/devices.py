"""Devices and dtypes: which accelerator a stage runs on, in which precision, and whether its job fits.

One rule for every stage: `device=None` (or "auto") means the first CUDA device when torch sees one, else
the CPU; the model's dtype defaults to fp32 on the CPU (bf16 matmul is emulated, hundreds of times slower,
on CPUs without AMX / AVX512-BF16) and to bf16 on a GPU that supports it (fp16 on older ones). Statistics
that need fp32 (losses, norms, optimiser state, probe fits, attribution sums) are kept in fp32 by the
stages themselves whatever the model's dtype.

Memory planning: a long job estimates its peak from its shapes (`Plan`) and is refused before any work when
the estimate exceeds what the device has free, with the numbers and the setting to lower; an out-of-memory
error that still happens mid-run is caught (`out_of_memory`) and reworded the same way, after the job's
finished work (store shards, checkpoints) has been kept by the job's own resume logic.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aimri.errors import AimriError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "cuda, cuda:N, cpu, or auto (the first CUDA device when there is one, else the CPU)"
DTYPE_HELP = "the model's dtype: auto (float32 on the CPU, bfloat16 on a GPU), float32, bfloat16 or float16"

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


class DeviceError(AimriError):
    """A device or dtype this machine cannot provide, or a job that will not fit in its memory."""


def _found() -> str:
    import torch

    parts = ["cpu"]
    if torch.cuda.is_available():
        parts += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        parts.append("mps")
    build = "" if torch.version.cuda else ", a CPU-only build"
    return f"torch {torch.__version__}{build}, sees {', '.join(parts)}"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a stage runs on. None or "auto": the current CUDA device (cuda:0, or a torchrun rank's
    LOCAL_RANK) when CUDA is available, else cpu; "cuda" without an index likewise.

    Raises DeviceError (one line: what was asked, what torch sees) for CUDA without CUDA, a CUDA index past
    the last device, or a name torch does not know."""
    import torch

    name = str(device) if isinstance(device, torch.device) else (device or "auto").strip().lower()
    if name == "auto":  # the current CUDA device: under torchrun, this rank's (distributed.init_from_env sets it)
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", name):
        raise DeviceError(f"device {name!r} is not one AI MRI knows; use {DEVICE_HELP}")
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device found ({_found()}); use --device cpu")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise DeviceError(
                f"--device {name}: only {count} CUDA device(s) ({_found()}); use cuda:0..cuda:{count - 1}"
            )
        return torch.device(f"cuda:{int(index) if index else torch.cuda.current_device()}")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"--device {name}: no MPS device found ({_found()}); use --device cpu")
        return torch.device("mps")
    return torch.device("cpu")


def _native_bf16(device: torch.device) -> bool:
    """Whether this CUDA device multiplies bf16 in hardware (Ampere, compute capability 8.0, and later); torch's
    is_bf16_supported also counts emulation, which is far slower than fp16 there."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The model's dtype on `device`. None or "auto": float32 on the CPU, bfloat16 on a GPU with bf16
    support (float16 otherwise). Raises DeviceError for an unknown name or a dtype the device cannot run
    (checked by running one small matrix product in it there)."""
    import torch

    if isinstance(dtype, torch.dtype):
        chosen = dtype
    else:
        name = (dtype or "auto").strip().lower().removeprefix("torch.")
        if name == "auto":
            if device.type == "cuda":
                return torch.bfloat16 if _native_bf16(device) else torch.float16
            return torch.float32
        if name not in _DTYPE_NAMES:
            raise DeviceError(f"dtype {name!r} is not one a model runs in; use auto, float32, bfloat16 or float16")
        chosen = getattr(torch, _DTYPE_NAMES[name])
    if chosen not in (torch.float32, torch.bfloat16, torch.float16):
        raise DeviceError(f"dtype {chosen} is not one a model runs in; use auto, float32, bfloat16 or float16")
    if chosen is torch.bfloat16 and device.type == "cuda" and not _native_bf16(device):
        raise DeviceError(
            f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use --dtype float16"
        )
    try:  # the only reliable answer to "can this device run it": run it
        probe = torch.ones(4, 4, dtype=chosen, device=device)
        torch.nn.functional.layer_norm(probe @ probe, (4,))
    except (RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:120]
        raise DeviceError(
            f"--dtype {str(chosen).removeprefix('torch.')} cannot run on {device} ({reason}); use --dtype float32"
        ) from err
    return chosen


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16: the name stores and records use."""
    return str(dtype).removeprefix("torch.")


def free_memory(device: torch.device) -> int:
    """Bytes a new job can allocate on `device`: CUDA's free memory plus what PyTorch's caching allocator
    holds but does not use; on the CPU, the operating system's available memory."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class Plan:
    """A job's estimated peak memory on a device, term by term (bytes), with the setting that scales it.

    `fixed` terms do not change with the setting (weights, optimiser state); `per_unit` is the bytes one
    unit of the setting adds (one batch row, one token of prompt); `units` the units asked for."""

    job: str
    device: torch.device
    setting: str
    units: int
    per_unit: float
    fixed: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return sum(self.fixed.values()) + self.per_unit * self.units

    def describe(self) -> str:
        terms = ", ".join(f"{k} {gib(v)}" for k, v in self.fixed.items() if v)
        return f"{gib(self.peak)} ({terms}{', ' if terms else ''}{self.units} x {gib(self.per_unit)} per {self.setting} unit)"

    def most_units(self, budget: float) -> int:
        """The largest `units` whose peak fits `budget` bytes (0 when even the fixed terms do not)."""
        room = budget - sum(self.fixed.values())
        return max(0, int(room // self.per_unit)) if self.per_unit > 0 else (self.units if room >= 0 else 0)

    def check(self, free: int | None = None, headroom: float = 0.9) -> None:
        """Refuse before work when the estimated peak exceeds `headroom` x the free memory.

        Raises DeviceError naming the estimate, the free memory, and the value of the setting that fits."""
        free = free_memory(self.device) if free is None else free
        if self.peak <= headroom * free:
            return
        fits = self.most_units(headroom * free)
        fix = (
            f"lower {self.setting} to {fits} or less" if fits >= 1
            else "even one unit does not fit: free memory (close other jobs) or use a larger device"
        )  # fmt: skip
        raise DeviceError(
            f"{self.job} needs about {gib(self.peak)} on {self.device} but {gib(free)} is free "
            f"(estimate: {self.describe()}); {fix}"
        )

    def default_units(self, cap: int, free: int | None = None, headroom: float = 0.5) -> int:
        """A default for the setting from free memory: the most units within `headroom` x free, at most `cap`,
        at least 1."""
        free = free_memory(self.device) if free is None else free
        return max(1, min(cap, self.most_units(headroom * free)))


def _is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()  # the CPU allocator's and some backends' RuntimeErrors
    return "out of memory" in text or "can't allocate memory" in text


@contextlib.contextmanager
def out_of_memory(plan: Plan, kept: str = "") -> Iterator[None]:
    """Turn an out-of-memory error inside the block into one DeviceError line: the job, the peak it was
    estimated to need, the setting to lower, and what was kept (`kept`, e.g. "finished shards are kept;
    rerun to resume"). Frees PyTorch's cached CUDA blocks first so the process can go on."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        import torch

        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
        half = max(1, plan.units // 2)
        raise DeviceError(
            f"{plan.job} ran out of memory on {plan.device} (estimated peak {gib(plan.peak)}); "
            f"lower {plan.setting} (e.g. to {half}){'; ' + kept if kept else ''}"
        ) from err


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timings); a no-op on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
