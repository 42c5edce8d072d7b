"""Scorers: how well a label tells held-out activating examples from non-activating ones.

Every score is an AUROC (0.5 = chance) on examples the explainer never saw, reported next to the same
score for a random other feature's label (the control), so a number means something.
"""

from __future__ import annotations

from typing import Protocol

from aimri.autointerp.embedder import Embedder, default_embedder
from aimri.autointerp.examples import FeatureExamples


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(score of a random positive > a random negative), ties counted half (Mann-Whitney U)."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


class Scorer(Protocol):
    name: str

    def score(self, label: str, examples: FeatureExamples) -> float: ...


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
