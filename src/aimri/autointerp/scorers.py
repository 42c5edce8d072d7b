"""Scorers: how well a label tells held-out activating examples from non-activating ones.

Every score is an AUROC (0.5 = chance) on examples the explainer never saw, reported next to the same
score for a random other feature's label (the control), so a number means something.
"""

from __future__ import annotations

import json
import random
from typing import Protocol

from aimri.autointerp.embedder import Embedder, default_embedder
from aimri.autointerp.examples import FeatureExamples
from aimri.autointerp.llm import ChatBackend


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(score of a random positive > a random negative), ties counted half (Mann-Whitney U)."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


class Scorer(Protocol):
    name: str

    def score_many(self, items: list[tuple[str, FeatureExamples]]) -> list[float | Exception]:
        """One AUROC-like score per (label, examples), or the error that prevented it."""
        ...


class EmbeddingScorer:
    """Cosine between the label's embedding and each example's (the text around its peak, or around a
    random token for non-activating ones); AUROC of active vs inactive. Offline: MiniLM."""

    name = "embedding"

    def __init__(self, embedder: Embedder | None = None, radius: int = 8) -> None:
        self._embedder, self.radius = embedder, radius

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    def score(self, label: str, examples: FeatureExamples) -> float:
        active = [ex.snippet(self.radius) for ex in examples.score_active]
        inactive = [ex.snippet(self.radius, centre=len(ex.tokens) // 2) for ex in examples.score_inactive]
        if not active or not inactive:
            return float("nan")
        vectors = self.embedder.encode([label, *active, *inactive])
        sims = (vectors[1:] @ vectors[0]).tolist()
        return auroc(sims[: len(active)], sims[len(active) :])

    def score_many(self, items: list[tuple[str, FeatureExamples]]) -> list[float | Exception]:
        return [self.score(label, examples) for label, examples in items]


def _yes_no_list(n: int):  # type: ignore[no-untyped-def]
    """A parser for a reply holding a JSON list of n zeros and ones (anything else is malformed)."""

    def parse(text: str) -> list[int]:
        start, end = text.find("["), text.rfind("]")
        if start < 0 or end < start:
            raise ValueError("no JSON list in the reply")
        values = json.loads(text[start : end + 1])
        if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) for v in values):
            raise ValueError(f"expected a list of {n} zeros and ones")
        return [int(v) for v in values]

    return parse


class _JudgedScorer:
    """Shared by detection and fuzzing: the LLM marks each shown text 1 or 0 against the label; the score
    is the AUROC of its marks against the truth (with 0/1 marks: balanced accuracy)."""

    name = ""
    instruction = ""

    def __init__(self, backend: ChatBackend, per_class: int = 5, seed: int = 0) -> None:
        self.backend, self.per_class, self.seed = backend, per_class, seed

    def texts(self, examples: FeatureExamples, rng: random.Random) -> list[tuple[str, int]]:
        raise NotImplementedError

    def score_many(self, items: list[tuple[str, FeatureExamples]]) -> list[float | Exception]:
        prompts, truths = [], []
        for i, (label, examples) in enumerate(items):
            shown = self.texts(examples, random.Random(self.seed + i))
            rng = random.Random(self.seed + 1000 + i)
            rng.shuffle(shown)
            truths.append([t for _, t in shown])
            body = "\n".join(f"Example {j + 1}: {text}" for j, (text, _) in enumerate(shown))
            prompts.append([
                {"role": "system", "content": self.instruction},
                {"role": "user", "content": f"Feature explanation: {label}\n\n{body}\n\nAnswer with a JSON list of "
                 f"{len(shown)} numbers, 1 or 0, one per example."},
            ])  # fmt: skip
        replies = self.backend.complete_many(prompts, max_tokens=8 + 4 * max(map(len, truths), default=0),
                                             parse=[_yes_no_list(len(t)) for t in truths])  # fmt: skip
        out: list[float | Exception] = []
        for reply, truth in zip(replies, truths, strict=True):
            if isinstance(reply, Exception):
                out.append(reply)
            else:
                out.append(
                    auroc(
                        [m for m, t in zip(reply, truth, strict=True) if t],
                        [m for m, t in zip(reply, truth, strict=True) if not t],
                    )
                )
        return out


class DetectionScorer(_JudgedScorer):
    """Does the text contain what the label describes? Held-out activating vs non-activating texts."""

    name = "detection"
    instruction = (
        "You are checking an explanation of a language-model feature. For each text example, answer 1 if "
        "the feature as explained would activate on it, else 0."
    )

    def texts(self, examples: FeatureExamples, rng: random.Random) -> list[tuple[str, int]]:
        active = examples.score_active[: self.per_class]
        inactive = examples.score_inactive[: self.per_class]
        return [(ex.text(), 1) for ex in active] + [(ex.text(), 0) for ex in inactive]


class FuzzingScorer(_JudgedScorer):
    """Are the <<marked>> tokens the ones the label describes? The true activating tokens vs as many
    tokens marked at random, in held-out activating texts."""

    name = "fuzzing"
    instruction = (
        "You are checking an explanation of a language-model feature. In each example some tokens are marked "
        "<<like this>>. Answer 1 if the marked tokens are what the explanation describes, else 0."
    )

    def texts(self, examples: FeatureExamples, rng: random.Random) -> list[tuple[str, int]]:
        out = []
        for ex in examples.score_active[: self.per_class]:
            out.append((ex.highlighted(0.3), 1))
            n = max(1, sum(a > 0 for a in ex.acts))
            fake = set(rng.sample(range(len(ex.tokens)), min(n, len(ex.tokens))))
            out.append(("".join(f"<<{t}>>" if i in fake else t for i, t in enumerate(ex.tokens)), 0))
        return out
