"""Scorers: how well a label tells held-out activating examples from non-activating ones.

Every score is an AUROC (0.5 = chance) on examples the explainer never saw, reported next to the same
score for a random other feature's label (the control), so a number means something.
"""

from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from aimri.autointerp.embedder import Embedder, default_embedder
from aimri.autointerp.examples import FeatureExamples
from aimri.autointerp.llm import ChatBackend
from aimri.errors import AimriError
from aimri.subject.chat import chat_ids


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


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")


_SIMULATION_TASK = (
    "Predict how strongly a language-model feature fires on each token, from 0 (not at all) to 9 "
    "(strongly). Each line is a token, a tab, and your number."
)


def _line(token: str) -> str:
    return token.replace("\n", "\\n") + "\t"


class SimulationScorer:
    """OpenAI-style simulation: given only the label, a model predicts each token's activation (0-9); the
    score is the correlation of its expected prediction (from the digit probabilities) with the true
    activations, over held-out active and inactive examples. One forward pass per example: every token is
    followed by a tab, the prediction is read at the tab, and "0" is written after it (teacher forcing;
    most tokens are 0). The backend is an in-process HF model (exact digit probabilities) or an HTTP
    endpoint that returns prompt log-probabilities (`ChatClient.prompt_logprobs`; digits outside its top
    alternatives count as probability 0)."""

    name = "simulation"

    def __init__(self, backend: Any, per_class: int = 3, top_logprobs: int = 20) -> None:
        self.per_class, self.top_logprobs = per_class, top_logprobs
        self.client = backend if hasattr(backend, "prompt_logprobs") else None
        if self.client is None and not hasattr(backend, "subject"):
            raise AimriError(
                "the simulation scorer needs token probabilities: an in-process model (`explainer` hf) or an "
                "`endpoint` that returns prompt logprobs"
            )
        if self.client is not None:
            return
        self.subject = backend.subject
        tok = self.subject.tokenizer
        self.digits = [tok.encode(str(d), add_special_tokens=False) for d in range(10)]
        if any(len(d) != 1 for d in self.digits):
            raise AimriError("the simulation scorer needs a tokenizer with single-token digits 0-9")

    def _predict(self, label: str, example: Any) -> list[float]:
        if self.client is not None:
            return self._predict_http(label, example)
        import torch

        tok = self.subject.tokenizer
        messages = [
            {"role": "system", "content": _SIMULATION_TASK},
            {"role": "user", "content": f"The feature: {label}"},
        ]
        ids = chat_ids(tok, messages)
        at = []
        zero = tok.encode("0\n", add_special_tokens=False)
        for token in example.tokens:
            ids += tok.encode(_line(token), add_special_tokens=False)
            at.append(len(ids) - 1)
            ids += zero
        if len(ids) > self.subject.context_length:
            raise AimriError(f"a simulation prompt of {len(ids)} tokens exceeds the model's context")
        with torch.no_grad():
            logits = self.subject.run(torch.tensor([ids]), stop=False)["logits"][0].float().cpu()
        digit_ids = torch.tensor([d[0] for d in self.digits])
        probs = logits[at][:, digit_ids].softmax(-1)
        return (probs @ torch.arange(10.0)).tolist()

    def _predict_http(self, label: str, example: Any) -> list[float]:
        assert self.client is not None
        prompt, at = f"{_SIMULATION_TASK}\nThe feature: {label}\n", []
        for token in example.tokens:
            prompt += _line(token)
            at.append(len(prompt))
            prompt += "0\n"
        logprobs = self.client.prompt_logprobs(prompt, self.top_logprobs)
        predicted = []
        for offset in at:
            top = logprobs.at(offset)
            if top is None:
                raise AimriError("the endpoint's tokenizer merges the predicted digit with the text around it")
            mass = {
                int(t.strip()): math.exp(lp) for t, lp in top.items() if t.strip().isdigit() and len(t.strip()) == 1
            }
            total = sum(mass.values())
            predicted.append(sum(d * p for d, p in mass.items()) / total if total > 0 else 0.0)
        return predicted

    def score(self, label: str, examples: FeatureExamples) -> float:
        chosen = examples.score_active[: self.per_class] + examples.score_inactive[: self.per_class]
        predicted, true = [], []
        top = max((max(ex.acts, default=0.0) for ex in chosen), default=0.0) or 1.0
        for ex in chosen:
            predicted += self._predict(label, ex)
            true += [9 * max(0.0, a) / top for a in ex.acts]
        return _pearson(predicted, true)

    def score_many(self, items: list[tuple[str, FeatureExamples]]) -> list[float | Exception]:
        def one(item: tuple[str, FeatureExamples]) -> float | Exception:
            try:
                return self.score(*item)
            except AimriError as err:
                return err

        if self.client is None:
            return [one(item) for item in items]
        with ThreadPoolExecutor(self.client.concurrency) as pool:  # HTTP: requests in flight together
            return list(pool.map(one, items))
