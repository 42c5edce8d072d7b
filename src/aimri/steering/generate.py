"""Steered generation: Hugging Face `generate` inside a tap that applies interventions.

Prompts are left-padded into one batch, so every row's prompt ends at the same position: "prompt" and
"generated" positions are the same slice for every row, and padding is never edited.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from aimri.dictionaries.match import open_ids
from aimri.dictionaries.match import opening as opening_of
from aimri.errors import AimriError
from aimri.steering.interventions import FeatureEdit, Intervention, SteeringError, to_edits
from aimri.subject.chat import chat_ids
from aimri.subject.core import Subject


@dataclass
class Generation:
    prompt: str
    text: str  # the completion only
    prompt_ids: list[int]
    completion_ids: list[int]


def prompt_ids(
    subject: Subject, prompt: str, chat: bool | None = None, system: str | None = None, opening: Sequence[int] = ()
) -> list[int]:
    """Token ids for a prompt: through the chat template when the tokenizer has one (unless chat=False),
    opened with `opening` unless they already start with it (`dictionary_opening`)."""
    tok = subject.tokenizer
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return open_ids(chat_ids(tok, messages), opening)
    text = f"{system}\n\n{prompt}" if system else prompt
    return open_ids(tok(text)["input_ids"], opening)


def shared_ends(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(length of the common prefix, length of the common suffix) of two token rows."""
    head = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    tail = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1], strict=False)) if x != y), 0)
    return head, tail


def template_span(subject: Subject) -> tuple[int, int]:
    """(opening, closing): how many tokens the chat template puts before the user's words (its default system
    prompt, the role header) and after them (the end of turn, the assistant header), from two one-word chats
    built as prompt_ids builds them."""
    return shared_ends(prompt_ids(subject, "apple"), prompt_ids(subject, "zebra"))


def dictionary_opening(subject: Subject, interventions: Sequence[Intervention]) -> list[int]:
    """The tokens a prompt opens with for the dictionaries these interventions read (their recorded BOS: the
    activations they see must start as their training windows did); [] for direction edits only."""
    dictionaries = list(
        {id(iv.dictionary): iv.dictionary for iv in interventions if isinstance(iv, FeatureEdit)}.values()
    )
    return opening_of(dictionaries, subject.tokenizer) if dictionaries else []


def _finite_logits(interventions: Sequence[Intervention]) -> Callable[..., None]:
    """A forward hook that stops generation when an edit has driven the logits to NaN/inf downstream."""

    def hook(module: object, args: object, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is not None and not bool(torch.isfinite(logits[:, -1]).all()):
            what = ", ".join(iv.describe() for iv in interventions) or "no intervention"
            raise SteeringError(f"the logits became NaN/inf under {what}; lower the strength")

    return hook


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input ids [n, width], attention mask [n, width]) of token rows padded on the left, so every row's last
    position is its last token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def generate(
    subject: Subject,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool | None = None,
    system: str | None = None,
    batch_size: int = 32,
    opening: Sequence[int] | None = None,
    allow_other_model: bool = False,
    prefill: str = "",
) -> list[Generation]:
    """Complete each prompt with the interventions applied (greedy at temperature 0, else sampled with
    `seed`, so a steered and an unsteered run draw the same random numbers). `prefill` opens the answer (the
    tokens after the chat template's assistant header); a Generation's text is what follows it.

    Prompts open with `opening` (default: `dictionary_opening(subject, interventions)`, the BOS the features'
    dictionaries were trained with; pass the same to an unsteered run you compare with, as `compare` does).
    Raises AimriError for no prompts or a prompt too long, SteeringError for an intervention that does not fit
    the subject (a dictionary trained on another model: `allow_other_model` for a deliberate transfer)."""
    if not prompts:
        raise AimriError("no prompts given")
    tok = subject.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if opening is None:
        opening = dictionary_opening(subject, interventions)
    opened = tok(prefill, add_special_tokens=False)["input_ids"] if prefill else []
    encoded = [prompt_ids(subject, p, chat, system, opening) + opened for p in prompts]
    for p, ids in zip(prompts, encoded, strict=True):
        if len(ids) + max_new_tokens > subject.context_length:
            raise AimriError(
                f"a prompt of {len(ids)} tokens plus {max_new_tokens} new ones exceeds {subject.name}'s context of "
                f"{subject.context_length}: shorten it ({p[:40]!r}...) or lower `max_new_tokens`"
            )
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        rows = encoded[start : start + batch_size]
        ids, mask = left_pad(rows, pad_id)
        edits = to_edits(subject, interventions, prompt_len=ids.shape[1], allow_other_model=allow_other_model)
        torch.manual_seed(seed + start)
        guard = subject.model.register_forward_hook(_finite_logits(interventions))
        try:
            with torch.no_grad(), subject.tap(edit=edits):
                result = subject.model.generate(  # type: ignore[operator]
                    input_ids=ids.to(subject.device), attention_mask=mask.to(subject.device),
                    max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tok.eos_token_id, **sampling,
                )  # fmt: skip
        finally:
            guard.remove()
        for i, row in enumerate(rows):
            new = result[i, ids.shape[1] :].tolist()
            if tok.eos_token_id is not None and tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            while new and new[-1] == pad_id:
                new.pop()
            text = tok.decode(new, skip_special_tokens=True)
            out.append(Generation(prompts[start + i], text, row, new))
    return out


def compare(
    subject: Subject, prompts: Sequence[str], interventions: Sequence[Intervention], **options: object
) -> list[tuple[Generation, Generation]]:
    """(unsteered, steered) completions for each prompt, with the same decoding, seed and prompt tokens (opened
    for the interventions' dictionaries in both runs)."""
    options = {"opening": dictionary_opening(subject, interventions), **options}
    steered = generate(subject, prompts, interventions, **options)  # type: ignore[arg-type]  (checked first)
    plain = generate(subject, prompts, (), **options)  # type: ignore[arg-type]
    return list(zip(plain, steered, strict=True))
