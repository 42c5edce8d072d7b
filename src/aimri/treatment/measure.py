"""What a treatment is judged by: the flaw's rate on held-out prompts of its condition, next-token loss on
held-out neutral text, battery answers that agree with the baseline, the trait probes' AUROCs, and the
difference between the treated and the untreated model."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from aimri.diagnostics.checkup import ANOMALY_NATS, neutral_windows
from aimri.diagnostics.datasets import TRAITS, ContrastDataset, load_dataset, prompt_pools
from aimri.diagnostics.diffing import difference_lens, words_of
from aimri.diagnostics.probes import Probe, auroc, pair_activations
from aimri.steering.generate import generate
from aimri.subject.core import Subject
from aimri.treatment.edits import TreatmentError

BREAK_LOSS = 0.10  # a treatment that raises held-out loss by more than this (relative) broke the model


def corpus_split(n_repair: int = 200, n_held_out: int = 48, seed: int = 11) -> tuple[list[str], list[str]]:
    """Disjoint default-corpus documents: (text a repair may train on, text its loss is measured on)."""
    from aimri.data.default_corpus import default_corpus_path

    lines = default_corpus_path().read_text(encoding="utf-8").splitlines()
    # the checkup's neutral text (seed 0; 32 windows for the diff, 8 for the anatomy) stays out
    scanned = {line for k in (32, 128) for line in random.Random(0).sample(lines, min(len(lines), k))}
    lines = [line for line in lines if line not in scanned]
    picked = random.Random(seed).sample(lines, min(len(lines), n_repair + 4 * n_held_out))
    texts = [json.loads(line)["text"] for line in picked]
    return texts[:n_repair], texts[n_repair:]


def held_out_windows(subject: Subject, texts: list[str], n: int = 16, length: int = 128) -> Tensor:
    """[n, length] windows of held-out neutral text (document separator first)."""
    return neutral_windows(subject, n=n, length=length, texts=texts)


def check_not_broken(before: float, after: float, logits_finite: bool) -> None:
    """Raises TreatmentError when the treated model's logits are NaN/inf or its held-out loss rose over 10%."""
    if not logits_finite or after != after:
        raise TreatmentError("the treated model computes NaN/inf logits; nothing was written")
    if after > before * (1 + BREAK_LOSS):
        raise TreatmentError(
            f"the treatment raised held-out next-token loss {before:.3f} -> {after:.3f} nats "
            f"(+{after / before - 1:.1%}, over the {BREAK_LOSS:.0%} limit): it breaks the model; nothing was written"
        )


@torch.no_grad()
def logits_finite(subject: Subject, windows: Tensor) -> bool:
    return bool(torch.isfinite(subject.run(windows[:2], stop=False)["logits"]).all())


def flaw_rate(subject: Subject, prompts: Sequence[str], words: Sequence[str], max_new_tokens: int = 24) -> float:
    """Share of greedy answers to `prompts` that use any of `words` (as words, case-insensitive)."""
    if not prompts or not words:
        return 0.0
    want = {w.lower() for w in words}
    texts = [g.text for g in generate(subject, list(prompts), max_new_tokens=max_new_tokens)]
    return sum(bool(words_of(t) & want) for t in texts) / len(texts)


def pool_prompts(pool: str, limit: int = 40) -> list[str]:
    """The held-out prompts of a condition: a prompt pool the battery never asks (at most `limit`)."""
    return list(prompt_pools()[pool])[:limit]


def battery_agreement(
    diff_stage: dict[str, Any], behaviour: dict[str, Any], only: Sequence[str] | None = None
) -> float | None:
    """Share of a scan's battery answers the baseline finds at most ANOMALY_NATS per token less likely than the
    scanned model does (the checkup's anomaly measure, as an absolute threshold), from the scan's diff and
    behaviour stages; `only` restricts it to those prompts (None when none of them is in the battery)."""
    keep = set(only) if only is not None else None
    flags = [
        x <= ANOMALY_NATS
        for c in diff_stage["behaviour"]
        for p, x in zip(behaviour[c["category"]]["prompts"], c["per_answer"], strict=True)
        if keep is None or p in keep
    ]
    return sum(flags) / len(flags) if flags else None


def probe_aurocs(subject: Subject, probes: dict[str, Probe]) -> dict[str, float]:
    """Each trait probe's test AUROC read on `subject`'s activations (the probes stay the baseline's)."""
    out = {}
    for trait in TRAITS:
        if trait not in probes:
            continue
        test = load_dataset(trait).split("test")
        pos, neg = pair_activations(subject, ContrastDataset(trait, test), [probes[trait].layer])
        out[trait] = round(auroc(probes[trait].score(pos[:, 0]), probes[trait].score(neg[:, 0])), 4)
    return out


def model_diff(treated: Subject, untreated: Subject, windows: Tensor) -> list[dict[str, Any]]:
    """The treatment's trace on neutral text: per layer, the mean residual difference relative to the residual
    and the tokens it promotes through the logit lens (aimri.diagnostics.diffing.difference_lens)."""
    layers = list(range(2, untreated.n_layers, 3))
    rows = difference_lens(treated, untreated, windows, layers, top=8)
    return [
        {"layer": r["layer"], "relative_norm": round(r["relative_norm"], 5), "promoted": r["promoted"]} for r in rows
    ]
