"""Training sparse dictionaries: TopK with a sparse backward, AuxK revival, unit-norm decoder rows,
geometric-median b_dec, fixed-mean-norm input scaling (folded into the weights at save), lr warmup and
decay, and checkpoints that resume to the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimri.data.corpus import Packing
from aimri.devices import Plan, dtype_name, out_of_memory, resolve_device
from aimri.dictionaries.base import Dictionary, DictionaryConfig, architecture_class, build
from aimri.dictionaries.config import CrosscoderConfig, DictionarySettings, TranscodersConfig, default_lr
from aimri.dictionaries.config import TrainConfig as TrainConfig  # defined torch-free there; re-exported
from aimri.dictionaries.sparse import topk_autoencode, workspace_rows
from aimri.distributed import Group
from aimri.errors import AimriError
from aimri.paths import atomic_write_text, fsync_dir
from aimri.run import Run

# one site's rows, (input, output) rows, or rows of many sites by name (one pass feeding many dictionaries)
Batch = Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]


def bf16_gemm_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (elsewhere bf16 GEMMs are emulated, far slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def geometric_median(points: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances (robust to outliers)."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median


def _drop_radial(grad: Tensor, rows: Tensor, block: int = 1 << 16) -> None:
    """grad -= (grad . row) row for each unit row, a block of rows at a time: no [d_sae, d] temporary."""
    for start in range(0, len(rows), block):
        g, w = grad[start : start + block], rows[start : start + block]
        g.addcmul_(torch.einsum("ij,ij->i", g, w).unsqueeze(1), w, value=-1)


def _split(batch: Batch, cfg: DictionaryConfig, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(input rows, target rows) of a batch, on `device` when given (an SAE's target is its input: one copy)."""
    if isinstance(batch, dict):
        x = batch[cfg.site]
        y = batch[cfg.site_out] if cfg.is_transcoder else x
    else:
        x, y = batch if isinstance(batch, tuple) else (batch, batch)
    if device is None:
        return x, y
    moved = x.to(device, non_blocking=True)
    return moved, moved if y is x else y.to(device, non_blocking=True)


class Trainer:
    """Trains one dictionary; `step(batch)` lets several trainers share one pass over the data.

    Data-parallel with a `ranks` Group: each rank steps on its slice of the global batch; gradients are
    averaged across ranks (one in-place all-reduce per tensor), the first batch is gathered whole for the input scale
    and b_dec, and dead-latent counts see every rank's tokens — so every rank holds the same weights, those
    a single process would reach on the whole batch (up to float summation order).

    A model's buffers are running statistics of the training batches, not parameters (BatchTopK's threshold
    average): checkpoints keep them, and after every step their floating-point ones are averaged across ranks,
    so every rank holds the same.

    Device: the dictionary, its gradients, fused Adam's moments and the TopK workspace live on `tcfg.device`
    (auto: CUDA when present); batches are copied there as they come (rows from a GPU stream are already
    there). Weights, losses and optimiser state are fp32 on every device; only the TopK selection GEMM may
    run in bf16 (`select_dtype`: on a GPU and on CPUs with bf16 units), its chosen values recomputed in fp32."""

    def __init__(self, dcfg: DictionaryConfig, tcfg: TrainConfig, ranks: Group | None = None) -> None:
        if dcfg.k is not None and dcfg.k > dcfg.d_sae:
            raise AimriError(f"k={dcfg.k} is larger than the width d_sae={dcfg.d_sae}; choose k <= width")
        self.dcfg, self.tcfg = dcfg, tcfg
        self.ranks = ranks or Group()
        self.device = resolve_device(tcfg.device)
        torch.manual_seed(tcfg.seed)
        self.model: Dictionary = build(dcfg)
        self.model.reset_parameters(torch.Generator().manual_seed(tcfg.seed))  # on the CPU: the same on every device
        self.model.to(self.device)
        self.lr = tcfg.lr or default_lr(dcfg.d_sae)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._enc_shadow: torch.nn.Parameter | None = None
        if self.model.sparse_topk:
            # Adam steps W_enc through its latent-major storage: the same memory, made contiguous for the
            # fused kernel (8x faster than on the transposed view); its gradient comes from _grad_buffers
            self._enc_shadow = torch.nn.Parameter(self.model.W_enc.detach().t())
            self._trainable = [self._enc_shadow if p is self.model.W_enc else p for p in self._trainable]
        # fused: one pass over each tensor (measured 44x faster than the per-op CPU path at 19M parameters,
        # and no full-size temporaries, which is what lets a 1M-latent dictionary fit in 24 GB)
        self.optimizer = torch.optim.Adam(self._trainable, lr=self.lr, betas=tcfg.betas, fused=True)
        self.step_index = 0
        self.since_fired = torch.zeros(dcfg.d_sae, dtype=torch.int64, device=self.device)
        self.scale_in = self.scale_out = 1.0
        self.initialised = False
        self.last: dict[str, float] = {}
        select = tcfg.select_dtype
        if select == "auto":
            select = "bfloat16" if self.device.type == "cuda" or bf16_gemm_is_fast() else "float32"
        if select not in ("float32", "bfloat16"):
            raise AimriError(f"select_dtype must be auto, float32 or bfloat16, not {tcfg.select_dtype!r}")
        self.select_dtype = select  # the resolved choice, for reports
        self._workspace = torch.empty(0, dcfg.d_sae, dtype=getattr(torch, select), device=self.device)  # TopK pre-acts
        self._grad_buffers: tuple[Tensor, Tensor] | None = None  # TopK: W_enc's (latent-major) and W_dec's

    # -- schedule and init -----------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        steps = self.tcfg.steps
        warm = max(1, int(self.tcfg.warmup_frac * steps))
        decay_start = int((1 - self.tcfg.decay_frac) * steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        if step >= decay_start:
            return self.lr * max(0.0, (steps - step) / max(1, steps - decay_start))
        return self.lr

    def initialise(self, sample: Batch) -> None:
        """Scale factors so inputs/outputs have mean norm sqrt(d); b_dec at the geometric median."""
        x, y = _split(sample, self.dcfg, self.device)
        self._check(x, y, "the first batch")
        if self.ranks.active:  # the whole first batch, so every rank (and a single process) starts alike
            x, y = self.ranks.gather_rows(x, "initialisation"), (
                self.ranks.gather_rows(y, "initialisation") if y is not x else None)  # fmt: skip
            y = x if y is None else y
        self.scale_in = math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean())
        self.scale_out = math.sqrt(y.shape[1]) / float(y.norm(dim=1).mean()) if y is not x else self.scale_in
        with torch.no_grad():
            target = y * self.scale_out
            self.model.b_dec.copy_(geometric_median(target[:4096]) if y is x else target.mean(0))
        self.initialised = True

    def _check(self, x: Tensor, y: Tensor, where: str) -> None:
        if x.shape[1] != self.dcfg.d_in or y.shape[1] != self.dcfg.out_dim:
            raise AimriError(
                f"activations are {x.shape[1]}->{y.shape[1]} wide but the dictionary expects "
                f"{self.dcfg.d_in}->{self.dcfg.out_dim}; check the store's sites and --width settings"
            )
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise AimriError(f"NaN/inf activations in {where}; training stopped, the last checkpoint is intact")

    # -- one optimisation step -------------------------------------------------------------------
    def step(self, batch: Batch) -> dict[str, float]:
        if not self.initialised:
            self.initialise(batch)
        x_raw, y_raw = _split(batch, self.dcfg, self.device)
        self._check(x_raw, y_raw, f"the batch of step {self.step_index}")
        m = self.model
        m.train()
        x = x_raw * self.scale_in
        y = x if y_raw is x_raw else y_raw * self.scale_out
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_index)
        centre = self.dcfg.centres_input
        codes: Tensor | None = None  # the dense path's (the sparse TopK kernel never materialises them)
        if m.sparse_topk:
            rows = workspace_rows(x.shape[0], self.dcfg.d_sae)
            if self._workspace.shape[0] != rows:
                self._workspace = torch.empty(rows, self.dcfg.d_sae, dtype=self._workspace.dtype, device=self.device)
            if self._grad_buffers is None:
                self._grad_buffers = (
                    torch.zeros(m.W_enc.shape[::-1], device=self.device), torch.zeros_like(m.W_dec.detach()))  # fmt: skip
            for buffer in self._grad_buffers:
                buffer.zero_()
            recon, vals, idx, pre = topk_autoencode(
                x, m.W_enc, m.b_enc, m.W_dec, m.b_dec, self.dcfg.k or 1, centre, self._workspace, self._grad_buffers
            )
            fired = torch.zeros(self.dcfg.d_sae, dtype=torch.bool, device=self.device)
            fired[idx[vals > 0]] = True
            l0 = float((vals > 0).sum(1).float().mean())
        else:
            pre = m.pre_acts(x)
            codes = m.activate(pre)
            recon = codes @ m.W_dec + m.b_dec
            fired = (codes > 0).any(0)
            l0 = float((codes > 0).sum(1).float().mean())
        if m.W_skip is not None:
            recon = recon + x @ m.W_skip
        err = recon - y
        mse = err.pow(2).sum(1).mean()
        loss = mse
        penalty = None if codes is None else m.sparsity_loss(pre, codes, self.tcfg)
        if penalty is not None:
            loss = loss + penalty
        if self.ranks.active:  # a latent is alive if it fired on any rank's rows
            fired = self.ranks.max_(fired.to(torch.uint8), "the dead-latent count").bool()
        self.since_fired += x.shape[0] * self.ranks.world
        self.since_fired[fired] = 0
        dead = self.since_fired > self.tcfg.dead_after
        aux = torch.zeros((), device=self.device)
        if m.uses_auxk and bool(dead.any()):
            aux = self._auxk(x, err.detach(), dead, centre)
            loss = loss + self.tcfg.auxk_alpha * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self._grad_buffers is not None and self._enc_shadow is not None:  # TopK: gradients added in place
            self._enc_shadow.grad, m.W_dec.grad = self._grad_buffers
        self.ranks.mean_grads(self._trainable)
        unit_rows = m.unit_norm_decoder
        if unit_rows and m.W_dec.grad is not None:  # keep rows on the unit sphere: drop the radial gradient
            _drop_radial(m.W_dec.grad, m.W_dec.detach())
        self.optimizer.step()
        if unit_rows:
            with torch.no_grad():
                m.W_dec.div_(m.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self._average_statistics()
        total = (y - y.mean(0)).pow(2).sum(1).mean()
        figures = torch.stack(
            [loss.detach(), mse.detach(), total.detach(), torch.tensor(l0, device=self.device)]
        ).double()
        loss_v, mse_v, total_v, l0 = (self.ranks.sum_(figures, "the step's metrics") / self.ranks.world).tolist()
        self.step_index += 1
        self.last = {
            "step": self.step_index,
            "loss": loss_v,
            "fvu": mse_v / total_v if total_v > 0 else float("nan"),  # a batch of identical rows has no variance
            "l0": l0,
            "dead_frac": float(dead.float().mean()),
            "auxk": float(aux.detach()),
        }
        return self.last

    def _average_statistics(self) -> None:
        """Data-parallel: each floating-point buffer becomes the ranks' mean (one all-reduce for all of them)."""
        stats = [b for b in self.model.buffers() if b.is_floating_point()]
        if not self.ranks.active or not stats:
            return
        flat = self.ranks.sum_(torch.cat([b.detach().double().flatten() for b in stats]), "the running statistics")
        flat /= self.ranks.world
        with torch.no_grad():
            for b, part in zip(stats, flat.split([b.numel() for b in stats]), strict=True):
                b.copy_(part.view_as(b))

    def _auxk(self, x: Tensor, residual: Tensor, dead: Tensor, centre: bool) -> Tensor:
        """Reconstruct the main error from the top dead latents (Gao et al.), normalised by its variance,
        with the same sparse kernel as the main pass. A few dead latents: their encoder columns gathered,
        so the extra GEMM is as wide as the dead set. Most of the dictionary dead (early in a run): the
        full-width GEMM with live latents' biases at -inf, so no copy of the encoder is made."""
        m = self.model
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(self.tcfg.auxk_k or self.dcfg.d_in // 2, len(dead_idx))
        xc = x - m.b_dec if centre else x
        no_bias = torch.zeros_like(m.b_dec)
        work = self._workspace if self._workspace.shape[0] else None  # BatchTopK keeps none
        few = len(dead_idx) <= self.dcfg.d_sae // 2
        bias, candidates = (m.b_enc, dead_idx) if few else (m.b_enc.masked_fill(~dead, float("-inf")), None)
        recon = topk_autoencode(
            xc, m.W_enc, bias, m.W_dec, no_bias, k_aux, False, work, self._grad_buffers, candidates
        )[0]
        denom = (residual - residual.mean(0)).pow(2).sum(1).mean().clamp_min(1e-8)
        return (recon - residual).pow(2).sum(1).mean() / denom

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "buffers": {name: b.clone() for name, b in self.model.named_buffers()},  # non-persistent ones too
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "since_fired": self.since_fired,
            "scale_in": self.scale_in,
            "scale_out": self.scale_out,
            "initialised": self.initialised,
            "train_config": asdict(self.tcfg),
            "dictionary_config": self.dcfg.to_dict(),
        }

    def save_checkpoint(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(self.state(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, weights_only=True, map_location=self.device)
        except Exception as err:
            raise AimriError(f"{path} is not a readable checkpoint ({err}); delete it to start over") from err
        # fields added since a checkpoint was written read as their defaults; how prompts open is not training
        saved, ours = {**_CONFIG_DEFAULTS, **state["dictionary_config"]}, self.dcfg.to_dict()
        for key in ("prepend_bos", "bos_id", "model_dtype"):  # how prompts open and what rows came in: not training
            saved.pop(key, None)
            ours.pop(key, None)
        if saved != ours or _algorithmic(state["train_config"]) != _algorithmic(asdict(self.tcfg)):
            raise AimriError(f"{path} was written with other settings; rerun with the original ones or delete it")
        model_state = dict(state["model"])
        if (
            "threshold" in model_state
        ):  # (BatchTopK checkpoints before the global threshold held inf for unseen latents)
            t = model_state["threshold"]
            model_state["threshold"] = torch.where(
                torch.isfinite(t), t, t[torch.isfinite(t)].max() if bool(torch.isfinite(t).any()) else torch.zeros(())
            )
        self.model.load_state_dict(model_state)
        with torch.no_grad():
            for name, value in state.get("buffers", {}).items():  # (a checkpoint from before buffers were kept: none)
                self.model.get_buffer(name).copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.since_fired = state["since_fired"]
        self.scale_in, self.scale_out = float(state["scale_in"]), float(state["scale_out"])
        self.initialised = bool(state["initialised"])

    # -- the folded, inference-ready dictionary ------------------------------------------------------
    def export(self) -> Dictionary:
        """A copy that takes raw (unscaled) activations: the scale factors folded into the weights; in its
        inference form (what the model derives on leaving training mode, e.g. BatchTopK's threshold)."""
        cfg = self.dcfg
        out = build(cfg)
        self.model.eval()  # (the next step puts it back in training mode)
        out.load_state_dict(self.model.state_dict())
        s_in, s_out = self.scale_in, self.scale_out
        with torch.no_grad():
            out.W_enc.mul_(s_in)
            out.W_dec.div_(s_out)
            out.b_dec.div_(s_out)
            if out.W_skip is not None:
                out.W_skip.mul_(s_in / s_out)
        out.eval()
        return out


def training_plan(cfgs: list[DictionaryConfig], tcfg: TrainConfig, extra: dict[str, float] | None = None) -> Plan:
    """Peak memory of training `cfgs` together on `tcfg.device` (bytes, estimated from the shapes): per
    dictionary its weights, their gradients and Adam's two moments (16 bytes a parameter, fp32) and the TopK
    workspace; per batch row the input, target, reconstruction and error rows and the k codes, or a dense
    architecture's codes and pre-activations with their gradients; `extra`: other fixed terms (a stream's
    shuffle buffer and forward pass on the same device, see stream.stream_memory)."""
    device = resolve_device(tcfg.device)
    fixed: dict[str, float] = {"weights, gradients and Adam state": 0.0, "TopK workspace": 0.0, **(extra or {})}
    per_row = 0.0
    for cfg in cfgs:
        params = cfg.d_sae * (cfg.d_in + cfg.out_dim + 1) + cfg.out_dim + (cfg.d_in * cfg.out_dim if cfg.skip else 0)
        fixed["weights, gradients and Adam state"] += 16.0 * params
        if architecture_class(cfg.architecture).sparse_topk:
            fixed["TopK workspace"] += 4.0 * workspace_rows(tcfg.batch_size, cfg.d_sae) * cfg.d_sae
        else:  # dense codes and pre-activations, with their gradients
            per_row += 16.0 * cfg.d_sae
        per_row += 4.0 * (3 * cfg.d_in + 2 * cfg.out_dim) + 12.0 * (cfg.k or 0)
    return Plan("training", device, "`batch_size`", tcfg.batch_size, per_row, fixed)


def _algorithmic(train_config: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig's settings that change the weights: the device does not (a run resumes on another)."""
    return {k: v for k, v in train_config.items() if k != "device"}


_CONFIG_DEFAULTS = {
    f.name: f.default for f in fields(DictionaryConfig) if f.default is not MISSING
}  # a checkpoint's missing config fields


def fit(
    trainers: list[Trainer],
    batches: Iterable[Batch],
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train several dictionaries from one pass over `batches` (the same order on every run), resuming
    from `checkpoint_dir` when it holds checkpoints; returns each trainer's last metrics."""
    from aimri.progress import progress_bar

    ranks = trainers[0].ranks
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ranks.barrier("opening the checkpoints")
        for i, t in enumerate(trainers):
            ckpt = checkpoint_dir / f"dictionary-{i}.pt"
            if ckpt.exists():
                t.load_checkpoint(ckpt)
    start = min(t.step_index for t in trainers)
    steps = trainers[0].tcfg.steps
    it: Iterator[Batch] = iter(batches)
    for _ in range(start):  # the data order is deterministic: skip what was already trained on
        next(it)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("train", total=steps, completed=start, rate="")
        for step in range(start, steps):
            try:
                batch = next(it)
            except StopIteration:
                break
            for t in trainers:
                if t.step_index == step:
                    t.step(batch)
            bar.update(task, advance=1, rate=f"fvu {trainers[0].last.get('fvu', float('nan')):.3f}")
            if checkpoint_dir is not None and (step + 1) % trainers[0].tcfg.checkpoint_every == 0:
                if ranks.leader:  # data-parallel ranks hold the same weights: one copy on disk
                    for i, t in enumerate(trainers):
                        t.save_checkpoint(checkpoint_dir / f"dictionary-{i}.pt")
                ranks.barrier("a checkpoint")
    return [t.last for t in trainers]


def store_batches(
    store: Any, sites: list[str], batch_size: int, seed: int, shards: list[int] | None = None,
    part: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:  # fmt: skip
    """Shuffled full batches from a store, epoch after epoch (epoch e shuffles with seed + e): the
    same sequence on every run, which is what makes resuming exact. `part`: see ActivationStore.batches."""
    epoch = 0
    while True:
        produced = False
        for batch in store.batches(
            sites if len(sites) > 1 else sites[0], batch_size, seed=seed + epoch, drop_last=True, shards=shards,
            part=part,
        ):  # fmt: skip
            produced = True
            yield batch
        if not produced:
            raise AimriError(f"the store has fewer than {batch_size} rows; lower `batch_size` or harvest more tokens")
        epoch += 1


# held-out rows the saved dictionary is evaluated on after training (training.json's `heldout_saved`)
HELDOUT_ROWS = 8192
_FIGURES = ("rows", "l0", "fvu", "cosine", "dead_frac")  # of evaluate.reconstruction_from_pairs, as `mri eval` has them
_FIGURES_NOTE = (
    "train_last_batch: the training step's own figures (training-mode codes); saved_last_batch and heldout_saved: "
    "the saved dictionary as loaded from its files, as `mri eval` computes them, on the last training batch and "
    "on rows never trained on"
)


def _train_and_save(
    cfg: DictionaryConfig, batches: Iterable[Batch], out: str | Path, tcfg: TrainConfig, progress: bool,
    record: dict[str, Any], ranks: Group | None = None,
    heldout: Callable[[Dictionary], dict[str, Any] | None] | None = None, no_heldout: str = "",
    memory: dict[str, float] | None = None,
) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """Train one dictionary (checkpoints in `out`.checkpoints), save it scale-folded in the SAELens layout
    at `out`, and record how in `out`/training.json (rank 0 writes; the ranks' weights are the same).

    training.json's figures come in named sets, since a dictionary can read differently in training and as
    saved (BatchTopK selects per batch in training and thresholds at inference):
      train_last_batch  the last training step's own (training-mode codes; dead_frac: latents silent for more
                        than the Trainer's dead_after tokens);
      saved_last_batch  the SAVED dictionary, loaded back from its files, on that same batch (no dead_frac:
                        one batch is too few rows to call a latent dead);
      heldout_saved     the saved dictionary on up to HELDOUT_ROWS rows never trained on (`heldout` evaluates
                        it there), or null with `heldout_note` saying why there are none (`no_heldout`).
    The saved figures are computed as `mri eval` computes them (evaluate.reconstruction_from_pairs; dead_frac:
    latents that never fired on those rows). Before saving, the dictionary's inference-only settings are fitted
    to the final weights on the next batch of the stream, one no step trained on (`Dictionary.calibrate`:
    BatchTopK's threshold). Returns the path and the last training step's metrics."""
    from aimri.dictionaries.evaluate import reconstruction_from_pairs
    from aimri.dictionaries.formats import load_dictionary, save_dictionary

    ranks = ranks or Group()
    plan = training_plan([cfg], tcfg, memory)
    plan.check()
    trainer = Trainer(cfg, tcfg, ranks)
    out = Path(out)
    last_batch: list[Batch] = []
    source = iter(batches)

    def remembered() -> Iterator[Batch]:  # the last batch fit takes is the one it last trained on
        for batch in source:
            last_batch[:] = [batch]
            yield batch

    start = time.perf_counter()
    checkpoints = out.with_name(out.name + ".checkpoints")
    kept = f"the last checkpoint is kept: resume with more free memory, or delete {checkpoints} to start over with the lower one"
    with out_of_memory(plan, kept):
        last = fit([trainer], remembered(), checkpoint_dir=checkpoints, progress=progress)[0]
    record = {**record, "seconds": round(time.perf_counter() - start, 3)}
    if ranks.leader:
        save_dictionary(calibrated(trainer.export(), next(source, None), cfg), out)
        saved = load_dictionary(out).to(trainer.device)  # what a user will load, checked as saved
        figures: dict[str, Any] = {"step": last.get("step", trainer.step_index), "figures_note": _FIGURES_NOTE}
        figures["train_last_batch"] = {k: v for k, v in last.items() if k != "step"}
        if last_batch:
            on_batch = reconstruction_from_pairs(saved, [_split(last_batch[0], cfg)]) or {}
            figures["saved_last_batch"] = {k: on_batch[k] for k in _FIGURES if k in on_batch and k != "dead_frac"}
        held = heldout(saved) if heldout is not None else None
        figures["heldout_saved"] = {k: held[k] for k in _FIGURES if k in held} if held else None
        if not held:
            figures["heldout_note"] = no_heldout or "no rows were held out of training"
        info = {**figures, "tokens": trainer.step_index * tcfg.batch_size, "scale_in": trainer.scale_in, **record}
        if ranks.active:
            info["ranks"] = ranks.world
        atomic_write_text(out / "training.json", json.dumps(info, indent=1))
    ranks.barrier("saving the dictionary")
    return out, last


def calibrated(model: Dictionary, batch: Batch | None, cfg: DictionaryConfig) -> Dictionary:
    """`model` (an exported, raw-scale dictionary) with its inference-only settings fitted on `batch`, rows
    no training step saw under these weights (`Dictionary.calibrate`; BatchTopK: the global threshold = that
    batch's (k x rows)-th largest activation, so the saved dictionary keeps k per token from the first steps,
    where SAELens' running average lags the moving weights). Without a batch, `model` as it is."""
    if batch is not None:
        model.calibrate(_split(batch, cfg, model.W_enc.device)[0])
    return model


def _dictionary_config(
    settings: DictionarySettings, d_in: int, d_out: int | None, site: str, site_out: str | None, model_name: str,
    model_revision: str, bos_id: int | None, model_dtype: str = "",
) -> DictionaryConfig:  # fmt: skip
    """The DictionaryConfig `settings` describe (k only for an architecture that takes it); `bos_id`: the
    token the training windows open with (None: they open with the first text token)."""
    architecture = settings.architecture
    k = settings.k if architecture_class(architecture).uses_k else None
    return DictionaryConfig(
        architecture, d_in, settings.width, d_out=d_out, k=k, skip=settings.skip, site=site, site_out=site_out or "",
        model_name=model_name, model_revision=model_revision, prepend_bos=bos_id is not None, bos_id=bos_id,
        model_dtype=model_dtype,
    )  # fmt: skip


def _refuse_crosscoder(settings: DictionarySettings) -> None:
    """The one-model trainings build a dictionary over one Subject's Sites; a crosscoder needs several."""
    if settings.architecture == "crosscoder":
        raise AimriError(
            "a crosscoder reads several models on the same tokens: train it with train_crosscoder "
            "(`mri train-crosscoder BASE MODEL`)"
        )


def train_from_store(
    store_path: str | Path,
    site: str,
    out: str | Path,
    settings: DictionarySettings | None = None,
    site_out: str | None = None,
    progress: bool = True,
    ranks: Group | None = None,
    device: str | torch.device | None = None,
) -> tuple[Path, dict[str, float]]:
    """Train one dictionary (an SAE on `site`, or a transcoder `site` -> `site_out`) from a store; resumable.
    The store's last `settings.heldout_shards` shards are never trained on; training.json records them for
    `mri eval`. With `ranks` (torchrun), data-parallel: each rank reads its 1/world of every batch from the store.
    `device` (None: CUDA when present, each rank its own under torchrun): where the dictionary trains; rows
    are read from the store's memory-mapped shards as fp32 and copied there batch by batch.

    Raises DeviceError before any work when the dictionary and a batch will not fit the device's free memory
    (aimri.devices.Plan), and on an out-of-memory error mid-run (the last checkpoint is kept)."""
    from aimri.data.store import ActivationStore

    settings = settings or DictionarySettings()
    _refuse_crosscoder(settings)
    ranks = ranks or Group()
    store = ActivationStore(store_path)
    batch_size, heldout = settings.batch_size, settings.heldout_shards
    if batch_size % ranks.world:
        raise AimriError(f"`batch_size` {batch_size} must be a multiple of the {ranks.world} ranks")
    ranks.agree("the store (its manifest)", json.dumps(store.manifest["spec"], sort_keys=True))
    cfg = _dictionary_config(
        settings, store.d(site), store.d(site_out) if site_out else None, site, site_out,
        store.spec["model"]["name"], store.spec["model"]["revision"], store.spec.get("packing", {}).get("bos_id"),
        store.spec["model"].get("dtype", "float32"),
    )  # fmt: skip
    if "packing" not in store.spec:  # not recorded: prompts open by the tokenizer's rule, not "no BOS"
        cfg.prepend_bos, cfg.bos_id = True, None
    n = len(store.shards)
    if not 0 <= heldout < n:
        raise AimriError(f"`heldout_shards` {heldout} must leave training data: the store has {n} shards")
    sites = [site] + ([site_out] if site_out else [])
    part = (ranks.rank, ranks.world)
    batches = store_batches(store, sites, batch_size, settings.seed, shards=list(range(n - heldout)), part=part)
    held = list(range(n - heldout, n))
    record = {"store": str(Path(store_path).resolve()), "heldout_shards": held}

    def evaluate(saved: Dictionary) -> dict[str, Any] | None:
        from aimri.dictionaries.evaluate import reconstruction_metrics

        return reconstruction_metrics(saved, store, max_rows=HELDOUT_ROWS, shards=held) if held else None

    why = "every shard of the store was trained on: set `heldout_shards` (`--heldout-shards`) to keep some out"
    tcfg = replace(settings.train_config(), device=str(device or "auto"))
    return _train_and_save(cfg, batches, out, tcfg, progress, record, ranks, evaluate, why)


def train_from_subject(
    subject: Any,
    corpus: Any,
    site: str,
    out: str | Path,
    settings: DictionarySettings | None = None,
    site_out: str | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, float]]:
    """As `train_from_store`, but streamed from the model's forward passes (no store on disk; windows of
    `settings.context` tokens): the corpus is cycled when it holds fewer tokens than asked for; resumable
    (the stream replays deterministically)."""
    from aimri.dictionaries.stream import stream_memory, subject_batches

    settings = settings or DictionarySettings()
    _refuse_crosscoder(settings)
    sites = [site] + ([site_out] if site_out else [])
    cfg = _dictionary_config(  # site_dim checks the names before any forward pass
        settings, subject.site_dim(site), subject.site_dim(site_out) if site_out else None, site, site_out,
        subject.name, subject.revision, Packing.for_tokenizer(subject.tokenizer, settings.context).bos_id,
        dtype_name(subject.dtype),
    )  # fmt: skip
    context = settings.context
    batches = subject_batches(
        subject, corpus, sites, batch_size=settings.batch_size, context=context, seed=settings.seed
    )
    record = {"corpus": corpus.fingerprint(), "context": context}
    why = (
        "streamed from the model, cycling the corpus: no window was held out of training (`mri eval` on a store "
        "harvested from other text measures it)"
    )
    tcfg = replace(settings.train_config(), device=str(subject.device))  # the rows never leave the model's device
    memory = stream_memory(subject, sites, settings.batch_size, context)
    return _train_and_save(cfg, batches, out, tcfg, progress, record, no_heldout=why, memory=memory)


def train_from_rows(
    rows: Tensor,
    out: str | Path,
    settings: DictionarySettings,
    site: str,
    model_name: str,
    model_revision: str = "",
    heldout_every: int = 10,
    progress: bool = True,
    checkpoint_every: int = 200,
) -> tuple[Path, dict[str, float]]:
    """Train one SAE on rows already in memory ([n, d] fp32: e.g. activation differences collected for one
    job, as the checkup's model-diffing dictionary is); every `heldout_every`-th row is never trained on and
    measures the saved dictionary (0: none held out). Batches are drawn without replacement, reshuffled each
    pass from `settings.seed`, so a run interrupted after a checkpoint resumes to the same weights.

    Raises AimriError when there are fewer rows than one batch, or the rows are not finite."""
    _refuse_crosscoder(settings)
    if heldout_every < 0:
        raise AimriError(f"heldout_every must be 0 (none held out) or more, got {heldout_every}")
    if rows.ndim != 2 or not torch.isfinite(rows).all():
        raise AimriError(f"rows must be a finite [n, d] matrix, got shape {tuple(rows.shape)}")
    index = torch.arange(len(rows))
    held = index[::heldout_every] if heldout_every else index[:0]
    train = rows[index[index % heldout_every != 0]] if heldout_every else rows
    if len(train) < settings.batch_size:
        raise AimriError(
            f"{len(train)} training rows are fewer than one batch of {settings.batch_size}; give more text or a "
            "smaller batch_size"
        )
    cfg = _dictionary_config(settings, rows.shape[1], None, site, None, model_name, model_revision, None)
    cfg.prepend_bos, cfg.bos_id = True, None  # the rows came from prompts built by the tokenizer's own rule

    def batches() -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(settings.seed)
        while True:
            order = torch.randperm(len(train), generator=g)
            for i in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
                yield train[order[i : i + settings.batch_size]]

    def evaluate(saved: Dictionary) -> dict[str, Any] | None:
        from aimri.dictionaries.evaluate import reconstruction_from_pairs

        if not len(held):
            return None
        x = rows[held].to(saved.W_enc.device)
        return reconstruction_from_pairs(saved, [(x, x)])

    record = {"rows": len(rows), "heldout_rows": len(held)}
    tcfg = replace(settings.train_config(), device=str(rows.device), checkpoint_every=checkpoint_every)
    return _train_and_save(cfg, batches(), out, tcfg, progress, record, None, evaluate, "heldout_every was 0")


def train_transcoders(
    subject: Any,
    corpus: Any,
    out: str | Path,
    config: TranscodersConfig | None = None,
    progress: bool = True,
    ranks: Group | None = None,
) -> dict[int, dict[str, Any]]:
    """Per-layer transcoders mlp.in.L -> mlp.out.L for `config.layers` (default: every layer), trained
    together from one pass over the model's activations (no store); saved as `out`/layer-L in the SAELens
    layout, resumable. Every `config.heldout_every`-th window is never trained on: metrics.json holds each
    layer's FVU, L0, dead fraction and CE loss recovered on those windows. With `ranks` (torchrun) the layers
    are placed on ranks (rank r trains every world-th layer from r, each from its own forward passes), not
    data-parallel."""
    from aimri.dictionaries.evaluate import downstream_metrics, reconstruction_from_pairs, rows_from_windows
    from aimri.dictionaries.formats import load_dictionary, save_dictionary
    from aimri.dictionaries.stream import heldout_windows, stream_memory, subject_batches
    from aimri.progress import progress_bar

    c = config or TranscodersConfig()
    _refuse_crosscoder(c)
    layers = list(range(subject.n_layers)) if c.layers is None else list(c.layers)
    out = Path(out)
    settings = {
        "model": subject.name, "revision": subject.revision, "layers": layers, "architecture": c.architecture,
        "width": c.width, "k": c.k, "tokens": c.tokens, "batch_size": c.batch_size, "skip": c.skip, "lr": c.lr,
        "seed": c.seed, "context": c.context, "heldout_every": c.heldout_every, "corpus": corpus.fingerprint(),
    }  # fmt: skip
    cached = out / "metrics.json"
    if cached.exists():  # finished before with these settings: nothing to redo
        record = json.loads(cached.read_text())
        if record.get("settings") == settings and all(Run.transcoder_layer(out, layer).is_dir() for layer in layers):
            return {int(layer): m for layer, m in record["layers"].items()}
    ranks = ranks or Group()
    ranks.agree("the transcoder settings (model revision, corpus, layers)", json.dumps(settings, sort_keys=True))
    all_layers, layers = layers, layers[ranks.rank :: ranks.world]
    checkpoints = out / ".checkpoints" / (f"rank-{ranks.rank}-of-{ranks.world}" if ranks.active else "")
    trainers, bos_id = [], Packing.for_tokenizer(subject.tokenizer, c.context).bos_id
    for layer in layers:
        cfg = _dictionary_config(
            c, subject.d_model, subject.d_model, f"mlp.in.{layer}", f"mlp.out.{layer}", subject.name,
            subject.revision, bos_id, dtype_name(subject.dtype),
        )  # fmt: skip
        trainers.append(Trainer(cfg, replace(c.train_config(), device=str(subject.device))))
    sites = [s for layer in layers for s in (f"mlp.in.{layer}", f"mlp.out.{layer}")]
    batches = subject_batches(
        subject, corpus, sites, batch_size=c.batch_size, context=c.context, seed=c.seed, heldout_every=c.heldout_every
    )
    if trainers:
        plan = training_plan(
            [t.dcfg for t in trainers], trainers[0].tcfg, stream_memory(subject, sites, c.batch_size, c.context)
        )
        plan.check()
        kept = "the last checkpoints are kept: resume with more free memory, or delete .checkpoints to start over with the lower one"
        with out_of_memory(plan, kept):
            fit(trainers, batches, checkpoint_dir=checkpoints, progress=progress)
    fresh = next(batches, None) if trainers else None  # rows no step trained on: the inference form's calibration
    for layer, trainer in zip(layers, trainers, strict=True):
        save_dictionary(calibrated(trainer.export(), fresh, trainer.dcfg), Run.transcoder_layer(out, layer))
    held = (
        heldout_windows(subject.tokenizer, corpus, c.context, c.heldout_every, c.eval_windows)
        if c.heldout_every
        else []
    )
    rows = rows_from_windows(subject, held, sites) if held and layers else {}
    metrics: dict[int, dict[str, Any]] = {}
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("evaluate", total=len(layers), rate="")
        for layer, trainer in zip(layers, trainers, strict=True):
            model = load_dictionary(Run.transcoder_layer(out, layer))  # what a user will load, checked as saved
            train_last = {f"train_{key}": value for key, value in trainer.last.items()}
            metrics[layer] = {**train_last, "tokens": trainer.step_index * c.batch_size}
            if held:
                pair = [(rows[f"mlp.in.{layer}"], rows[f"mlp.out.{layer}"])]
                metrics[layer].update(reconstruction_from_pairs(model, pair) or {})
                if c.downstream_windows:
                    metrics[layer].update(
                        downstream_metrics(model, subject, corpus, windows=held[: c.downstream_windows])
                    )
            bar.update(task, advance=1)
    if ranks.active:  # every rank's layers, for the one metrics.json
        metrics = {int(k): v for part in ranks.all_gather(metrics, "collecting metrics") for k, v in part.items()}
        metrics = {layer: metrics[layer] for layer in all_layers}
    if ranks.leader:
        record = {"settings": settings, "eval_windows": len(held), "layers": metrics}
        atomic_write_text(out / "metrics.json", json.dumps(record, indent=1))
    ranks.barrier("writing metrics.json")
    return metrics


def train_crosscoder(
    subjects: list[Any],
    corpus: Any,
    site: str,
    out: str | Path,
    config: CrosscoderConfig | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """A BatchTopK crosscoder over `site` of several Subjects (e.g. a base model and its fine-tune),
    streamed from the models on the same tokens; saved in the SAELens layout at `out`, resumable."""
    from aimri.dictionaries.stream import paired_batches

    c = config or CrosscoderConfig()
    if c.architecture != "crosscoder" or c.skip:
        raise AimriError(
            f"a crosscoder's settings need architecture='crosscoder' and no skip (got {c.architecture!r}, "
            f"skip={c.skip})"
        )
    d = subjects[0].d_model
    if any(s.d_model != d for s in subjects):
        raise AimriError(
            f"the models' {site} widths differ ({[s.d_model for s in subjects]}); a crosscoder needs equal widths"
        )
    cfg = DictionaryConfig(
        "crosscoder", d * len(subjects), c.width, k=c.k, site=site, model_name="+".join(s.name for s in subjects),
        model_revision="+".join(s.revision[:12] for s in subjects), extra={"sources": len(subjects)},
        bos_id=Packing.for_tokenizer(subjects[0].tokenizer, c.context).bos_id, model_dtype=dtype_name(subjects[0].dtype),
    )  # fmt: skip
    batches = paired_batches(subjects, corpus, site, batch_size=c.batch_size, context=c.context, seed=c.seed)
    record = {"corpus": corpus.fingerprint(), "context": c.context}
    why = "streamed from the models, cycling the corpus: no window was held out of training"
    tcfg = replace(c.train_config(), device=str(subjects[0].device))
    return _train_and_save(cfg, batches, out, tcfg, progress, record, no_heldout=why)[1]
