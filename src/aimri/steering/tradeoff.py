"""Steering trade-off: how much of a concept a steered model brings up, against how fluent it stays.

Concept presence is read the same way for every method: the feature's own activation on the generated
tokens, re-encoded by the unsteered model (mean activation over the completion, as a fraction of the
feature's maximum), plus the fraction of completions an LLM judge calls on-topic when a judge is given.
Fluency is the perplexity of the completion under the unsteered model given the original prompt.
Each method is swept over strength; the baselines are prompting ("talk about X") and a diff-of-means
vector, as in AxBench, on the same prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimri.autointerp.llm import ChatBackend
from aimri.dictionaries.base import Dictionary
from aimri.dictionaries.match import check_model, opening, prompt_ids
from aimri.errors import AimriError
from aimri.paths import atomic_write_text
from aimri.plots import line_plot
from aimri.progress import progress_bar
from aimri.steering.generate import Generation, generate
from aimri.steering.interventions import DirectionEdit, FeatureEdit, Intervention, SteeringError
from aimri.steering.specs import FeatureChoice
from aimri.subject.core import Subject


@dataclass
class Point:
    method: str
    strength: float
    presence: float  # mean feature activation on generated tokens / the feature's max (mean over prompts)
    fired: float  # fraction of generated tokens on which the feature fires
    perplexity: float  # geometric mean over prompts, completion tokens only, under the unsteered model
    judged: float | None = None  # fraction of completions the judge calls on-topic
    samples: list[str] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list, repr=False)


def _row(p: Point) -> dict[str, Any]:
    return {k: v for k, v in asdict(p).items() if k != "generations"}


@dataclass
class Sweep:
    feature: int
    concept: str
    points: list[Point]
    best: dict[str, Point]  # per method: most presence within the perplexity budget
    perplexity_budget: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature, "concept": self.concept, "perplexity_budget": self.perplexity_budget,
            "points": [_row(p) for p in self.points], "best": {k: _row(v) for k, v in self.best.items()},
        }  # fmt: skip

    def plot(self) -> str:
        methods = list(dict.fromkeys(p.method for p in self.points if p.method != "unsteered"))
        base = [p for p in self.points if p.method == "unsteered"]
        series = {m: [(p.perplexity, p.presence) for p in self.points if p.method == m] for m in methods}
        notes = {m: [f"{p.strength:g}" for p in self.points if p.method == m] for m in methods}
        if base:
            series["unsteered"] = [(base[0].perplexity, base[0].presence)]
        best = max(self.best.values(), key=lambda p: p.presence, default=None)
        return line_plot(
            series, "perplexity of the completion under the unsteered model (lower = more fluent)",
            "concept presence (feature activation / max)", f"Steering feature {self.feature}: {self.concept}",
            log_x=True, notes=notes,
            highlight=None if best is None else (best.perplexity, best.presence, f"best: {best.method} {best.strength:g}"),
        )  # fmt: skip


def measure(
    subject: Subject, dictionary: Dictionary, feature: int, scale: float, gens: Sequence[Generation],
    prompt_ids: Sequence[list[int]] | None = None,
) -> tuple[float, float, float]:  # fmt: skip
    """(presence, fired fraction, perplexity) of completions, all under the unsteered model; given
    `prompt_ids`, completions are scored after those prompts (the originals, for a prompting baseline)."""
    cfg = dictionary.cfg
    presences, fired, nll, count = [], 0, 0.0, 0
    for i, g in enumerate(gens):
        if not g.completion_ids:
            presences.append(0.0)
            continue
        prompt = list(prompt_ids[i]) if prompt_ids is not None else g.prompt_ids
        ids = torch.tensor([prompt + g.completion_ids])
        out = subject.run(ids, read=[cfg.site], stop=False)
        start = len(prompt)
        with torch.no_grad():
            codes = dictionary.encode(out[cfg.site][0, start:].to(dictionary.W_enc))[:, feature].float()
        presences.append(float((codes / scale).clamp(0, 1).mean()))
        fired += int((codes > 0).sum())
        logp = out["logits"][0, start - 1 : -1].float().log_softmax(-1)
        nll -= float(logp.gather(1, ids[0, start:, None].to(logp.device)).sum())
        count += len(g.completion_ids)
    n_tokens = max(1, sum(len(g.completion_ids) for g in gens))
    return sum(presences) / len(presences), fired / n_tokens, math.exp(nll / max(1, count))


def judge_on_topic(judge: ChatBackend, concept: str, texts: Sequence[str]) -> float:
    """Fraction of texts an LLM judge says are about the concept (failed replies count as no)."""

    def parse(reply: str) -> bool:
        word = reply.strip().lower()
        if word.startswith("yes"):
            return True
        if word.startswith("no"):
            return False
        raise ValueError(f"not yes/no: {reply[:40]!r}")

    prompts = [
        [{"role": "user", "content": f"Does this text mention or talk about {concept}? Answer yes or no.\n\n{t}"}]
        for t in texts
    ]
    answers = judge.complete_many(prompts, max_tokens=3, parse=parse)
    return sum(1 for a in answers if a is True) / max(1, len(answers))


def diff_of_means(
    subject: Subject, dictionary: Dictionary, feature: int, texts: Sequence[str], context: int = 128
) -> tuple[Tensor, float]:
    """The mean activation at the feature's output site on tokens where the feature fires minus on tokens
    where it does not (the sink at position 0 left out), and the mean activation norm there."""
    cfg = dictionary.cfg
    site_out = cfg.site_out or cfg.site
    pos_sum, neg_sum = torch.zeros(subject.site_dim(site_out)), torch.zeros(subject.site_dim(site_out))
    n_pos = n_neg = 0
    norms = 0.0
    for text in texts:
        ids = prompt_ids(subject.tokenizer, text, dictionary)[:context]  # opened as its training windows were
        acts = subject.run(torch.tensor([ids]), read=list(dict.fromkeys([cfg.site, site_out])))
        with torch.no_grad():
            on = (dictionary.encode(acts[cfg.site][0].to(dictionary.W_enc))[:, feature] > 0).cpu()
        x = acts[site_out][0].float().cpu()  # the sums are kept on the host
        on[0] = False
        off = ~on
        off[0] = False
        pos_sum += x[on].sum(0)
        neg_sum += x[off].sum(0)
        n_pos, n_neg = n_pos + int(on.sum()), n_neg + int(off.sum())
        norms += float(x[1:].norm(dim=-1).sum())
    if n_pos == 0 or n_neg == 0:
        raise AimriError(f"feature {feature} never fires (or always fires) on the given texts: no diff-of-means")
    return pos_sum / n_pos - neg_sum / n_neg, norms / max(1, n_pos + n_neg)


def sweep(
    subject: Subject,
    prompts: Sequence[str],
    dictionary: Dictionary,
    feature: int,
    scale: float,
    concept: str,
    strengths: Sequence[float] = (1, 2, 4, 8, 16),
    dom: tuple[Tensor, float] | None = None,
    dom_strengths: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0),
    prompt_baseline: bool = True,
    judge: ChatBackend | None = None,
    perplexity_budget: float = 2.0,
    max_new_tokens: int = 40,
    progress: bool = True,
    **options: Any,
) -> Sweep:
    """Clamp the feature to strength × `scale` (its max activation), and for the baselines add the
    diff-of-means direction `dom` = (vector, mean norm) at strength × mean norm, or prompt for `concept`.
    The best point per method has the most presence at perplexity ≤ budget × the unsteered perplexity."""
    runs: list[tuple[str, float, Callable[[], list[Generation]]]] = []
    options = {"opening": opening(dictionary, subject.tokenizer), **options}  # every run: the same prompt tokens

    def steered(ivs: list[Intervention], **extra: Any) -> Callable[[], list[Generation]]:
        return lambda: generate(subject, prompts, ivs, max_new_tokens=max_new_tokens, **{**options, **extra})

    runs.append(("unsteered", 0.0, steered([])))
    for s in strengths:
        runs.append(("feature clamp", s, steered([FeatureEdit(dictionary, feature, s * scale)])))
    if dom is not None:
        vector, norm = dom
        unit = vector / vector.norm()
        site_out = dictionary.cfg.site_out or dictionary.cfg.site
        for s in dom_strengths:
            runs.append(("diff-of-means", s, steered([DirectionEdit(site_out, unit, s * norm)])))
    if prompt_baseline:
        runs.append(("prompting", 1.0, steered([], system=f"Talk about {concept}.")))
    points: list[Point] = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("steering sweep", total=len(runs), rate="")
        for method, strength, run in runs:
            gens = run()
            originals = [g.prompt_ids for g in points[0].generations] if points else None
            presence, fired, ppl = measure(subject, dictionary, feature, scale, gens, originals)
            judged = judge_on_topic(judge, concept, [g.text for g in gens]) if judge is not None else None
            points.append(Point(method, strength, presence, fired, ppl, judged, [g.text for g in gens], gens))
            bar.update(task, advance=1, rate=f"{method} {strength:g}")
    budget = perplexity_budget * points[0].perplexity
    best: dict[str, Point] = {}
    for p in points[1:]:
        if p.perplexity <= budget and (p.method not in best or p.presence > best[p.method].presence):
            best[p.method] = p
    return Sweep(feature, concept, points, best, perplexity_budget)


def sweep_feature(
    subject: Subject,
    prompts: Sequence[str],
    choice: FeatureChoice,
    strengths: Sequence[float],
    concept: str | None = None,
    out: Path | None = None,
    judge: ChatBackend | None = None,
    progress: bool = True,
    **options: Any,
) -> Sweep:
    """The presence / fluency trade-off of one resolved feature (`resolve_feature`) against the diff-of-means
    vector built from its atlas's top examples and prompting for `concept` (default: its atlas label), as in
    AxBench (Wu et al. 2025). With `out`, writes OUT/sweep.json and OUT/curve.svg (temp file, rename).

    Raises SteeringError when the feature has no atlas (its max activation and examples come from there), or
    no concept is given and the atlas has no label."""
    from aimri.atlas.db import Atlas

    if choice.max_act is None or choice.atlas is None:
        raise SteeringError(
            "a sweep needs the feature's atlas (max activation and examples): build it with `mri atlas DICTIONARY`"
        )
    concept = concept or choice.label
    if not concept:
        raise SteeringError(
            "a sweep needs the concept in words for the prompting baseline: give `concept`, or label the atlas"
        )
    edit = choice.edit
    check_model(
        edit.dictionary, subject, bool(options.get("allow_other_model")), f"the dictionary of {edit.describe()}"
    )
    examples = Atlas(choice.atlas).examples(edit.feature, "top")
    dom = diff_of_means(subject, edit.dictionary, edit.feature, ["".join(e["tokens"]) for e in examples])
    result = sweep(subject, prompts, edit.dictionary, edit.feature, choice.max_act, concept, strengths, dom=dom,
                   judge=judge, progress=progress, **options)  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "sweep.json", json.dumps(result.to_dict(), indent=1))
        atomic_write_text(out / "curve.svg", result.plot())
    return result
