"""Half precision: a bf16 / fp16 Subject meets fp32 dictionaries, transcoders and steering vectors (and a bf16
dictionary an fp32 Subject). Every stage either works in the subject's dtype, within a tolerance that scales
with that dtype, or refuses with one line that names it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tests.helpers import FIXTURE_TEXT, most_common_word, random_transcoders, tiny_model, token_detector

import aimri
from aimri import Subject
from aimri.data.corpus import Corpus, Packing, pack
from aimri.dictionaries import DictionaryConfig, build
from aimri.errors import AimriError

HALF = [torch.bfloat16, torch.float16]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _half(arch: str, dtype: torch.dtype) -> Subject:
    return Subject(tiny_model(arch).to(dtype), None, name=f"tiny-{arch}", revision=f"tiny-{arch}-{dtype}")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_texts([FIXTURE_TEXT] * 3)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_evaluation_of_an_fp32_dictionary_on_a_half_subject(tiny_lm_dir: str, corpus: Corpus, dtype) -> None:
    """An SAE and a transcoder, fp32, on the model loaded in half precision: reconstruction and downstream
    metrics are finite and match the fp32 model's to a few units of the half dtype's precision."""
    from aimri.dictionaries.evaluate import downstream_metrics, reconstruction_from_pairs, rows_from_windows

    full, half = aimri.load(tiny_lm_dir), aimri.load(tiny_lm_dir, dtype=dtype)
    assert half.dtype == dtype
    torch.manual_seed(0)
    d = full.d_model
    sae = build(DictionaryConfig("relu", d, 4 * d, site="resid.1"))
    transcoder = build(DictionaryConfig("relu", d, 4 * d, d_out=d, site="mlp.in.1", site_out="mlp.out.1"))
    tol = 8 * _eps(dtype)
    for dictionary in (sae, transcoder):
        got = {}
        for subject in (full, half):
            metrics: dict = downstream_metrics(dictionary, subject, corpus, context=32, n_windows=4)
            sites = sorted({dictionary.cfg.site, dictionary.cfg.site_out or dictionary.cfg.site})
            held = list(pack(corpus, subject.tokenizer, Packing.for_tokenizer(subject.tokenizer, 32)))[:4]
            rows = rows_from_windows(subject, held, sites)
            pair = (rows[dictionary.cfg.site], rows[dictionary.cfg.site_out or dictionary.cfg.site])
            metrics.update(reconstruction_from_pairs(dictionary, [pair]) or {})
            got[subject.dtype] = metrics
        ref, out = got[torch.float32], got[dtype]
        for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "fvu", "cosine", "l0"):
            assert math.isfinite(out[key]), key
            assert out[key] == pytest.approx(ref[key], rel=tol, abs=tol), key
        assert out["kl_div"] == pytest.approx(ref["kl_div"], abs=tol)
        assert out["downstream_tokens"] == ref["downstream_tokens"] > 0


def test_an_exact_dictionary_recovers_the_half_model(tiny_lm_dir: str, corpus: Corpus) -> None:
    """codes [relu(x), relu(-x)] reconstruct x exactly: spliced into a bf16 model, the logits barely move
    (the splice is computed in fp32 and rounded back once); a bf16 dictionary evaluates on the fp32 model."""
    from aimri.dictionaries.evaluate import downstream_metrics

    half = aimri.load(tiny_lm_dir, dtype=torch.bfloat16)
    d = half.d_model
    exact = build(DictionaryConfig("relu", d, 2 * d, site="resid.1"))
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
        exact.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    metrics = downstream_metrics(exact, half, corpus, context=32, n_windows=4)
    assert metrics["kl_div"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], rel=_eps(torch.bfloat16))
    on_full = downstream_metrics(exact.to(torch.bfloat16), aimri.load(tiny_lm_dir), corpus, context=32, n_windows=4)
    assert on_full["kl_div"] == pytest.approx(0.0, abs=1e-3)


def test_a_splice_the_half_dtype_cannot_hold_is_refused_by_dtype(tiny_lm_dir: str, corpus: Corpus) -> None:
    from aimri.dictionaries.evaluate import downstream_metrics

    half = aimri.load(tiny_lm_dir, dtype=torch.float16)
    huge = build(DictionaryConfig("relu", half.d_model, 16, site="resid.1"))
    with torch.no_grad():
        huge.b_dec.fill_(1e6)  # finite in fp32, past fp16's 65504
    with pytest.raises(AimriError, match=r"overflows the model's float16 .*float32"):
        downstream_metrics(huge, half, corpus, context=32, n_windows=2)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_norms_freeze_in_half_precision(arch: str, dtype) -> None:
    """RMSNorm (Llama: rounds twice; Gemma: 1 + w, rounds once) and LayerNorm (GPT-2) freeze in bf16 and
    fp16: the replacement model's logits are the half model's, and gradients reach the leaves."""
    from aimri.circuits.replacement import ReplacementModel

    subject = _half(arch, dtype)
    ids = torch.randint(1, 96, (10,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = subject.model(input_ids=ids[None]).logits[0]
    replaced = ReplacementModel(subject, random_transcoders(subject)).run(ids)
    assert replaced.logits.dtype == dtype
    assert torch.equal(replaced.logits.detach(), plain)
    replaced.logits[-1, 5].float().backward()
    grad = replaced.codes[0].grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_a_norm_no_convention_reproduces_is_refused_by_dtype() -> None:
    from aimri.circuits.replacement import _frozen_norm

    class ScaledRMSNorm(torch.nn.Module):  # an RMSNorm times 3: neither w nor 1 + w
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
            self.eps = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return (3 * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight

    norm = ScaledRMSNorm()
    pre, hook = _frozen_norm("model.norm", norm)
    norm.register_forward_pre_hook(pre)
    norm.register_forward_hook(hook)
    with pytest.raises(AimriError, match=r"model\.norm \(ScaledRMSNorm, bfloat16\)") as err:
        norm(torch.randn(2, 8, dtype=torch.bfloat16))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_attribution_on_a_half_subject_adds_up(dtype) -> None:
    """Bias-free Llama, transcoders with b_dec = 0: each logit row's edges (fp32) sum to its demeaned logit,
    to the half dtype's precision (the fp32 test holds it to 1e-4)."""
    from aimri.circuits.attribution import attribute
    from aimri.circuits.replacement import ReplacementModel

    subject = _half("llama", dtype)
    transcoders = random_transcoders(subject, width=24)
    for tc in transcoders.values():
        torch.nn.init.zeros_(tc.b_dec)
    ids = torch.randint(1, 96, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    graph = attribute(ReplacementModel(subject, transcoders), ids, max_feature_nodes=64, progress=False,
                      constant_positions=0)  # fmt: skip
    assert graph.edge_weights.dtype == torch.float32 and bool(torch.isfinite(graph.edge_weights).all())
    with torch.no_grad():
        logits = subject.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    for j, token in enumerate(graph.logit_tokens):
        _, w = graph.row(graph.logit_start + j)
        target = float(logits[token] - logits.mean())
        assert float(w.sum()) == pytest.approx(target, abs=8 * _eps(dtype) * max(1.0, abs(target)))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_steering_a_half_subject_with_fp32_vectors(dtype) -> None:
    from aimri.steering.interventions import DirectionEdit, FeatureEdit, SteeringError, to_edits

    subject = _half("llama", dtype)
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    base = subject.run(ids, stop=False)["logits"]
    vector = torch.randn(subject.d_model, generator=torch.Generator().manual_seed(1))
    sae = build(DictionaryConfig("relu", subject.d_model, 64, site="resid.1"))
    for iv in (DirectionEdit("resid.1", vector, 4.0), DirectionEdit("resid.1", vector, mode="ablate"),
               FeatureEdit(sae, 3, 10.0), FeatureEdit(sae.to(torch.bfloat16), 5, 4.0, "add")):  # fmt: skip
        read = subject.run(ids, read=["resid.1"], edit=to_edits(subject, [iv]), stop=False)
        assert read["logits"].dtype == dtype and bool(torch.isfinite(read["logits"]).all())
        assert float((read["logits"].float() - base.float()).abs().max()) > 0.05, iv.describe()
        if isinstance(iv, DirectionEdit) and iv.mode == "ablate":  # projected out in fp32, rounded once
            x = read["resid.1"].float()
            unit = vector / vector.norm()
            assert float((x @ unit).abs().max()) <= 4 * _eps(dtype) * float(x.norm(dim=-1).max())
    if dtype == torch.float16:  # past fp16's range: refused, naming the dtype
        with pytest.raises(SteeringError, match=r"float16, largest value 65504"):
            subject.run(ids, edit=to_edits(subject, [DirectionEdit("resid.1", vector, 1e6)]), stop=False)


def test_atlas_and_probe_on_a_bf16_subject(tiny_lm_dir: str, tmp_path: Path) -> None:
    """The planted token detector (fp32, and cast to bf16) finds its token on the bf16 model, its peak within
    bf16's precision of the fp32 answer; a probe scores bf16 residuals."""
    from aimri.atlas.build import build_atlas
    from aimri.diagnostics.probes import Probe

    full, half = aimri.load(tiny_lm_dir), aimri.load(tiny_lm_dir, dtype=torch.bfloat16)
    texts = Corpus.from_texts([FIXTURE_TEXT] * 4)
    token, count, _ = most_common_word(full, texts)
    sae, peak = token_detector(full, token)
    for i, dictionary in enumerate((sae, build(sae.cfg).to(torch.bfloat16))):
        if i:
            dictionary.load_state_dict(sae.state_dict())
        atlas = build_atlas(dictionary, half, texts, tmp_path / f"atlas-{i}.sqlite", tokens=2_000, context=16,
                            top_n=3, reservoir=4, negatives=2, progress=False)  # fmt: skip
        card = atlas.card(0)
        assert card["fires"] == count
        assert card["max_act"] == pytest.approx(peak, rel=16 * _eps(torch.bfloat16))
    acts = half.run(torch.tensor([[1, 2, 3, 4]]), read=["resid.1"])["resid.1"][0]
    probe = Probe("t", 1, "diff_of_means", torch.ones(half.d_model) / half.d_model**0.5, 0.5, 1.0, 1.0, 8, 8)
    assert torch.allclose(probe.score(acts), acts.float() @ probe.direction + 0.5)
