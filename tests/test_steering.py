"""Steering known answers on a tiny Llama: no-op taps reproduce plain generation, a clamp equals its
closed form, an ablated feature re-encodes to zero, and padded batches are edited only where asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aimri
from aimri.atlas.db import Atlas
from aimri.dictionaries.base import DictionaryConfig, build
from aimri.errors import AimriError, SiteError
from aimri.steering.generate import compare, generate
from aimri.steering.interventions import DirectionEdit, FeatureEdit, SteeringError, ablate, to_edits

PROMPTS = ["The lighthouse keeper", "Ships passing the rocky coast relied on the beam to find"]


@pytest.fixture(scope="module")
def subject(tiny_lm_dir: str) -> aimri.Subject:
    return aimri.load(tiny_lm_dir)


def tied_sae(d: int, width: int, site: str, seed: int = 0, architecture: str = "relu", k: int | None = None):
    """An SAE whose decoder rows are orthonormal and whose encoder is their transpose: codes are exact
    projections, so an ablated feature re-encodes to exactly zero."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, width, generator=g))
    sae = build(
        DictionaryConfig(architecture=architecture, d_in=d, d_sae=width, site=site, apply_b_dec_to_input=False, k=k)
    )
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _ids(subject: aimri.Subject, text: str) -> torch.Tensor:
    return torch.tensor([subject.tokenizer(text)["input_ids"]])


def test_no_edit_reproduces_plain_generation(subject: aimri.Subject) -> None:
    tok = subject.tokenizer
    ids = _ids(subject, PROMPTS[1])
    plain = subject.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ours = generate(subject, [PROMPTS[1]], max_new_tokens=12, chat=False)[0]
    assert ours.prompt_ids + ours.completion_ids == plain[0].tolist()[: len(ours.prompt_ids) + len(ours.completion_ids)]
    noop = generate(subject, [PROMPTS[1]], [DirectionEdit("resid.1", torch.ones(32), strength=0.0)], max_new_tokens=12, chat=False)[0]  # fmt: skip
    assert noop.completion_ids == ours.completion_ids


def test_clamp_keeps_the_error_term(subject: aimri.Subject) -> None:
    sae = tied_sae(32, 16, "resid.1", architecture="topk", k=4)
    ids = _ids(subject, PROMPTS[1])
    x = subject.run(ids, read=["resid.1"])["resid.1"]
    a = sae.encode(x)[..., 3]
    edits = to_edits(subject, [FeatureEdit(sae, 3, 5.0)])
    edited = subject.run(ids, read=["resid.1"], edit=edits)["resid.1"]
    expected = x + (5.0 - a)[..., None] * sae.W_dec[3]
    assert torch.allclose(edited, expected, atol=1e-5)
    added = subject.run(ids, read=["resid.1"], edit=to_edits(subject, [FeatureEdit(sae, 3, 2.0, "add")]))["resid.1"]
    assert torch.allclose(added, x + 2.0 * sae.W_dec[3], atol=1e-5)


def test_ablated_feature_re_encodes_to_zero(subject: aimri.Subject) -> None:
    sae = tied_sae(32, 16, "resid.1")
    ids = _ids(subject, PROMPTS[1])
    x = subject.run(ids, read=["resid.1"])["resid.1"]
    busiest = int(sae.encode(x).sum((0, 1)).argmax())
    assert float(sae.encode(x)[..., busiest].max().detach()) > 0.1
    edited = subject.run(ids, read=["resid.1"], edit=to_edits(subject, [ablate(sae, busiest)]))["resid.1"]
    assert float(sae.encode(edited)[..., busiest].abs().max()) < 1e-5
    others = [f for f in range(16) if f != busiest]
    assert torch.allclose(sae.encode(edited)[..., others], sae.encode(x)[..., others], atol=1e-5)


def test_transcoder_feature_edits_the_mlp_output(subject: aimri.Subject) -> None:
    tc = build(DictionaryConfig(architecture="relu", d_in=32, d_sae=24, site="mlp.in.1", site_out="mlp.out.1"))
    ids = _ids(subject, PROMPTS[0])
    acts = subject.run(ids, read=["mlp.in.1", "mlp.out.1"])
    a = tc.encode(acts["mlp.in.1"])[..., 5]
    edited = subject.run(ids, read=["mlp.out.1"], edit=to_edits(subject, [FeatureEdit(tc, 5, 3.0)]))["mlp.out.1"]
    assert torch.allclose(edited, acts["mlp.out.1"] + (3.0 - a)[..., None] * tc.W_dec[5], atol=1e-5)


def test_padded_batches_are_edited_only_where_asked(subject: aimri.Subject) -> None:
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    for where in ("prompt", "generated", "all"):
        edit = [DirectionEdit("resid.1", v, strength=3.0, where=where)]
        batched = generate(subject, PROMPTS, edit, max_new_tokens=8, chat=False)
        alone = [generate(subject, [p], edit, max_new_tokens=8, chat=False)[0] for p in PROMPTS]
        assert [g.completion_ids for g in batched] == [g.completion_ids for g in alone], where
    plain = generate(subject, PROMPTS, max_new_tokens=8, chat=False)
    gen_only = generate(subject, PROMPTS, [DirectionEdit("resid.1", v, strength=3.0, where="generated")], max_new_tokens=8, chat=False)  # fmt: skip
    # the first new token is predicted from the prompt alone, which "generated" leaves untouched
    assert [g.completion_ids[0] for g in gen_only] == [g.completion_ids[0] for g in plain]
    # a padded forward: rows differ only at the named real positions
    tok = subject.tokenizer
    short, long = (tok(p)["input_ids"] for p in PROMPTS)
    ids = torch.full((2, len(long)), tok.pad_token_id)
    mask = torch.zeros(2, len(long), dtype=torch.long)
    ids[0, -len(short) :], mask[0, -len(short) :] = torch.tensor(short), 1
    ids[1], mask[1] = torch.tensor(long), 1
    edits = to_edits(subject, [DirectionEdit("resid.0", v, where=[1, len(long) - 1])])
    before = subject.run(ids, mask, read=["resid.0"])["resid.0"]
    after = subject.run(ids, mask, read=["resid.0"], edit=edits)["resid.0"]
    changed = (after - before).abs().amax(-1) > 0
    expected = torch.zeros_like(changed)
    expected[:, [1, len(long) - 1]] = True
    expected &= mask.bool()
    assert torch.equal(changed, expected)


def test_projection_removes_the_component(subject: aimri.Subject) -> None:
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    ids = _ids(subject, PROMPTS[1])
    out = subject.run(ids, read=["resid.2"], edit=to_edits(subject, [DirectionEdit("resid.2", v, mode="ablate")]))
    assert float((out["resid.2"] @ (v / v.norm())).abs().max()) < 1e-4


def test_bad_interventions_say_what_is_wrong(subject: aimri.Subject) -> None:
    sae = tied_sae(32, 16, "resid.1")
    with pytest.raises(SteeringError, match="outside the dictionary"):
        to_edits(subject, [FeatureEdit(sae, 16, 1.0)])
    with pytest.raises(SteeringError, match="given twice"):
        to_edits(subject, [FeatureEdit(sae, 2, 4.0), ablate(sae, 2)])
    with pytest.raises(SiteError, match="unknown site|resid"):
        to_edits(subject, [FeatureEdit(tied_sae(32, 16, "resid.9"), 0, 1.0)])
    with pytest.raises(SteeringError, match="belongs to another model"):
        to_edits(subject, [FeatureEdit(tied_sae(64, 16, "resid.1"), 0, 1.0)])
    with pytest.raises(SteeringError, match="cannot edit resid.1"):
        to_edits(subject, [DirectionEdit("resid.1", torch.ones(5))])
    with pytest.raises(SteeringError, match="NaN/inf activations at resid.1"):
        generate(
            subject, PROMPTS, [DirectionEdit("resid.1", torch.full((32,), 1e20), 1e20)], max_new_tokens=2, chat=False
        )
    with pytest.raises(AimriError, match="exceeds .* context"):
        generate(subject, ["keeper " * 200], max_new_tokens=4, chat=False)
    with pytest.raises(SteeringError, match="NaN/inf"):
        to_edits(subject, [FeatureEdit(sae, 1, float("nan"))])


def test_compare_pairs_plain_and_steered(subject: aimri.Subject) -> None:
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    pairs = compare(subject, PROMPTS, [DirectionEdit("resid.1", v, strength=20.0)], max_new_tokens=6, chat=False)
    assert len(pairs) == 2 and all(p.prompt == s.prompt for p, s in pairs)
    assert any(p.completion_ids != s.completion_ids for p, s in pairs)
    sampled = compare(subject, PROMPTS, [], max_new_tokens=6, chat=False, temperature=1.0, seed=5)
    assert all(p.completion_ids == s.completion_ids for p, s in sampled)  # same seed, no edit: same draw


def _mri(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aimri.cli", *args], capture_output=True, text=True)


def test_cli_steer_side_by_side_and_sweep(tiny_lm_dir: str, tmp_path: Path) -> None:
    from tests.helpers import FIXTURE_TEXT

    from aimri.atlas.build import build_atlas
    from aimri.data.corpus import Corpus
    from aimri.dictionaries.formats import save_dictionary

    subject = aimri.load(tiny_lm_dir)
    sae = tied_sae(32, 16, "resid.1")
    save_dictionary(sae, tmp_path / "sae")
    spec = f"resid.1/{tmp_path / 'sae'}#3"
    done = _mri("steer", tiny_lm_dir, *PROMPTS, "--feature", f"{spec}=+6", "--raw", "--max-new-tokens", "5", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["prompt"] for r in rows] == PROMPTS and all({"unsteered", "steered"} <= set(r) for r in rows)
    no_atlas = _mri("steer", tiny_lm_dir, "Hi", "--feature", f"{spec}=x8", "--raw")
    assert no_atlas.returncode == 2 and "mri atlas" in no_atlas.stderr
    assert (
        "outside the dictionary"
        in _mri("steer", tiny_lm_dir, "Hi", "--feature", spec.replace("#3", "#99") + "=1").stderr
    )
    assert (
        "trained on resid.1"
        in _mri("steer", tiny_lm_dir, "Hi", "--feature", spec.replace("resid.1/", "resid.2/") + "=1").stderr
    )
    assert "nothing to steer" in _mri("steer", tiny_lm_dir, "Hi").stderr

    build_atlas(sae, subject, Corpus.from_texts([FIXTURE_TEXT] * 12), tmp_path / "sae" / "atlas.sqlite", tokens=3_000,
                context=16, top_n=5, reservoir=8, negatives=3, progress=False)  # fmt: skip
    live = Atlas(tmp_path / "sae" / "atlas.sqlite").live_features()[0]
    swept = _mri("steer", tiny_lm_dir, *PROMPTS, "--feature", f"resid.1/{tmp_path / 'sae'}#{live}=x1", "--raw",
                 "--sweep", "1,4", "--concept", "lighthouses", "--max-new-tokens", "6", "--out", str(tmp_path / "sw"),
                 "--quiet")  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    result = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    methods = [p["method"] for p in result["points"]]
    assert methods.count("feature clamp") == 2 and methods.count("diff-of-means") == 5 and "prompting" in methods
    assert all(p["perplexity"] > 1 and 0 <= p["presence"] <= 1 for p in result["points"])
    assert result["points"][0]["method"] == "unsteered" and set(result["best"]) <= set(methods)
    assert (tmp_path / "sw" / "curve.svg").read_text().startswith("<svg")


def test_direction_specs_and_files(subject: aimri.Subject, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.torch import save_file

    from aimri.steering.specs import parse_direction, parse_feature

    v = torch.randn(32)
    np.save(tmp_path / "v.npy", v.numpy())
    save_file({"direction": v, "other": 2 * v}, str(tmp_path / "v.safetensors"))
    add = parse_direction(f"resid.1={tmp_path / 'v.npy'}@2.5")
    assert add.mode == "add" and add.strength == 2.5 and torch.equal(add.vector, v)
    assert parse_direction(f"resid.1={tmp_path / 'v.safetensors'}@ablate").mode == "ablate"
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
    with pytest.raises(AimriError, match="not a readable vector"):
        parse_direction(f"resid.1={tmp_path / 'bad.npy'}@1")
    with pytest.raises(AimriError, match="does not exist"):
        parse_direction("resid.1=/nowhere.npy@1")
    with pytest.raises(SteeringError, match="must be a number"):
        parse_direction(f"resid.1={tmp_path / 'v.npy'}@lots")
    with pytest.raises(SteeringError, match="SITE/DICTIONARY#ID=VALUE"):
        parse_feature("resid.1/sae=3")
    edit = parse_direction(f"resid.1={tmp_path / 'v.npy'}@ablate", where="generated")
    out = generate(subject, PROMPTS, [edit], max_new_tokens=3, chat=False)
    assert len(out) == 2


def test_judge_counts_on_topic_answers() -> None:
    from aimri.steering.tradeoff import judge_on_topic

    class Judge:
        """A ChatBackend answering from the text itself: yes when the concept's word is in it."""

        name = "rule"

        def complete_many(self, prompts, max_tokens=64, parse=None):  # type: ignore[no-untyped-def]
            out = []
            for messages in prompts:
                reply = "Yes." if "Paris" in messages[0]["content"].split("\n\n", 1)[1] else "no"
                out.append(parse(reply) if parse else reply)
            return out

    assert judge_on_topic(Judge(), "Paris", ["I love Paris.", "Bread.", "Paris again", "Nothing"]) == 0.5
