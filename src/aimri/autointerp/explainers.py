"""Explainers: a label for a feature from the examples it is shown.

`StatisticalExplainer` needs no LLM: it names the tokens the feature fires on (weighted by activation)
and the context that most often precedes them. The LLM explainers (an OpenAI-compatible endpoint or an
in-process Hugging Face chat model) share the delphi-style prompt in `prompt_for`.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from aimri.autointerp.examples import Example
from aimri.autointerp.llm import ChatBackend


class Explainer(Protocol):
    name: str

    def explain_many(self, example_sets: list[list[Example]]) -> list[str | Exception]:
        """One label per feature's example set, or the error that prevented it."""
        ...


class StatisticalExplainer:
    """Top activating tokens (and a dominant preceding token, when there is one)."""

    name = "statistical"

    def __init__(self, n_tokens: int = 3, share: float = 0.5) -> None:
        self.n_tokens, self.share = n_tokens, share

    def explain(self, examples: list[Example]) -> str:
        weights: dict[str, float] = {}
        before: Counter[str] = Counter()
        for ex in examples:
            if ex.peak <= 0:
                continue
            for i, (token, act) in enumerate(zip(ex.tokens, ex.acts, strict=False)):
                if act >= 0.5 * ex.peak:
                    key = token.strip() or repr(token)
                    weights[key] = weights.get(key, 0.0) + act / ex.peak
                    if i > 0:
                        before[ex.tokens[i - 1].strip() or repr(ex.tokens[i - 1])] += 1
        if not weights:
            return "(never fires)"
        words = sorted(weights, key=weights.__getitem__, reverse=True)[: self.n_tokens]
        label = ", ".join(f'"{w}"' for w in words)
        if before:
            word, count = before.most_common(1)[0]
            if count >= self.share * sum(before.values()):
                label += f' after "{word}"'
        return label

    def explain_many(self, example_sets: list[list[Example]]) -> list[str | Exception]:
        return [self.explain(examples) for examples in example_sets]


def clean_label(text: str) -> str:
    """The first non-empty line of a reply, unquoted; a ValueError (retried) when there is none."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        for prefix in ("Explanation:", "Label:", "Answer:"):
            line = line.removeprefix(prefix).strip()
        if line:
            return line[:200]
    raise ValueError("empty label")


class LLMExplainer:
    """Labels from a chat model (an OpenAI-compatible endpoint or an in-process HF model)."""

    def __init__(self, backend: ChatBackend, max_examples: int = 20) -> None:
        self.backend, self.max_examples = backend, max_examples
        self.name = backend.name

    def explain_many(self, example_sets: list[list[Example]]) -> list[str | Exception]:
        prompts = [prompt_for(examples, self.max_examples) for examples in example_sets]
        return self.backend.complete_many(prompts, max_tokens=48, parse=clean_label)


def prompt_for(examples: list[Example], max_examples: int = 20) -> list[dict[str, str]]:
    """A delphi-style chat prompt: activating tokens marked with << >>, strongest examples first."""
    shown = "\n".join(f"Example {i + 1}: {ex.highlighted(0.3)}" for i, ex in enumerate(examples[:max_examples]))
    return [
        {
            "role": "system",
            "content": "You are studying a feature inside a language model. You see text examples where the "
            "feature activates; the tokens where it fires are marked <<like this>>. Reply with one short "
            "phrase (under 12 words) saying what the feature detects. Reply with the phrase only.",
        },
        {"role": "user", "content": shown},
    ]
