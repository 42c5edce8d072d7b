"""Probes: trait directions from contrastive pairs, by difference of means and by logistic regression,
swept over layers. The layer is chosen on a validation slice of the training pairs, so the AUROC and the
TPR at 1% FPR reported for it are on test pairs nothing was fitted or chosen on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aimri.diagnostics.datasets import ContrastDataset, DatasetError, Messages
from aimri.progress import progress_bar
from aimri.subject.chat import chat_ids
from aimri.subject.core import Subject


def auroc(pos: Tensor, neg: Tensor) -> float:
    """Probability a positive outscores a negative (ties count half): the Mann-Whitney statistic."""
    if len(pos) == 0 or len(neg) == 0:
        raise DatasetError("AUROC needs both classes; the scores hold one class only")
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def tpr_at_fpr(pos: Tensor, neg: Tensor, fpr: float = 0.01) -> float:
    """Share of positives above the threshold that lets at most `fpr` of negatives through."""
    allowed = int(fpr * len(neg))
    threshold = torch.sort(neg.double(), descending=True).values[allowed] if allowed < len(neg) else -float("inf")
    return float((pos.double() > threshold).double().mean())


def encode_turns(subject: Subject, messages: Messages) -> tuple[list[int], list[int]]:
    """Ids of a conversation and the positions a probe reads: the assistant's answer tokens when the last
    turn is the assistant's, else the last token of the prompt (where the model decides how to answer)."""
    tok = subject.tokenizer
    if messages and messages[-1]["role"] == "assistant":
        head = chat_ids(tok, messages[:-1])
        body = list(tok(messages[-1]["content"], add_special_tokens=False)["input_ids"])
        return head + body, list(range(len(head), len(head) + len(body)))
    ids = chat_ids(tok, messages)
    return ids, [len(ids) - 1]


@torch.no_grad()
def read_layers(
    subject: Subject, conversations: Sequence[Messages], layers: Sequence[int], batch_size: int = 16, label: str = ""
) -> Tensor:
    """Mean residual over each conversation's read positions, for every layer: [n, len(layers), d].
    Conversations are batched in order of length (little padding to compute; padded batches are exact)."""
    encoded = [encode_turns(subject, m) for m in conversations]
    sites = [f"resid.{layer}" for layer in layers]
    pad = subject.tokenizer.pad_token_id if subject.tokenizer.pad_token_id is not None else 0
    out = torch.zeros(len(encoded), len(layers), subject.d_model)
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    with progress_bar() as bar:
        task = bar.add_task(f"reading {label or 'activations'}", total=len(encoded))
        for start in range(0, len(encoded), batch_size):
            rows = by_length[start : start + batch_size]
            chunk = [encoded[i] for i in rows]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (row, _) in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            acts = subject.run(ids, mask, read=sites)
            for j, site in enumerate(sites):
                a = acts[site].float()
                for i, (_, positions) in enumerate(chunk):
                    out[rows[i], j] = a[i, positions].mean(0)
            bar.advance(task, len(chunk))
    return out


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-2, steps: int = 100) -> tuple[Tensor, float]:
    """L2-regularised logistic regression on standardised features (LBFGS); returns (w, b) in raw units."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    zd, yd = z.double(), y.double()
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(zd @ w + b, yd) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[arg-type]
    w_raw = (w.detach() / sd.double()).float()
    return w_raw, float(b.detach() - (w.detach() * mu.double() / sd.double()).sum())


@dataclass
class LayerScore:
    layer: int
    diff_of_means: float  # test AUROC
    logistic: float  # test AUROC


@dataclass
class Probe:
    """A trait direction at one layer; `score` reads texts, higher = more of the trait."""

    trait: str
    layer: int
    method: str
    direction: Tensor
    bias: float
    test_auroc: float
    test_tpr_at_1fpr: float
    n_train: int
    n_test: int
    test_gap: float = 1.0  # mean score of test positives minus negatives: the probe's own unit
    sweep: list[LayerScore] = field(default_factory=list)

    def score(self, acts: Tensor) -> Tensor:
        """acts: [n, d] residuals at this probe's layer, in any dtype (a bf16 model's): scored in the direction's."""
        return acts.to(self.direction) @ self.direction + self.bias

    def summary(self) -> dict[str, Any]:
        return {
            "trait": self.trait, "layer": self.layer, "method": self.method, "test_auroc": round(self.test_auroc, 4),
            "test_tpr_at_1fpr": round(self.test_tpr_at_1fpr, 4), "n_train": self.n_train, "n_test": self.n_test, "test_gap": self.test_gap, "bias": self.bias,
            "sweep": [vars(s) for s in self.sweep],
        }  # fmt: skip


def _fit(method: str, xp: Tensor, xn: Tensor) -> tuple[Tensor, float]:
    if method == "diff_of_means":
        d = xp.mean(0) - xn.mean(0)
        d = d / d.norm().clamp_min(1e-12)
        return d, -float(((xp.mean(0) + xn.mean(0)) / 2) @ d)
    x = torch.cat([xp, xn])
    y = torch.cat([torch.ones(len(xp)), torch.zeros(len(xn))])
    return fit_logistic(x, y)


def _auroc_of(method: str, fit_p: Tensor, fit_n: Tensor, eval_p: Tensor, eval_n: Tensor) -> float:
    d, b = _fit(method, fit_p, fit_n)
    return auroc(eval_p @ d + b, eval_n @ d + b)


def pair_activations(
    subject: Subject, dataset: ContrastDataset, layers: Sequence[int], batch_size: int = 16
) -> tuple[Tensor, Tensor]:
    """(positives, negatives) [n_pairs, len(layers), d], training pairs first, then test pairs."""
    pairs = dataset.split("train") + dataset.split("test")
    acts = read_layers(
        subject,
        [p.positive for p in pairs] + [p.negative for p in pairs],
        layers,
        batch_size,
        label=f"{dataset.name} pairs",
    )
    return acts[: len(pairs)], acts[len(pairs) :]


def train_probe(
    subject: Subject,
    dataset: ContrastDataset,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    acts: tuple[Tensor, Tensor] | None = None,
) -> Probe:
    """Sweep layers and both methods; choose on a validation quarter of the training pairs, report on test.

    The choice is among the middle half of the layers: the first layers mostly encode which tokens are
    present, so a probe there separates the two answers' wording rather than the trait."""
    train, test = dataset.split("train"), dataset.split("test")
    if len(train) < 8:
        raise DatasetError(f"{dataset.name}: {len(train)} training pairs; a probe needs at least 8")
    layers = list(layers if layers is not None else range(subject.n_layers))
    pos, neg = acts if acts is not None else pair_activations(subject, dataset, layers, batch_size)
    n_fit = int(0.75 * len(train))
    best: tuple[float, int, str] = (-1.0, 0, "")
    lo, hi = subject.n_layers // 4, (3 * subject.n_layers + 3) // 4
    eligible = [j for j, layer in enumerate(layers) if lo <= layer < hi] or list(range(len(layers)))
    sweep: list[LayerScore] = []
    for j, layer in enumerate(layers):
        ptr, ntr, pte, nte = pos[: len(train), j], neg[: len(train), j], pos[len(train) :, j], neg[len(train) :, j]
        for method in ("diff_of_means", "logistic") if j in eligible else ():
            val = _auroc_of(method, ptr[:n_fit], ntr[:n_fit], ptr[n_fit:], ntr[n_fit:])
            if val > best[0] + 1e-9:
                best = (val, j, method)
        sweep.append(LayerScore(layer, *(_auroc_of(m, ptr, ntr, pte, nte) for m in ("diff_of_means", "logistic"))))
    _, j, method = best
    d, b = _fit(method, pos[: len(train), j], neg[: len(train), j])
    sp, sn = pos[len(train) :, j] @ d + b, neg[len(train) :, j] @ d + b
    gap = float(sp.mean() - sn.mean())
    return Probe(
        dataset.name,
        layers[j],
        method,
        d,
        b,
        auroc(sp, sn),
        tpr_at_fpr(sp, sn, 0.01),
        len(train),
        len(test),
        gap,
        sweep,
    )
