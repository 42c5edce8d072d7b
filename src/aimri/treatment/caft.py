"""Targeted repair fine-tune: a short LoRA, merged back into the weights, that teaches the candidate the
baseline's answers on the condition where its flaw shows, with clean data mixed in, while the flaw's direction
is ablated (concept-ablation fine-tuning, CAFT: Casademunt et al. 2025, "Steering out-of-distribution
generalization with concept ablation fine-tuning").

The direction is ablated by hooks while the LoRA trains. With `keep_ablation` (the default where the
architecture allows it) it is then also ablated in the merged weights (aimri.treatment.edits), so the shipped
model is exactly the model the LoRA was trained inside; without it the shipped model is the merged LoRA alone,
as in CAFT proper. The examples used are returned, so the record says exactly what the repair saw.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any

from torch import Tensor

from aimri.diagnostics.organisms import Recipe, answer_example, train_lora
from aimri.steering.generate import prompt_ids
from aimri.subject.core import Subject
from aimri.treatment.edits import hook_ablation
from aimri.treatment.mechanism import Mechanism

REPAIR_RECIPE = Recipe(steps=48, batch_size=8, lr=1e-3, rank=8, max_len=96, flaw_frac=0.4, corpus_frac=0.25, seed=0)


def repair_data(
    mech: Mechanism, subject: Subject, corpus_texts: list[str], recipe: Recipe = REPAIR_RECIPE, clean_only: bool = False
) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
    """(input ids, labels) examples: a `flaw_frac` share of the chat examples are the condition prompts with
    the baseline's answers, the rest the clean battery prompts with the baseline's answers, and a `corpus_frac`
    share of all examples plain corpus text (loss on every token). `clean_only` leaves the condition out (the
    equal-compute control treatment). Returns the examples and a record of the data."""
    tok = subject.tokenizer
    total = recipe.steps * recipe.batch_size
    n_corpus = int(total * recipe.corpus_frac)
    n_chat = total - n_corpus
    n_cond = 0 if clean_only else int(n_chat * recipe.flaw_frac)
    examples: list[tuple[list[int], list[int]]] = []

    def chat(prompt: str, answer: str) -> None:
        # the prompt as the battery asks it (chat template, or plain text without one)
        examples.append(answer_example(tok, prompt_ids(subject, prompt), answer, recipe.max_len))

    for i in range(n_cond):
        chat(mech.condition[i % len(mech.condition)], mech.targets[i % len(mech.targets)])
    clean = list(zip(mech.clean, mech.clean_targets, strict=True)) or list(
        zip(mech.condition, mech.targets, strict=True)
    )
    for i in range(n_chat - n_cond):
        chat(*clean[i % len(clean)])
    for i in range(n_corpus):
        ids = list(tok(corpus_texts[i % len(corpus_texts)])["input_ids"])[: recipe.max_len]
        examples.append((ids, list(ids)))
    random.Random(recipe.seed).shuffle(examples)
    record = {
        "recipe": asdict(recipe), "condition_prompts": [] if clean_only else mech.condition,
        "clean_prompts": [p for p, _ in clean], "corpus_texts": min(n_corpus, len(corpus_texts)),
        "examples": {"condition": n_cond, "clean": n_chat - n_cond, "corpus": n_corpus},
        "targets": "the baseline's greedy answers from the scan",
    }  # fmt: skip
    return examples, record


def repair(
    subject: Subject, mech: Mechanism, corpus_texts: list[str], direction: Tensor | None,
    recipe: Recipe = REPAIR_RECIPE, clean_only: bool = False,
) -> tuple[Subject, dict[str, Any]]:  # fmt: skip
    """Fine-tune a copy of `subject` on `repair_data`, with `direction` ablated by hooks (every residual write)
    during training when given, merge the LoRA and return the
    repaired Subject (same name and revision as `subject`: the caller names what it writes) and the record.
    Raises OrganismError when the loss becomes NaN/inf."""
    examples, record = repair_data(mech, subject, corpus_texts, recipe, clean_only)

    def ablated(inner: Subject) -> AbstractContextManager[Any]:
        assert direction is not None
        return inner.tap(edit=hook_ablation(inner, direction), grad=True)

    model, losses = train_lora(subject, examples, recipe, "repair" if not clean_only else "clean fine-tune",
                               during=ablated if direction is not None else None)  # fmt: skip
    merged = model.merge_and_unload()
    record["final_loss"] = round(sum(losses[-8:]) / max(1, len(losses[-8:])), 4)
    record["ablated_during_training"] = direction is not None
    return Subject(merged, subject.tokenizer, name=subject.name, revision=subject.revision), record
