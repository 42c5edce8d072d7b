"""Padded batches are exact: a prompt's activations in a padded batch equal those of the prompt run alone.

Every architecture, left and right padding, fp32. The tap derives position ids from the attention mask when
the caller gives none, so absolute-position models (GPT-2) see each row's real tokens at positions 0, 1, ...
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers import ARCHS, tiny_subject

from aimri import Subject

LONG, SHORT = 10, 5  # longer than the tiny Mistral / Gemma sliding window (6), so the window is exercised
ATOL = 1e-5


def _prompts(seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g) for n in (LONG, SHORT)]


def _pad(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, seq] ids (pad id 0) and attention mask (1 = token, 0 = padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols] = p
        mask[i, cols] = 1
    return ids, mask


def _sites(subject: Subject) -> list[str]:
    layers = range(subject.n_layers)
    return [
        "resid.-1",
        *(f"resid.{layer}" for layer in layers),
        *(f"attn.out.{layer}" for layer in layers),
        *(f"mlp.out.{layer}" for layer in layers),
    ]


def _max_error(subject: Subject, side: str) -> dict[str, float]:
    """Per site (and "logits"), the largest |padded - alone| over both prompts' real tokens, divided by
    max(1, the site's largest |value|) so the tolerance holds for sites of any scale."""
    prompts = _prompts()
    ids, mask = _pad(prompts, side)
    sites = _sites(subject)
    with torch.no_grad():
        batch = subject.run(ids, mask, read=sites, stop=False)
        errors = dict.fromkeys([*sites, "logits"], 0.0)
        for row, prompt in enumerate(prompts):
            alone = subject.run(prompt[None], read=sites, stop=False)
            real = mask[row].bool()
            for name in errors:
                diff = (batch[name][row, real] - alone[name][0]).abs().max()
                scale = max(1.0, float(alone[name].abs().max()))
                errors[name] = max(errors[name], float(diff) / scale)
    return errors


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_matches_each_prompt_alone(arch: str, side: str) -> None:
    errors = _max_error(tiny_subject(arch), side)
    bad = {name: e for name, e in errors.items() if not e <= ATOL}
    assert not bad, f"{arch}, {side} padding: activations differ from the unpadded prompt: {bad}"


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_forward_on_left_padded_batch(arch: str) -> None:
    """A cached step through Tap.forward (mask covering past + new tokens) places the new token right."""
    subject = tiny_subject(arch)
    prompts = _prompts()
    ids, mask = _pad(prompts, "left")
    step = torch.tensor([[7], [11]])
    with torch.no_grad(), subject.tap(read=["resid.1"]) as t:
        first = t.forward(input_ids=ids, attention_mask=mask, use_cache=True)
        mask2 = torch.cat([mask, torch.ones_like(step)], dim=1)
        second = t.forward(input_ids=step, attention_mask=mask2, cache=first.cache, use_cache=True)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = subject.run(torch.cat([prompt, step[row]])[None], read=["resid.1"], stop=False)
            torch.testing.assert_close(second.logits[row, -1], alone["logits"][0, -1], atol=ATOL, rtol=0)
            torch.testing.assert_close(t.acts["resid.1"][row, -1], alone["resid.1"][0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpadded_mask_and_given_position_ids_are_plain_hf(arch: str) -> None:
    """An all-ones mask changes nothing (logits bitwise plain HF), and position ids the caller gives are used."""
    subject = tiny_subject(arch)
    ids = torch.stack(_prompts()[0:1] * 2)
    with torch.no_grad():
        plain = subject.model(input_ids=ids).logits
        assert torch.equal(subject.run(ids, torch.ones_like(ids), stop=False)["logits"], plain)
        ids, mask = _pad(_prompts(), "left")
        given = torch.arange(ids.shape[1]).expand_as(ids)  # not what the mask implies for the padded row
        expected = subject.model(input_ids=ids, attention_mask=mask, position_ids=given).logits
        with subject.tap() as t:
            out = t.forward(input_ids=ids, attention_mask=mask, position_ids=given)
    assert torch.equal(out.logits, expected)
