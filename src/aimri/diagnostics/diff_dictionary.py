"""Model-diffing dictionary: a sparse dictionary trained within the scan on what the fine-tune changed, its
latents ranked by how specific they are to the candidate and described by their top examples and logit
effects.

The dictionary is a diff-SAE (Aranguri, Drori & Nanda 2025, "SAEs trained on model diffs"; the
activation-difference view of Minder et al. 2025): a BatchTopK SAE over the per-token differences
candidate - baseline at one residual site, both models reading the same tokens: neutral corpus text and chat
text (the battery's prompts with the baseline's own answers, teacher-forced, and the checkup's other request
pools as chat openings). Every latent of it describes part of the change; a crosscoder (`mri
train-crosscoder`, `mri scan --crosscoder`) spends most of its latents on what both models share, which a
scan's few thousand tokens cannot afford.

Specificity of a latent: where it fires, how far the candidate's state moves along its decoder direction
beyond the baseline's, in units of the baseline's own spread along that direction over all the text
(a standardised effect size: drift along directions the baseline varies along anyway scores low, a direction
the baseline never takes scores high). Position 0 and massive activations (the harvest's sink rule, on either
model) are left out of every row.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimri.autointerp.examples import Example
from aimri.data.corpus import Packing
from aimri.data.harvest import keep_rows
from aimri.diagnostics.anatomy import unembed
from aimri.diagnostics.datasets import prompt_pools
from aimri.diagnostics.diffing import neutral_windows
from aimri.errors import AimriError
from aimri.paths import atomic_write_text
from aimri.progress import progress_bar
from aimri.steering.generate import left_pad, prompt_ids, template_span
from aimri.subject.core import Subject


@dataclass
class DiffDictionaryBudget:
    """The diff dictionary's data and size (the finding quotes them). run_checkup skips the stage at width 0."""

    layer: int | None = None  # residual layer read (None: half way up)
    neutral_windows: int = 192  # default-corpus documents, first `length` tokens of each
    length: int = 64
    width: int = 512
    k: int = 8
    tokens: int = 600_000  # training rows drawn (the rows are cycled)
    batch_size: int = 1024
    top: int = 8  # latents described
    examples: int = 6  # top examples per described latent
    min_fires: int = 8  # a latent firing on fewer rows is not ranked
    seed: int = 0


def scan_texts(
    baseline: Subject, base_behaviour: dict[str, Any], budget: DiffDictionaryBudget, neutral_texts: list[str] | None
) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """(token rows both models read, per row the chat template's positions to leave out as (opening end,
    closing start, closing end), (0, 0, 0) for none): neutral windows, the battery's conversations with the
    baseline's answers, and chat openings of the checkup's other request pools (questions, the trigger
    scanner's prompts). The template's own tokens are left out because every chat fine-tune rewrites how they
    are processed: they describe the recipe, not what it taught."""
    rows = neutral_windows(baseline, n=budget.neutral_windows, length=budget.length, texts=neutral_texts).tolist()
    skip = [(0, 0, 0)] * len(rows)
    chat = bool(getattr(baseline.tokenizer, "chat_template", None))
    head, tail = template_span(baseline) if chat else (0, 0)
    for category in base_behaviour.values():
        for p, c in category["ids"]:
            rows.append(list(p) + list(c))
            skip.append((head, len(p) - tail, len(p)))
    pools = prompt_pools()
    for text in [*pools["questions"], *pools["scanner"]]:
        rows.append(prompt_ids(baseline, text))
        skip.append((head, len(rows[-1]) - tail, len(rows[-1])))
    return rows, skip


@torch.no_grad()
def paired_activations(
    candidate: Subject,
    baseline: Subject,
    rows: Sequence[list[int]],
    site: str,
    skip: Sequence[tuple[int, int, int]] | None = None,
    batch: int = 16,
) -> tuple[Tensor, Tensor, Tensor]:
    """(candidate [n, d], baseline [n, d], where [n, 2] = (row, position)) at `site` over every kept token of
    `rows`: not the first token of a row, not a special token, not in the row's `skip` spans ([0, a) and
    [b, c) of (a, b, c)), not a massive activation in either model."""
    tok = baseline.tokenizer
    special = torch.tensor(sorted(Packing.for_tokenizer(tok, 8).exclude_ids), dtype=torch.long)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out_c, out_b, where = [], [], []
    with progress_bar() as bar:
        task = bar.add_task("diff dictionary: activations", total=len(rows))
        for i in range(0, len(rows), batch):
            chunk = [list(r) for r in rows[i : i + batch]]
            ids, mask = left_pad(chunk, pad)
            valid = mask.bool() & ~torch.isin(ids, special)
            first = mask.argmax(1)  # each row's first real position (left padding)
            valid[torch.arange(len(ids)), first] = False
            for j, (a, b, c) in enumerate(skip[i : i + batch] if skip is not None else []):
                f = int(first[j])
                valid[j, f : f + a] = False
                valid[j, f + b : f + c] = False
            acts = [who.run(ids.to(who.device), mask.to(who.device), read=[site]) for who in (candidate, baseline)]
            keep = keep_rows(acts[0], [site], valid, 20.0, "the diff dictionary's text")
            keep &= keep_rows(acts[1], [site], valid, 20.0, "the diff dictionary's text")
            out_c.append(acts[0][site][keep.to(acts[0][site].device)].float().cpu())
            out_b.append(acts[1][site][keep.to(acts[1][site].device)].float().cpu())
            r, p = keep.nonzero(as_tuple=True)
            # positions counted from each row's own start, as the row's tokens are listed
            where.append(torch.stack([r + i, p - first[r]], 1))
            bar.advance(task, len(chunk))
    return torch.cat(out_c), torch.cat(out_b), torch.cat(where)


def _example(tok: Any, row: list[int], acts: dict[int, float], centre: int, radius: int = 10) -> Example:
    lo, hi = max(0, centre - radius), min(len(row), centre + 3)
    tokens = [tok.decode([t]) for t in row[lo:hi]]
    values = [acts.get(p, 0.0) for p in range(lo, hi)]
    return Example(tokens, values, max(values) if values else 0.0)


@torch.no_grad()
def latent_table(
    sae: Any,
    cand: Tensor,
    base: Tensor,
    where: Tensor,
    rows: Sequence[list[int]],
    baseline: Subject,
    budget: DiffDictionaryBudget,
    explainer: Any = None,
) -> list[dict[str, Any]]:
    """The `budget.top` most candidate-specific latents (see the module doc), each with its specificity, share
    of the difference's mass, firing count, top examples (the token marked << >>), the tokens its decoder
    promotes and suppresses through the baseline's logit lens, and a label from `explainer` (an autointerp
    Explainer; default the statistical one: the tokens it fires on)."""
    from aimri.autointerp.explainers import StatisticalExplainer

    explainer = explainer or StatisticalExplainer()
    tok = baseline.tokenizer
    dec = sae.W_dec.float().cpu()  # [width, d]
    norms = dec.norm(dim=1)
    unit = dec / norms.clamp_min(1e-12)[:, None]
    codes = torch.cat([sae.encode(x.to(sae.W_enc)).float().cpu() for x in (cand - base).split(4096)])
    codes[(cand - base).abs().amax(1) == 0] = 0.0  # nothing changed there: a latent's bias alone is no firing
    fires = codes > 0
    count = fires.sum(0)
    proj_b = base @ unit.T  # [n, width]: the baseline's state along each decoder direction
    moved = (cand - base) @ unit.T
    spread = proj_b.std(0)
    spread = spread.clamp_min(max(0.01 * float(spread.median()), 1e-6))  # rounding-noise directions are not news
    shift = (moved * fires).sum(0) / count.clamp_min(1)
    specificity = torch.where(count >= budget.min_fires, shift / spread, torch.full_like(shift, -math.inf))
    mass = (codes * norms).sum(0)
    share = mass / mass.sum().clamp_min(1e-12)
    order = [i for i in specificity.argsort(descending=True).tolist() if math.isfinite(float(specificity[i]))]
    table, example_sets = [], []
    for i in order[: budget.top]:
        examples: list[Example] = []
        seen: set[str] = set()  # one example per distinct snippet (the chat template repeats in every chat row)
        for j in codes[:, i].topk(min(len(codes), 16 * budget.examples)).indices.tolist():
            r, p = (int(v) for v in where[j])
            if len(examples) == budget.examples or float(codes[j, i]) <= 0:
                break
            same_row = (where[:, 0] == r).nonzero().flatten()
            acts = {int(where[m, 1]): float(codes[m, i]) for m in same_row.tolist()}
            example = _example(tok, rows[r], acts, p)
            if example.highlighted(0.5) not in seen:
                seen.add(example.highlighted(0.5))
                examples.append(example)
        example_sets.append(examples)
        lens = unembed(baseline, dec[i][None, None])[0, 0]
        lens = lens - lens.mean()
        table.append({
            "latent": i, "specificity": round(float(specificity[i]), 3), "share": round(float(share[i]), 4),
            "fires": int(count[i]), "shift": round(float(shift[i]), 4), "baseline_spread": round(float(spread[i]), 4),
            "promotes": [tok.decode([t]) for t in lens.topk(8).indices.tolist()],
            "suppresses": [tok.decode([t]) for t in (-lens).topk(8).indices.tolist()],
            "examples": [e.highlighted(0.5) for e in examples],
        })  # fmt: skip
    for row, label in zip(table, explainer.explain_many(example_sets), strict=True):
        row["label"] = label if isinstance(label, str) else f"(no label: {label})"
        row["explainer"] = explainer.name
    return table


def diff_dictionary(
    candidate: Subject,
    baseline: Subject,
    base_behaviour: dict[str, Any],
    out: Path,
    budget: DiffDictionaryBudget | None = None,
    neutral_texts: list[str] | None = None,
    explainer: Any = None,
    progress: bool = True,
    key: str = "",
) -> dict[str, Any]:
    """Collect both models' activations on the scan's text, train the diff-SAE at `out` (SAELens layout,
    training.json beside it; checkpoints in `out`.checkpoints, so an interrupted scan resumes the training),
    and describe its most candidate-specific latents. Returns a JSON-able dict: the site, the row counts, the
    training figures and the latent table (latent_table). `key` names the configuration (the scan's stage
    tag): a dictionary or checkpoints left at `out` under another key (another baseline, another budget) are
    deleted first, so a resumed training only ever continues its own run."""
    from aimri.dictionaries.config import DictionarySettings
    from aimri.dictionaries.formats import load_dictionary
    from aimri.dictionaries.train import train_from_rows

    budget = budget or DiffDictionaryBudget()
    stamp = out.with_name(out.name + ".key")
    if not stamp.is_file() or stamp.read_text() != key:
        for stale in (out, out.with_name(out.name + ".checkpoints")):
            shutil.rmtree(stale, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, key)
    layer = budget.layer if budget.layer is not None else max(1, baseline.n_layers // 2)
    site = f"resid.{layer}"
    rows, skip = scan_texts(baseline, base_behaviour, budget, neutral_texts)
    cand, base, where = paired_activations(candidate, baseline, rows, site, skip)
    if not len(cand):
        raise AimriError(
            f"no token of the scan's text was kept at {site} (all special, template or massive activations); "
            "give neutral texts with ordinary prose"
        )
    diff = cand - base
    relative = float((diff.norm(dim=1) / base.norm(dim=1).clamp_min(1e-6)).mean())
    record = {"site": site, "rows": len(cand), "texts": len(rows), "relative_change": round(relative, 6),
              "budget": asdict(budget)}  # fmt: skip
    if not bool(diff.abs().max() > 0):  # nothing to train on: say so rather than fit noise (or divide by zero)
        return {**record, "identical": True, "dictionary": None, "fvu_heldout": None, "latents": []}
    moved = diff[diff.abs().amax(1) > 0]  # tokens both models process identically carry nothing to learn
    settings = DictionarySettings(
        architecture="batchtopk", width=budget.width, k=min(budget.k, budget.width), tokens=budget.tokens,
        batch_size=min(budget.batch_size, max(1, len(moved) // 2)), seed=budget.seed,
    )  # fmt: skip
    name = f"{baseline.name}->{candidate.name} (diff)"
    revision = f"{baseline.revision[:12]}+{candidate.revision[:12]}"
    path, _ = train_from_rows(moved, out, settings, site, name, revision, progress=progress)
    sae = load_dictionary(path).to("cpu")
    training = json.loads((path / "training.json").read_text())
    return {
        **record, "identical": False, "dictionary": str(path),
        "fvu_heldout": (training.get("heldout_saved") or {}).get("fvu"),
        "latents": latent_table(sae, cand, base, where, rows, baseline, budget, explainer),
    }  # fmt: skip
