"""Training a cross-layer transcoder streamed from a model: no store (every layer's MLP input and output is
138 KB a token for SmolLM2), resumable, data-parallel under torchrun.

Each step takes `batch_size` rows of every layer's MLP input x_L and output y_L (the harvest's rows: position
0 and attention sinks left out), both scaled so their mean norm is sqrt(d_model) (the scales are folded into
the saved weights). Per layer, BatchTopK keeps the k x rows largest ReLU pre-activations of the batch (Bussmann
et al. 2024); the decoders are run sparsely (embedding_bag over the active features). The loss is the sum over
target layers of ||recon_T - y_T||^2 / ||y_T - mean(y_T)||^2 (each layer's fraction of variance unexplained).
After training the inference form is JumpReLU: each feature's threshold is the mean over calibration batches of
its smallest activation BatchTopK kept (crosslayer-coding's BatchTopK -> JumpReLU conversion); a feature never
kept gets its layer's highest threshold. Method: Ameisen et al. 2025 ("Circuit Tracing"), as crosslayer-coding
(utahnlp/crosslayer-coding) trains it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aimri.data.corpus import Packing
from aimri.devices import Plan, dtype_name, out_of_memory
from aimri.dictionaries.clt import CLTConfig, CrossLayerTranscoder, clt_parameter_count
from aimri.dictionaries.clt_formats import load_clt, save_clt
from aimri.dictionaries.config import CLTTrainConfig
from aimri.distributed import Group
from aimri.errors import AimriError
from aimri.paths import atomic_write_text, fsync_dir


def _sites(n_layers: int) -> tuple[list[str], list[str]]:
    return [f"mlp.in.{i}" for i in range(n_layers)], [f"mlp.out.{i}" for i in range(n_layers)]


def clt_training_plan(subject: Any, c: CLTTrainConfig, device: torch.device, extra: dict[str, float]) -> Plan:
    """Peak memory of `train_clt` (bytes, from the shapes): weights, gradients and Adam's two moments (16 bytes a
    parameter); per batch row the inputs and targets, the decoders' outputs and their gradients, and the dense
    pre-activations with their gradients; `extra`: the stream's shuffle buffer and forward pass."""
    L, d, widths = subject.n_layers, subject.d_model, c.widths_for(subject.n_layers)
    params = clt_parameter_count(L, d, widths, c.skip)
    decoded = sum(L - i for i in range(L)) * d
    per_row = 4.0 * (4 * L * d + 2 * decoded + 3 * sum(widths))
    fixed = {"weights, gradients and Adam state": 16.0 * params, **extra}
    return Plan("CLT training", device, "`batch_size`", c.batch_size, per_row, fixed)


class CLTTrainer:
    """One CLT's optimisation (see the module docstring): `step(xs, ys)` with [rows, n_layers, d] rows."""

    def __init__(self, cfg: CLTConfig, c: CLTTrainConfig, device: torch.device, ranks: Group | None = None) -> None:
        self.cfg, self.c, self.device, self.ranks = cfg, c, device, ranks or Group()
        torch.manual_seed(c.seed)
        self.clt = CrossLayerTranscoder(cfg)
        g = torch.Generator().manual_seed(c.seed)
        # encoders random unit rows; own-layer decoders the same directions at norm 0.1 (the first steps start
        # near FVU 1, not above it), cross-layer decoders zero
        with torch.no_grad():
            for i, w in enumerate(cfg.widths):
                rows = torch.randn(w, cfg.d_model, generator=g)
                rows /= rows.norm(dim=1, keepdim=True)
                self.clt.W_dec[i][:, 0] = 0.1 * rows
                self.clt.W_enc[i].copy_(rows)
        self.clt.to(device)
        self.optimizer = torch.optim.Adam(self.clt.parameters(), lr=c.lr, betas=(0.9, 0.999), fused=True)
        self.step_index = 0
        self.scale_in = torch.ones(cfg.n_layers)
        self.scale_out = torch.ones(cfg.n_layers)
        self.fired = [torch.zeros(w, dtype=torch.bool, device=device) for w in cfg.widths]
        self.last: dict[str, float] = {}

    def lr_at(self, step: int) -> float:
        steps = self.c.steps
        warm, decay = max(1, int(0.05 * steps)), max(1, int(0.2 * steps))
        if step < warm:
            return self.c.lr * (step + 1) / warm
        return self.c.lr * min(1.0, (steps - step) / decay)

    def initialise(self, xs: Tensor, ys: Tensor) -> None:
        """Scales from the first batch (mean row norm -> sqrt(d)), the decoder bias at the targets' mean."""
        d = self.cfg.d_model
        norms_in = self.ranks.sum_(xs.norm(dim=-1).mean(0).cpu().double(), "the scales") / self.ranks.world
        norms_out = self.ranks.sum_(ys.norm(dim=-1).mean(0).cpu().double(), "the scales") / self.ranks.world
        self.scale_in = (d**0.5 / norms_in.clamp_min(1e-12)).float()
        self.scale_out = (d**0.5 / norms_out.clamp_min(1e-12)).float()
        with torch.no_grad():
            mean = self.ranks.sum_(ys.mean(0).cpu().double(), "the decoder bias") / self.ranks.world
            self.clt.b_dec.copy_((mean.float() * self.scale_out[:, None]).to(self.device))

    def _scaled(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        xs = xs.to(self.device).float() * self.scale_in.to(self.device)[None, :, None]
        ys = ys.to(self.device).float() * self.scale_out.to(self.device)[None, :, None]
        return xs, ys

    def select(self, layer: int, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """BatchTopK of layer `layer`'s pre-activations [rows, width]: (rows, features, values) of the kept
        entries sorted by row, values carrying the gradient to the encoder."""
        rows, width = pre.shape
        k = min(self.c.k * rows, rows * width)
        top = pre.detach().flatten().topk(k, sorted=False)
        flat = top.indices[top.values > 0]
        flat = flat.sort().values  # row-major: the bags of embedding_bag
        return flat // width, flat % width, pre.flatten()[flat]

    def reconstruct(self, xs: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        """xs [rows, n_layers, d] (scaled) -> recon [rows, n_layers, d] and each layer's kept entries."""
        rows, L, d = xs.shape
        parts: list[list[Tensor]] = [[] for _ in range(L)]  # per target layer, what each source writes there
        kept = []
        for i in range(L):
            pre = self.clt.pre_acts(i, xs[:, i])
            r, f, v = self.select(i, pre)
            kept.append((r, f, v))
            offsets = torch.searchsorted(r, torch.arange(rows, device=r.device))
            w = self.clt.W_dec[i]
            out = F.embedding_bag(f, w.reshape(w.shape[0], -1), offsets, mode="sum", per_sample_weights=v)
            # unbind, not slices: its backward stacks the targets' gradients once instead of filling a copy each
            for t, piece in enumerate(out.view(rows, L - i, d).unbind(1)):
                parts[i + t].append(piece)
        recon = torch.stack([torch.stack(p).sum(0) for p in parts], 1) + self.clt.b_dec
        if self.clt.W_skip is not None:
            recon = recon + torch.einsum("rld,lde->rle", xs, self.clt.W_skip)
        return recon, kept

    def step(self, xs: Tensor, ys: Tensor) -> dict[str, float]:
        if self.step_index == 0 and not self.last:
            self.initialise(xs, ys)
        xs, ys = self._scaled(xs, ys)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_index)
        recon, kept = self.reconstruct(xs)
        err = (recon - ys).pow(2).sum(dim=(0, 2))  # [L]
        var = (ys - ys.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2)).clamp_min(1e-12)
        fvu = err / var
        loss = fvu.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ranks.mean_grads(list(self.clt.parameters()))
        self.optimizer.step()
        for i, (_, f, _) in enumerate(kept):
            self.fired[i][f] = True
        self.step_index += 1
        l0 = sum(len(f) for _, f, _ in kept) / (xs.shape[0] * xs.shape[1])
        self.last = {"step": self.step_index, "fvu": float(fvu.detach().mean()), "l0_per_layer": l0}
        return self.last

    @torch.no_grad()
    def calibrate(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        """JumpReLU thresholds from BatchTopK's selections on `batches` (rows no step trained on)."""
        L = self.cfg.n_layers
        sums = [torch.zeros(w, device=self.device) for w in self.cfg.widths]
        counts = [torch.zeros(w, device=self.device) for w in self.cfg.widths]
        for xs, ys in batches:
            xs, _ = self._scaled(xs, ys)
            for i in range(L):
                pre = self.clt.pre_acts(i, xs[:, i])
                _, f, v = self.select(i, pre)
                smallest = torch.full((self.cfg.widths[i],), math.inf, device=self.device)
                smallest.scatter_reduce_(0, f, v, reduce="amin")
                seen = torch.isfinite(smallest)
                sums[i][seen] += smallest[seen]
                counts[i][seen] += 1
        for i in range(L):
            seen = counts[i] > 0
            value = sums[i] / counts[i].clamp_min(1)
            # a feature BatchTopK never kept gets the layer's highest threshold: as hard to fire as any
            highest = float(value[seen].max()) if bool(seen.any()) else 0.0
            self.clt.set_threshold(i, torch.where(seen, value, highest))

    def export(self) -> CrossLayerTranscoder:
        """The CLT on raw (unscaled) activations, JumpReLU, on the CPU: the scales folded into the weights."""
        out = CrossLayerTranscoder(self.cfg)
        out.load_state_dict({k: v.detach().cpu().float() for k, v in self.clt.state_dict().items()})
        s_in, s_out = self.scale_in.cpu(), self.scale_out.cpu()
        with torch.no_grad():
            for i in range(self.cfg.n_layers):
                out.W_enc[i].mul_(s_in[i])
                out.W_dec[i].div_(s_out[i:, None])
            out.b_dec.div_(s_out[:, None])
            if out.W_skip is not None:
                out.W_skip.mul_((s_in / s_out)[:, None, None])
        out.cfg.activation = "jumprelu"
        return out.eval()

    def state(self) -> dict[str, Any]:
        return {
            "clt": self.clt.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step_index,
            "scale_in": self.scale_in, "scale_out": self.scale_out, "fired": self.fired, "last": self.last,
            "config": self.cfg.to_dict(), "train": {k: v for k, v in vars(self.c).items()},
        }  # fmt: skip

    def save_checkpoint(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def load_checkpoint(self, path: Path) -> None:
        """Resume from `path`; raises AimriError when it was written under other settings (naming them)."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        mine = {k: v for k, v in vars(self.c).items()}
        if state["config"] != self.cfg.to_dict() or state["train"] != mine:
            diff = sorted(k for k in mine if state["train"].get(k) != mine[k]) or ["the CLT's shape or model"]
            raise AimriError(
                f"{path} was written under other settings ({', '.join(diff)}); resume with the same settings or "
                f"delete {path.parent} to start over"
            )
        self.clt.load_state_dict(state["clt"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index, self.last = int(state["step"]), dict(state["last"])
        self.scale_in, self.scale_out = state["scale_in"].cpu(), state["scale_out"].cpu()  # host-side, as built
        self.fired = [f.to(self.device) for f in state["fired"]]


def _split(batch: dict[str, Tensor], n_layers: int) -> tuple[Tensor, Tensor]:
    ins, outs = _sites(n_layers)
    return torch.stack([batch[s] for s in ins], 1), torch.stack([batch[s] for s in outs], 1)


def train_clt(
    subject: Any, corpus: Any, out: str | Path, config: CLTTrainConfig | None = None, progress: bool = True,
    ranks: Group | None = None, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A CLT over every layer of `subject`, streamed from it on `corpus`, saved at `out` (circuit-tracer's layout
    + clt.json, aimri.dictionaries.clt_formats) with metrics.json: per layer the held-out FVU and L0, and for the
    whole CLT replacing every MLP the CE loss recovered, KL and top-1 agreement (`evaluate.replaced_metrics`).

    Checkpoints go to `out`.checkpoints every `checkpoint_every` steps; a rerun resumes from them (the stream is
    replayed deterministically); they are deleted once the CLT is saved and measured. A rerun with the same
    settings returns the saved record (with "cached": True). With `ranks` (torchrun) it is data-parallel: each rank streams its own share
    of every batch (seed + rank) and gradients are averaged. Memory is estimated before any work (and told to
    `log`).

    Raises AimriError for widths that do not match the layer count, k above a width, a batch size that the
    ranks cannot split; DeviceError when the estimate does not fit."""
    from aimri.dictionaries.evaluate import replaced_metrics, rows_from_windows
    from aimri.dictionaries.stream import heldout_windows, stream_memory, subject_batches
    from aimri.progress import progress_bar

    c = config or CLTTrainConfig()
    ranks = ranks or Group()
    L, d = subject.n_layers, subject.d_model
    widths = c.widths_for(L)
    if len(widths) != L:
        raise AimriError(f"`widths` has {len(widths)} entries but {subject.name} has {L} layers: give one per layer")
    if c.batch_size % ranks.world:
        raise AimriError(f"`batch_size` {c.batch_size} must be a multiple of the {ranks.world} ranks")
    cfg = CLTConfig(
        L, d, widths, k=c.k, skip=c.skip, model_name=subject.name, model_revision=subject.revision,
        bos_id=Packing.for_tokenizer(subject.tokenizer, c.context).bos_id, model_dtype=dtype_name(subject.dtype),
        extra={"corpus": corpus.fingerprint(), "tokens": c.tokens, "context": c.context},
    )  # fmt: skip
    cfg.check()
    out = Path(out)
    settings = {"model": subject.name, "revision": subject.revision, **vars(c), "corpus": corpus.fingerprint()}
    if (out / "metrics.json").exists() and (out / "clt.json").exists():
        record = json.loads((out / "metrics.json").read_text())
        if record.get("settings") == settings:
            return {**record, "cached": True}
    ranks.agree("the CLT settings (model revision, corpus, shape)", json.dumps(settings, sort_keys=True))
    device = subject.device
    ins, outs = _sites(L)
    rows_per_rank = c.batch_size // ranks.world
    plan = clt_training_plan(subject, c, device, stream_memory(subject, ins + outs, rows_per_rank, c.context))
    plan.check()
    if log is not None and ranks.leader:
        log(f"memory estimate: {plan.describe()}")
    trainer = CLTTrainer(cfg, c, device, ranks)
    batches: Iterator[dict[str, Tensor]] = subject_batches(
        subject, corpus, ins + outs, batch_size=rows_per_rank, context=c.context, seed=c.seed + ranks.rank,
        heldout_every=c.heldout_every,
    )  # fmt: skip
    checkpoints = out.with_name(out.name + ".checkpoints")
    ckpt = checkpoints / (f"rank-{ranks.rank}.pt" if ranks.active else "clt.pt")
    checkpoints.mkdir(parents=True, exist_ok=True)
    if ckpt.exists():
        trainer.load_checkpoint(ckpt)
    elif any(checkpoints.glob("*.pt")):
        found = ", ".join(sorted(p.name for p in checkpoints.glob("*.pt")))
        raise AimriError(
            f"{checkpoints} holds checkpoints of another number of ranks ({found}); resume with as many ranks as "
            f"wrote them, or delete {checkpoints} to start over"
        )
    ranks.agree("the step every rank resumes from", trainer.step_index)
    for _ in range(trainer.step_index):  # the stream is deterministic: skip what was trained on
        next(batches)
    start = time.perf_counter()
    kept = f"the last checkpoint is kept in {checkpoints}: resume with more free memory, or delete it"
    with progress_bar(disable=not progress) as bar, out_of_memory(plan, kept):
        task = bar.add_task("train CLT", total=c.steps, completed=trainer.step_index, rate="")
        while trainer.step_index < c.steps:
            last = trainer.step(*_split(next(batches), L))
            bar.update(task, advance=1, rate=f"fvu {last['fvu']:.3f}, L0 {last['l0_per_layer']:.1f}/layer")
            if trainer.step_index % c.checkpoint_every == 0 or trainer.step_index == c.steps:
                trainer.save_checkpoint(ckpt)
    seconds = time.perf_counter() - start
    trainer.calibrate([_split(next(batches), L) for _ in range(c.calibration_batches)])
    record: dict[str, Any] = {"settings": settings}
    if ranks.leader:
        save_clt(trainer.export(), out)
        clt = load_clt(out).to(device)  # what a user will load, checked as saved
        held = (
            heldout_windows(subject.tokenizer, corpus, c.context, c.heldout_every, c.eval_windows)
            if c.heldout_every
            else []
        )
        layers: dict[int, dict[str, float]] = {}
        if held:
            rows = rows_from_windows(subject, held, ins + outs)
            with torch.no_grad():
                codes = {i: clt.encode(i, rows[ins[i]]) for i in range(L)}
                for i in range(L):
                    y = rows[outs[i]]
                    recon = clt.decode(i, codes, rows[ins[i]])
                    fvu = float((recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12))
                    layers[i] = {"fvu": fvu, "l0": float((codes[i] > 0).sum(1).float().mean()),
                                 "dead_frac": float(1 - trainer.fired[i].float().mean())}  # fmt: skip
        whole = None
        if held and c.downstream_windows:
            whole = replaced_metrics(subject, clt.reconstruct, list(range(L)), held[: c.downstream_windows])
        record.update({
            "seconds": round(seconds, 1), "steps": trainer.step_index, "tokens": trainer.step_index * c.batch_size,
            "parameters": clt.parameter_count(), "train_last": trainer.last, "eval_windows": len(held),
            "layers": layers, "replacement": whole, "ranks": ranks.world,
        })  # fmt: skip
        atomic_write_text(out / "metrics.json", json.dumps(record, indent=1))
    ranks.barrier("saving the CLT")
    if ranks.leader:  # the CLT is whole and measured: its checkpoints (3x its size with Adam's state) go
        shutil.rmtree(checkpoints, ignore_errors=True)
    return record
