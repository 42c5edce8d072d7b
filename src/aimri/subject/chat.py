"""Chat formatting: a conversation as the token ids a Subject reads, ending where the assistant speaks."""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]  # [{"role": "user" | "assistant" | "system", "content": str}, ...]


def chat_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of a chat prompt ending where the assistant speaks: the model's chat template, or plain
    "Role: text" lines for a base model without one.

    Returns a list of token ids (length = prompt tokens, generation prompt included)."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return list(tokenizer(text)["input_ids"])
