"""The default feature set (aimri.features) and labelled features as the checkup's evidence
(aimri.diagnostics.evidence): built, resumed, reused only by the same model revision; bad settings and a full
disk; the atlas mined from a store equals the one mined from the model; the evidence rankings on planted data."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests.helpers import FIXTURE_TEXT, most_common_word, token_detector

import aimri
from aimri.atlas.build import build_atlas
from aimri.data.corpus import Corpus
from aimri.data.harvest import harvest
from aimri.diagnostics import evidence
from aimri.dictionaries import load_dictionary
from aimri.errors import AimriError
from aimri.features import FeaturesConfig, build_features, cached_features, describe, feature_set_dir, install
from aimri.run import Run

SMALL = FeaturesConfig(budget=32 * 32 * 4, context=32, width=64, k=4, epochs=2, batch_size=256, heldout_shards=1,
                       scored=5, ce_windows=2)  # fmt: skip


@pytest.fixture
def fresh(tiny_lm_dir: str):
    subject = aimri.load(tiny_lm_dir)
    shutil.rmtree(feature_set_dir(subject, SMALL), ignore_errors=True)
    yield subject
    shutil.rmtree(feature_set_dir(subject, SMALL), ignore_errors=True)


def test_feature_set_is_built_labelled_installed_and_reused(fresh, tmp_path: Path) -> None:
    subject = fresh
    logs: list[str] = []
    found = build_features(subject, SMALL, log=logs.append, progress=False)
    q = found.summary["quality"]
    assert (
        found.summary["model_revision"] == subject.revision
        and found.summary["site"] == f"resid.{subject.n_layers // 2}"
    )
    assert 0 < q["fvu"] < 1.5 and q["l0"] == pytest.approx(4, abs=0.01) and q["rows"] > 0
    assert q["live"] > 0 and q["labelled"] == q["live"] and q["label_scored"] > 0
    assert q["label_score"] is not None and q["label_score_control"] is not None
    assert "ce_loss_recovered" in q and set(found.summary["seconds"]) >= {"harvest", "train", "atlas", "labels"}
    assert sorted(p.name for p in found.path.iterdir()) == ["dictionary", "features.json"]  # store: temporary
    assert load_dictionary(found.dictionary).cfg.model_revision == subject.revision
    assert "held-out FVU" in describe(found.summary)
    # installed where the console looks, and again only when it changed
    run = Run(tmp_path / "run")
    target = install(found, run)
    assert run.atlas_files() == [target / "atlas.sqlite"] and (target / "features.json").is_file()
    assert install(found, run) == target
    # reused, not rebuilt
    logs.clear()
    again = build_features(subject, SMALL, log=logs.append, progress=False)
    assert again.summary == found.summary and any("reused" in m for m in logs)


def test_interrupted_build_resumes_without_retraining(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    subject = fresh
    import aimri.atlas.build as atlas_build

    real = atlas_build.build_atlas

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atlas_build, "build_atlas", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_features(subject, SMALL, log=lambda m: None, progress=False)
    path = feature_set_dir(subject, SMALL)
    trained = (path / "dictionary" / "training.json").stat().st_mtime_ns
    assert cached_features(subject, SMALL) is None and (path / "store").is_dir()  # nothing claims to be finished
    monkeypatch.setattr(atlas_build, "build_atlas", real)
    found = build_features(subject, SMALL, log=lambda m: None, progress=False)
    assert (path / "dictionary" / "training.json").stat().st_mtime_ns == trained  # not trained again
    assert "train" not in found.summary["seconds"] and found.atlas.is_file()


def test_another_revision_never_reuses_the_set(fresh) -> None:
    subject = fresh
    build_features(subject, SMALL, log=lambda m: None, progress=False)
    assert cached_features(subject, SMALL) is not None
    assert cached_features(subject, replace(SMALL, epochs=3)) is None  # other settings: another set
    assert feature_set_dir(subject, replace(SMALL, seed=1)) != feature_set_dir(subject, SMALL)
    other = aimri.Subject(subject.model, subject.tokenizer, name=subject.name, revision="f" * 64)  # a fine-tune, say
    assert cached_features(other, SMALL) is None
    assert feature_set_dir(other, SMALL) != feature_set_dir(subject, SMALL)
    (feature_set_dir(subject, SMALL) / "features.json").write_text(
        (feature_set_dir(subject, SMALL) / "features.json").read_text().replace(subject.revision, "0" * 64)
    )  # a folder whose record names another revision is not reused either
    assert cached_features(subject, SMALL) is None
    unknown = aimri.Subject(subject.model, subject.tokenizer, name="hand-made")
    with pytest.raises(AimriError, match="no revision"):
        build_features(unknown, SMALL, log=lambda m: None, progress=False)


def test_bad_settings_are_refused_before_work(tiny_lm_dir: str) -> None:
    subject = aimri.load(tiny_lm_dir)
    cases = {
        "site": (FeaturesConfig(site="mlp.out.1"), "residual Site"),
        "k": (FeaturesConfig(k=64, width=32), "larger than `width`"),
        "budget": (FeaturesConfig(budget=1000), "give at least"),
        "unknown site": (FeaturesConfig(site="resid.99"), "resid.99"),
    }
    for name, (config, says) in cases.items():
        with pytest.raises(AimriError, match=says):
            build_features(subject, config, log=lambda m: None, progress=False)
        assert not feature_set_dir(subject, config).exists(), name


def test_a_full_disk_ends_with_one_line_and_keeps_finished_parts(fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    subject = fresh
    import aimri.dictionaries.train as train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "train_from_store", full)
    with pytest.raises(AimriError, match=r"disk filled while building features \(train\).*finished parts are kept"):
        build_features(subject, SMALL, log=lambda m: None, progress=False)

    def torch_full(*args, **kwargs):  # torch.save's words for it
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed (No space left on device)")  # fmt: skip

    monkeypatch.setattr(train, "train_from_store", torch_full)
    with pytest.raises(AimriError, match=r"disk filled while building features \(train\)"):
        build_features(subject, SMALL, log=lambda m: None, progress=False)
    assert json.loads((feature_set_dir(subject, SMALL) / "store" / "manifest.json").read_text())["complete"]


def test_atlas_from_a_store_equals_the_atlas_from_the_model(tiny_lm_dir: str, tmp_path: Path) -> None:
    subject = aimri.load(tiny_lm_dir)
    corpus = Corpus.from_texts([FIXTURE_TEXT] * 12)
    token, _, _ = most_common_word(subject, corpus)
    sae, _ = token_detector(subject, token)
    store = harvest(subject, corpus, [sae.cfg.site], tmp_path / "store", context=16, windows_per_shard=4,
                    max_tokens=None, progress=False)  # fmt: skip
    assert len(store.shards) > 1
    a = build_atlas(sae, subject, corpus, tmp_path / "a.sqlite", context=16, top_n=5, progress=False)
    b = build_atlas(sae, subject, corpus, tmp_path / "b.sqlite", context=16, top_n=5, progress=False, store=store.path)
    assert a.meta["windows"] == b.meta["windows"] and a.meta["tokens"] == b.meta["tokens"]
    for f in range(sae.d_sae):
        ca, cb = a.card(f), b.card(f)
        assert ca["fires"] == cb["fires"] and ca["max_act"] == pytest.approx(cb["max_act"], rel=1e-5)
        peaks = [[e["peak"] for e in c["top_examples"]] for c in (ca, cb)]  # equal peaks may come in any order
        assert peaks[0] == pytest.approx(peaks[1], rel=1e-3)
        for e in cb["top_examples"]:  # each window's tokens and activations are the model's own
            same = next(x for x in a.examples(f, "top") if x["window"] == e["window"]) if any(
                x["window"] == e["window"] for x in a.examples(f, "top")) else None  # fmt: skip
            if same is not None:
                assert same["tokens"] == e["tokens"] and same["acts"] == pytest.approx(e["acts"], abs=1e-3)
    # a tokenizer with no chat-start token (GPT-2, Llama 2): the store's packing is rebuilt the same
    from tests.helpers import build_tiny_tokenizer

    plain = aimri.Subject(subject.model, build_tiny_tokenizer(chat=False), name="plain", revision="p" * 64)
    assert len(plain.tokenizer) == len(subject.tokenizer)
    plain_store = harvest(plain, corpus, [sae.cfg.site], tmp_path / "plain", context=16, max_tokens=None,
                          progress=False)  # fmt: skip
    trained_on, sae.cfg.model_revision = sae.cfg.model_revision, plain.revision
    built = build_atlas(sae, plain, corpus, tmp_path / "p.sqlite", context=16, progress=False, store=plain_store.path)
    assert built.meta["windows"] == len({w for s in plain_store.shards for w in range(*s["windows"])})
    sae.cfg.model_revision = trained_on
    with pytest.raises(AimriError, match="no longer yields"):  # the corpus changed since the harvest
        build_atlas(sae, subject, Corpus.from_texts([FIXTURE_TEXT[::-1]] * 12), tmp_path / "c.sqlite", context=16,
                    progress=False, store=store.path)  # fmt: skip


class _Cards:
    """Stands in for evidence.Cited: rows without an atlas."""

    def row(self, feature: int, **values: float) -> dict:
        return {"feature": feature, **values, "label": f"f{feature}", "examples": [], "link": ""}


def test_evidence_rankings_find_planted_features() -> None:
    torch.manual_seed(0)
    codes = torch.rand(40, 16) * (torch.rand(40, 16) > 0.5)
    scores = torch.randn(40)
    codes[:, 7] = 2.0 + scores  # tracks the probe exactly
    top = evidence._correlated(codes, scores, _Cards())  # type: ignore[arg-type]
    assert top[0]["feature"] == 7 and top[0]["correlation"] == pytest.approx(1.0, abs=1e-5)
    means = {"a": torch.zeros(16), "b": torch.zeros(16), "c": torch.zeros(16)}
    means["b"][3] = 5.0  # only category b's answers use feature 3
    ranked = evidence._specific(means, _Cards())  # type: ignore[arg-type]
    assert ranked["b"][0]["feature"] == 3 and ranked["b"][0]["lift"] == 5.0 and ranked["a"] == []


def test_decision_gradient_matches_finite_differences(tiny_lm_dir: str) -> None:
    """The gradient the decision's feature attribution uses, against the logit difference's change when the
    residual at the last position is moved along a random direction (known answer: the derivative)."""
    from aimri.subject.taps import Edit

    subject = aimri.load(tiny_lm_dir)
    subject.context_length = 1024  # the loan prompt is long in the tiny BPE; rotary positions take it
    x, g = evidence.decision_gradient(subject, "resid.1", options=("a", "b"))
    ids, a, b = evidence.decision_inputs(subject, options=("a", "b"))
    v = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(0))
    v = v / v.norm() * x.norm()  # a step of eps x the activation's own size
    eps = 1e-3

    def diff(step: float) -> float:
        def move(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            h[:, -1] += step * v
            return h

        logits = subject.run(ids, read=[], edit=[Edit("resid.1", move)], stop=False)["logits"][0, -1].double()
        return float(logits[a] - logits[b])

    numeric = (diff(eps) - diff(-eps)) / (2 * eps)
    assert numeric == pytest.approx(float(v @ g), rel=1e-3, abs=1e-5)
    sae, _ = token_detector(subject, a)
    rows = evidence.decision_features(subject, sae, _Cards(), options=("a", "b"))  # type: ignore[arg-type]
    assert len(rows) <= evidence.TOP and all(r["activation"] > 0 for r in rows)
    assert rows == sorted(rows, key=lambda r: -abs(r["effect"]))


def test_cli_bad_settings_are_one_line_errors_naming_the_flags(tiny_lm_dir: str) -> None:
    import subprocess
    import sys

    mri = str(Path(sys.executable).with_name("mri"))
    for args, says in (
        (["--k", "64", "--width", "32"], "`--k` 64 is larger than `--width` 32"),
        (["--budget", "1000"], "`--budget` 1,000 tokens fill 1 shard"),
        (["--epochs", "0"], "`--epochs` must be at least 1, got 0"),
        (["--site", "mlp.out.1"], "`--site` 'mlp.out.1': the default feature set reads a residual Site"),
    ):
        done = subprocess.run([mri, "features", tiny_lm_dir, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
