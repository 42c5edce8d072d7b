"""Atlas: streaming statistics with a planted known answer, the database, cards, export, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import FIXTURE_TEXT, most_common_word, token_detector

import aimri
from aimri.atlas.build import build_atlas
from aimri.atlas.db import Atlas
from aimri.data.corpus import Corpus
from aimri.dictionaries import DictionaryConfig, build, save_dictionary
from aimri.errors import AimriError


@pytest.fixture(scope="module")
def planted(tiny_lm_dir: str, tmp_path_factory: pytest.TempPathFactory):
    subject = aimri.load(tiny_lm_dir)
    corpus = Corpus.from_texts([FIXTURE_TEXT] * 12)
    token, count, windows = most_common_word(subject, corpus)
    sae, expected_peak = token_detector(subject, token)
    path = tmp_path_factory.mktemp("atlas") / "atlas.sqlite"
    atlas = build_atlas(sae, subject, corpus, path, tokens=10_000, context=16, top_n=5, reservoir=8,
                        negatives=3, progress=False)  # fmt: skip
    valid_tokens = sum(int(w.valid.sum()) for w in windows)
    return atlas, token, count, valid_tokens, expected_peak, subject, sae


def test_planted_token_detector_is_found(planted) -> None:
    atlas, token, count, valid_tokens, expected_peak, subject, _ = planted
    card = atlas.card(0)
    assert card["fires"] == count and card["density"] == pytest.approx(count / valid_tokens)
    assert card["max_act"] == pytest.approx(expected_peak, rel=1e-4)
    word = subject.tokenizer.decode([token])
    assert len(card["top_examples"]) == 5
    for ex in card["top_examples"]:  # every top example peaks on the planted token, at the known value
        at = int(np.argmax(ex["acts"]))
        assert ex["tokens"][at] == word
        assert ex["peak"] == pytest.approx(expected_peak, rel=1e-2)
        assert all((a > 0) == (t == word) for a, t in zip(ex["acts"], ex["tokens"], strict=True) if t != "<s>")
    for ex in atlas.examples(0, "negative"):
        assert max(ex["acts"]) < 0.05 * expected_peak and word not in ex["tokens"][1:]
    samples = atlas.examples(0, "sample")
    assert 0 < len(samples) <= 8 and sorted(s["quantile"] for s in samples) == [s["quantile"] for s in samples]
    dead = atlas.card(3)
    assert dead["fires"] == 0 and dead["top_examples"] == [] and dead["quantiles"] is None
    assert atlas.search([word.upper()])[0] == (0, 1.0)  # found by the token it peaks on


def test_logit_effects_and_neighbours_are_exact(planted) -> None:
    atlas, *_, subject, sae = planted
    card = atlas.card(2)
    with torch.no_grad():
        logits = sae.W_dec[2] @ subject.model.get_output_embeddings().weight.T
    assert card["logits_top"][0][1] == pytest.approx(float(logits.max()), abs=1e-4)
    assert card["logits_bottom"][0][1] == pytest.approx(float(logits.min()), abs=1e-4)
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    cos = W[2] @ W.T
    cos[2] = -2
    assert card["neighbours"][0] == [int(cos.argmax()), pytest.approx(float(cos.max()), abs=1e-4)]


def test_export_and_cli_card(planted, tmp_path: Path) -> None:
    atlas, *_ = planted
    out = atlas.export_jsonl(tmp_path / "features.jsonl")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == atlas.n_features and records[0]["index"] == 0
    assert records[0]["frac_nonzero"] > 0 and records[0]["activations"][0]["maxValue"] > 0
    cmd = [sys.executable, "-m", "aimri.cli", "feature", str(atlas.path)]
    card = subprocess.run([*cmd, "0", "--json"], capture_output=True, text=True)
    assert card.returncode == 0 and json.loads(card.stdout)["id"] == 0
    shown = subprocess.run([*cmd, "0"], capture_output=True, text=True)
    assert shown.returncode == 0 and "density" in shown.stdout
    bad = subprocess.run([*cmd, "99"], capture_output=True, text=True)
    assert bad.returncode == 2 and "out of range" in bad.stderr and "0..15" in bad.stderr


def test_bad_atlas_files(tmp_path: Path) -> None:
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all")
    with pytest.raises(AimriError, match="not an atlas"):
        Atlas(tmp_path / "junk.sqlite")
    with pytest.raises(AimriError, match="build one with"):
        Atlas(tmp_path / "missing.sqlite")
    unfinished = Atlas.create(tmp_path / "half.sqlite")
    unfinished.set_meta(d_sae=4)
    unfinished.commit()
    with pytest.raises(AimriError, match="unfinished"):
        Atlas(tmp_path / "half.sqlite")


def test_cli_atlas_on_a_saved_dictionary(tiny_lm_dir: str, tmp_path: Path) -> None:
    subject = aimri.load(tiny_lm_dir)
    sae = build(DictionaryConfig("topk", subject.d_model, 32, k=4, site="resid.1", model_name=tiny_lm_dir))
    save_dictionary(sae, tmp_path / "sae")
    corpus = tmp_path / "c.txt"
    corpus.write_text(FIXTURE_TEXT * 8)
    cmd = [sys.executable, "-m", "aimri.cli", "atlas", str(tmp_path / "sae"), "--corpus", str(corpus),
           "--tokens", "2000", "--context", "16", "--quiet", "--jsonl", str(tmp_path / "f.jsonl")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    atlas = Atlas(tmp_path / "sae" / "atlas.sqlite")
    assert atlas.meta["site"] == "resid.1" and atlas.meta["tokens"] > 0
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 32
    card = [sys.executable, "-m", "aimri.cli", "feature", str(tmp_path / "sae" / "atlas.sqlite"), "1", "--json"]
    assert subprocess.run([*card, "--dictionary", str(tmp_path / "sae")], capture_output=True).returncode == 0
    other = build(DictionaryConfig("topk", subject.d_model, 32, k=4, site="resid.1"))
    save_dictionary(other, tmp_path / "other")
    wrong = subprocess.run([*card, "--dictionary", str(tmp_path / "other")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "another dictionary" in wrong.stderr


def test_statistical_label_names_the_planted_token_and_scores_above_control(planted, tmp_path: Path) -> None:
    import shutil

    from aimri.autointerp.examples import split_examples
    from aimri.autointerp.explainers import StatisticalExplainer
    from aimri.autointerp.label import label_features
    from aimri.autointerp.scorers import auroc

    atlas, token, *_, subject, _ = planted
    copy = tmp_path / "atlas.sqlite"
    shutil.copy(atlas.path, copy)
    mine = Atlas(copy)
    word = subject.tokenizer.decode([token]).strip()
    split = split_examples(mine, 0)
    assert split.score_active and split.score_inactive
    assert not {ex.window for ex in split.explain} & {ex.window for ex in split.score_active}
    assert f'"{word}"' in StatisticalExplainer().explain(split.explain)

    class Exact:  # a scorer with a known answer: 1 for the planted feature's label, by construction
        name = "exact"

        def score(self, label: str, examples) -> float:  # type: ignore[no-untyped-def]
            hits = [float(f'"{word}"' in label and word in ex.text()) for ex in examples.score_active]
            misses = [float(f'"{word}"' in label and word in ex.text()[1:]) for ex in examples.score_inactive]
            return auroc(hits, misses)

        def score_many(self, items):  # type: ignore[no-untyped-def]
            return [self.score(label, examples) for label, examples in items]

    assert f'"{word}"' in StatisticalExplainer().explain(split.explain)
    summary = label_features(mine, [0], StatisticalExplainer(), [Exact()], progress=False)
    assert summary["labelled"] == 1 and summary["mean_exact"] == 1.0
    again = label_features(mine, [0], StatisticalExplainer(), [Exact()], progress=False)
    assert again["labelled"] == 0 and again["skipped"] == 1  # resumed: nothing relabelled
    assert mine.card(0)["labels"][0]["scores"]["exact"] == 1.0


def test_auroc_known_values() -> None:
    from aimri.autointerp.scorers import auroc

    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1], [2]) == 0.0 and auroc([1, 2], [1, 2]) == 0.5


def test_neuron_dictionary_is_exact_and_atlas_ready(tiny_lm_dir: str) -> None:
    """The identity dictionary over mlp.neurons.L: its codes are the neurons (positive part) and its decoder
    reproduces mlp.out.L exactly from all of them."""
    from aimri.dictionaries.architectures import neuron_dictionary

    subject = aimri.load(tiny_lm_dir)
    ids = subject.tokenizer(FIXTURE_TEXT, return_tensors="pt")["input_ids"][:, :24]
    acts = subject.run(ids, read=["mlp.neurons.1", "mlp.out.1"])
    neurons = neuron_dictionary(subject, 1)
    assert neurons.cfg.d_in == subject.site_dim("mlp.neurons.1") == acts["mlp.neurons.1"].shape[-1]
    x = acts["mlp.neurons.1"][0]
    assert torch.equal(neurons.encode(x), x.relu())
    exact = x @ neurons.W_dec + neurons.b_dec  # all neurons, signed: the MLP's own output
    assert torch.allclose(exact, acts["mlp.out.1"][0], atol=1e-5)


def test_neuron_atlas_label_and_compare_cli(tiny_lm_dir: str, tmp_path: Path) -> None:
    """mri atlas --neurons, mri label (offline explainer + MiniLM scorer) and mri compare, end to end."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(FIXTURE_TEXT * 8)
    cli = [sys.executable, "-m", "aimri.cli"]
    common = ["--model", tiny_lm_dir, "--corpus", str(corpus), "--tokens", "1500", "--context", "16", "--quiet"]
    made = subprocess.run([*cli, "atlas", "--neurons", "1", *common, "--out", str(tmp_path / "n.sqlite")],
                          capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, made.stderr
    neither = subprocess.run([*cli, "atlas", *common], capture_output=True, text=True)
    assert neither.returncode == 2 and "one of the two" in neither.stderr
    labelled = subprocess.run([*cli, "label", str(tmp_path / "n.sqlite"), "--features", "live:6", "--quiet"],
                              capture_output=True, text=True)  # fmt: skip
    assert labelled.returncode == 0, labelled.stderr
    summary = json.loads(labelled.stdout.strip().splitlines()[-1])
    assert summary["labelled"] == 6 and "mean_embedding" in summary and "mean_embedding_control" in summary
    compared = subprocess.run([*cli, "compare", str(tmp_path / "n.sqlite"), "--json"], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stderr
    (row,) = json.loads(compared.stdout)
    assert row["n"] <= 6 and row["gap_ci"][0] <= row["gap"] <= row["gap_ci"][1]
    bad = subprocess.run(
        [*cli, "label", str(tmp_path / "n.sqlite"), "--features", "a-b"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--features" in bad.stderr


def test_simulation_scorer_reads_digit_probabilities(planted, tiny_lm_dir: str) -> None:
    from aimri.autointerp.examples import split_examples
    from aimri.autointerp.llm import HFChat
    from aimri.autointerp.scorers import SimulationScorer, _pearson

    atlas, *_ = planted
    from aimri.autointerp.examples import Example, FeatureExamples

    scorer = SimulationScorer(HFChat(tiny_lm_dir), per_class=2)
    scorer.subject.context_length = 256  # declared 128; RoPE runs longer, and the prompt alone is ~140 here
    full = split_examples(atlas, 0)

    def short(ex: Example) -> Example:  # the tiny model's context is 128 tokens
        at = max(0, ex.peak_index - 3)
        return Example(ex.tokens[at : at + 6], ex.acts[at : at + 6], ex.peak)

    examples = FeatureExamples(0, [], [short(e) for e in full.score_active], [short(e) for e in full.score_inactive])
    predicted = scorer._predict("a token", examples.score_active[0])
    assert len(predicted) == len(examples.score_active[0].tokens) and all(0 <= p <= 9 for p in predicted)
    (score,) = scorer.score_many([("a token", examples)])
    assert isinstance(score, float) and -1 <= score <= 1
    scorer.subject.context_length = 128
    (too_long,) = scorer.score_many([("a token", full)])
    assert isinstance(too_long, AimriError) and "exceeds the model's context" in str(too_long)
    assert _pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and _pearson([1, 1], [0, 1]) != _pearson([1, 1], [0, 1])


def test_cofiring_counts_agree_between_pair_list_and_gemm() -> None:
    from aimri.atlas.mine import add_cofiring

    gen = torch.Generator().manual_seed(0)
    F, T, k = 40, 300, 12
    idx = torch.stack([torch.randperm(F, generator=gen)[:k] for _ in range(T)])
    on = torch.rand(T, k, generator=gen) < 0.6
    pairs, gemm = torch.zeros(F * F, dtype=torch.int32), torch.zeros(F * F, dtype=torch.int32)
    add_cofiring(pairs, on, idx, dense=False)
    add_cofiring(gemm, on, idx, dense=True)
    hits = torch.zeros(T, F, dtype=torch.int64).scatter_(1, idx, on.long())
    assert torch.equal(pairs, gemm) and torch.equal(pairs.view(F, F).long(), hits.T @ hits)
