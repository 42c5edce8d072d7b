"""Data-parallel runs under torchrun: one process per device, torch.distributed (gloo on CPU, NCCL on GPU).

`mri harvest` and `mri train` detect torchrun's environment (WORLD_SIZE > 1) and join the process group;
`--nproc N` starts torchrun itself. Every collective here goes through `Group`, which turns a dead peer
or a SIGTERM from torchrun (sent to the survivors when one rank fails) into one AimriError line saying
that finished work is kept and how to resume.

A stage runs on ranks in one way: it takes the group explicitly, as `ranks: Group | None = None` (None: a
single process), and the caller passes what `init_from_env()` returned — no stage reads a global group.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from aimri.errors import AimriError


class RankStopped(AimriError):
    """This rank was told to stop (SIGTERM) or lost a peer; finished shards and checkpoints are kept."""


@dataclass(frozen=True)
class Group:
    """Who this process is among the ranks; a single process is rank 0 of 1 and every collective is a no-op."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RankStopped:
            raise
        except (RuntimeError, dist.DistBackendError) as err:  # a peer died: gloo reports a closed connection
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise RankStopped(
                f"rank {self.rank}: another rank stopped during {what} ({reason}); finished work is kept — "
                f"rerun the same command with {self.world} ranks to resume"
            ) from err

    def barrier(self, what: str = "a barrier") -> None:
        if self.active:
            self._call(what, dist.barrier)

    def all_gather(self, obj: Any, what: str = "an exchange") -> list[Any]:
        """Every rank's `obj` (picklable, small), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj)
        return out

    def gather_rows(self, rows: torch.Tensor, what: str = "an exchange") -> torch.Tensor:
        """Every rank's rows (the same shape on each), concatenated in rank order."""
        if not self.active:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world)]
        self._call(what, dist.all_gather, parts, rows.contiguous())
        return torch.cat(parts)

    def sum_(self, tensor: torch.Tensor, what: str = "a reduction") -> torch.Tensor:
        if self.active:
            self._call(what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max_(self, tensor: torch.Tensor, what: str = "a reduction") -> torch.Tensor:
        if self.active:
            self._call(what, dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
        return tensor

    def mean_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average gradients across ranks in place (what DDP's all-reduce does), so every rank takes the
        same optimiser step; a parameter without a gradient gets zeros (every rank calls the same collectives)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
            flat = grad if grad.is_contiguous() else grad.t() if grad.t().is_contiguous() else grad.contiguous()
            self.sum_(flat, "a gradient all-reduce").div_(self.world)
            if flat.data_ptr() != grad.data_ptr():
                grad.copy_(flat)

    def agree(self, what: str, value: Any) -> None:
        """Refuse to go on unless every rank holds the same `value` (e.g. model revision, store spec)."""
        values = self.all_gather(value, f"checking {what}")
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise AimriError(
                f"ranks disagree on {what}: rank 0 has {str(values[0])[:60]!r}, rank {differ[0]} has "
                f"{str(values[differ[0]])[:60]!r}; every rank must load the same model and data"
            )


_GROUP = Group()  # this process's group once joined: init_from_env's idempotence and the SIGTERM message


def _on_sigterm(signum: int, frame: Any) -> None:
    raise RankStopped(
        f"rank {_GROUP.rank}: stopped by torchrun (another rank failed); finished work is kept — rerun the same "
        f"command with {_GROUP.world} ranks to resume"
    )


def init_from_env(timeout_s: float = 1800.0) -> Group:
    """Join torchrun's process group when WORLD_SIZE > 1 (idempotent); otherwise a single-rank Group."""
    global _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _GROUP
    if not dist.is_initialized():
        # collectives on CPU tensors (harvest totals, dictionary gradients here) go through gloo; CUDA ones through NCCL
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:
            raise AimriError(f"could not join the torchrun process group ({err}); start with torchrun") from err
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _GROUP = Group(dist.get_rank(), dist.get_world_size())
    signal.signal(signal.SIGTERM, _on_sigterm)
    return _GROUP


def shutdown() -> None:
    global _GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = Group()


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run `mri ARGV` under torchrun with `nproc` local ranks (the `--nproc` option); returns its exit code."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "aimri.cli", *argv]  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    return subprocess.call(command, env=env)
