"""Taps on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_model, tiny_subject

from aimri import AimriError, Edit, Subject
from aimri.errors import SiteError


def _batch(seed: int = 1, batch: int = 3, seq: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on row 1
    mask[2, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def _every_site(subject: Subject) -> list[str]:
    return [*subject.sites(), "attn.out.1.h0", f"attn.out.2.h{subject.n_heads - 1}"]


def test_unedited_tap_is_bitwise_plain(arch: str) -> None:
    subject = tiny_subject(arch)
    ids, mask = _batch()
    with torch.no_grad():
        plain = subject.model(input_ids=ids, attention_mask=mask).logits
        with subject.tap(read=_every_site(subject), edit={"resid.0": lambda x: x}) as t:
            tapped = subject.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, tapped)
    assert set(t.acts) == set(_every_site(subject))
    assert all(a.shape == (3, 10, subject.site_dim(name)) for name, a in t.acts.items())
    assert t.acts[f"mlp.neurons.{subject.n_layers - 1}"].shape[-1] > subject.d_model  # the MLP hidden width


def test_stop_skips_later_layers_and_unembedding(arch: str) -> None:
    subject = tiny_subject(arch)
    ids, mask = _batch()
    calls: list[str] = []
    hooks = [
        subject.layer(2).register_forward_hook(lambda *a: calls.append("layer2")),
        subject.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("unembed")),
    ]
    stopped = subject.run(ids, mask, read=["resid.1", "mlp.in.1"], stop=True)
    assert calls == [] and "logits" not in stopped
    full = subject.run(ids, mask, read=["resid.1", "mlp.in.1"], stop=False)
    assert calls == ["layer2", "unembed"]
    for h in hooks:
        h.remove()
    assert torch.equal(stopped["resid.1"], full["resid.1"])
    assert torch.equal(stopped["mlp.in.1"], full["mlp.in.1"])


def test_tensor_edit_at_position_is_exact_and_causal(arch: str) -> None:
    subject = tiny_subject(arch)
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    value = torch.linspace(-1, 1, subject.d_model)
    clean = subject.run(ids, read=["resid.0"], stop=False)
    edited = subject.run(ids, read=["resid.0"], edit=[Edit("resid.0", value, positions=[5])], stop=False)
    assert torch.equal(edited["resid.0"][:, 5], value.expand(2, -1))
    keep = [i for i in range(8) if i != 5]
    assert torch.equal(edited["resid.0"][:, keep], clean["resid.0"][:, keep])
    assert torch.equal(edited["logits"][:, :5], clean["logits"][:, :5])  # causal: earlier positions untouched
    assert not torch.allclose(edited["logits"][:, 5:], clean["logits"][:, 5:])


def test_function_edit_skips_padding(arch: str) -> None:
    subject = tiny_subject(arch)
    ids, mask = _batch()
    clean = subject.run(ids, mask, read=["mlp.out.1"])
    edited = subject.run(ids, mask, read=["mlp.out.1"], edit={"mlp.out.1": lambda x: x + 10.0})
    pad = mask == 0
    assert torch.equal(edited["mlp.out.1"][pad], clean["mlp.out.1"][pad])
    assert torch.allclose(edited["mlp.out.1"][~pad], clean["mlp.out.1"][~pad] + 10.0)


def test_edit_only_touches_chosen_rows() -> None:
    subject = tiny_subject("llama")
    ids, mask = _batch()
    rows = torch.zeros(3, 10, dtype=torch.bool)
    rows[0] = True
    clean = subject.run(ids, mask, stop=False)
    edited = subject.run(ids, mask, edit=[Edit("resid.1", lambda x: 3 * x, positions=rows)], stop=False)
    assert torch.equal(edited["logits"][1:], clean["logits"][1:])
    assert not torch.allclose(edited["logits"][0], clean["logits"][0])


def test_generate_with_tap(arch: str) -> None:
    subject = tiny_subject(arch)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = subject.model.generate(ids, **kwargs)
    with subject.tap(read=["resid.1"]) as t:
        tapped = subject.model.generate(ids, **kwargs)
    assert torch.equal(plain, tapped)
    assert t.acts["resid.1"].shape == (2, 5 + 6 - 1, subject.d_model)
    # an edit at generated positions only changes the continuation, not the prompt's last logits
    with subject.tap(edit=[Edit("resid.1", lambda x: x * 0, positions=slice(5, None))]):
        steered = subject.model.generate(ids, **kwargs)
    assert torch.equal(steered[:, :6], plain[:, :6])  # first new token is predicted from prompt positions


def test_gradients_when_asked() -> None:
    subject = tiny_subject("llama")
    ids, mask = _batch()
    acts = subject.run(ids, mask, read=["resid.1"], grad=True)
    acts["resid.1"].pow(2).sum().backward()
    assert subject.layer(0).mlp.down_proj.weight.grad is not None
    assert not subject.run(ids, mask, read=["resid.1"])["resid.1"].requires_grad


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_heads_sum_to_attention_output(arch: str) -> None:
    subject = tiny_subject(arch)
    ids, mask = _batch()
    heads = [f"attn.out.1.h{h}" for h in range(subject.n_heads)]
    acts = subject.run(ids, mask, read=["attn.out.1", *heads])
    o_proj = subject.layer(1).get_submodule(subject.adapter.o_proj)
    bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0
    total = sum(acts[h] for h in heads) + bias
    assert torch.allclose(total, acts["attn.out.1"], atol=1e-5)


def test_head_edit_ablates_one_head() -> None:
    subject = tiny_subject("llama")
    ids, mask = _batch()
    clean = subject.run(ids, mask, read=["attn.out.1", "attn.out.1.h2"])
    ablated = subject.run(ids, mask, read=["attn.out.1"], edit={"attn.out.1.h2": lambda x: x * 0})
    assert torch.allclose(ablated["attn.out.1"], clean["attn.out.1"] - clean["attn.out.1.h2"], atol=1e-5)


def test_bad_sites_get_clear_errors() -> None:
    subject = tiny_subject("llama")
    with pytest.raises(SiteError, match=r"Did you mean .*resid\.1"):
        subject.site("resdi.1")
    with pytest.raises(SiteError, match="out of range; this model has layers 0..2"):
        subject.site("mlp.out.7")
    with pytest.raises(SiteError, match="head 9 is out of range"):
        subject.site("attn.out.0.h9")
    with pytest.raises(SiteError, match="unknown site"):
        subject.run(torch.zeros(1, 3, dtype=torch.long), read=["embed"])


def test_unknown_architecture_lists_supported() -> None:
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(AimriError, match="supported are .*llama.*register_adapter"):
        Subject(model)


def test_input_longer_than_context_is_refused() -> None:
    subject = tiny_subject("llama")
    with pytest.raises(AimriError, match="input of 129 tokens exceeds tiny-llama's context of 128; split it"):
        subject.run(torch.zeros(1, 129, dtype=torch.long))
