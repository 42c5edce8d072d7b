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

from aimri.errors import AimriError
from aimri.steering.interventions import Intervention, SteeringError, to_edits
from aimri.subject.chat import chat_ids
from aimri.subject.core import Subject


@dataclass
class Generation:
    prompt: str
    text: str  # the completion only
    prompt_ids: list[int]
    completion_ids: list[int]


def prompt_ids(subject: Subject, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
    """Token ids for a prompt: through the chat template when the tokenizer has one (unless chat=False)."""
    tok = subject.tokenizer
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return chat_ids(tok, messages)
    text = f"{system}\n\n{prompt}" if system else prompt
    return list(tok(text)["input_ids"])


def _finite_logits(interventions: Sequence[Intervention]) -> Callable[..., None]:
    """A forward hook that stops generation when an edit has driven the logits to NaN/inf downstream."""

    def hook(module: object, args: object, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is not None and not bool(torch.isfinite(logits[:, -1]).all()):
            what = ", ".join(iv.describe() for iv in interventions) or "no intervention"
            raise SteeringError(f"the logits became NaN/inf under {what}; lower the strength")

    return hook


def _batch(rows: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
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
    batch_size: int = 16,
) -> list[Generation]:
    """Complete each prompt with the interventions applied (greedy at temperature 0, else sampled with
    `seed`, so a steered and an unsteered run draw the same random numbers)."""
    if not prompts:
        raise AimriError("no prompts given")
    tok = subject.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [prompt_ids(subject, p, chat, system) for p in prompts]
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
        ids, mask = _batch(rows, pad_id)
        edits = to_edits(subject, interventions, prompt_len=ids.shape[1])
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
    """(unsteered, steered) completions for each prompt, with the same decoding and seed."""
    plain = generate(subject, prompts, (), **options)  # type: ignore[arg-type]
    steered = generate(subject, prompts, interventions, **options)  # type: ignore[arg-type]
    return list(zip(plain, steered, strict=True))
