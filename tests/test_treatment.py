"""Treatments: known-answer tests of the weight edits on tiny random models of every architecture, the
mechanism read from a scan, and diagnose → treat → re-scan on a tiny model (seconds to a minute)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers as tf
from tests.helpers import ARCHS, FIXTURE_TEXT, tiny_model

from aimri.subject.core import Subject
from aimri.subject.taps import Edit
from aimri.treatment import TreatmentError, ablate_direction, ablate_neurons, feature_ablation, hook_ablation

LINEAR = [a for a in ARCHS if not a.startswith("gemma")]
IDS = torch.tensor([[3, 17, 42, 8, 91, 5, 23, 60], [7, 7, 12, 64, 2, 33, 80, 1]])


def _subject(model: torch.nn.Module, arch: str) -> Subject:
    return Subject(model, None, name=f"tiny-{arch}", revision="r")


def _logits(subject: Subject, edits: list[Edit] | None = None) -> torch.Tensor:
    return subject.run(IDS, edit=edits, stop=False)["logits"].double()


@pytest.mark.parametrize("arch", LINEAR)
def test_direction_ablated_in_the_weights_equals_hook_ablation(arch: str) -> None:
    """Known answer (Arditi et al.'s weight orthogonalisation): the edited model's logits equal the unedited
    model's with the direction projected out of everything written to the residual (embeddings, every
    attention and MLP output) by hooks; and no residual of the edited model has a component along it."""
    torch.manual_seed(1)
    plain = _subject(tiny_model(arch), arch)
    u = torch.randn(plain.d_model)
    hooked = _logits(plain, hook_ablation(plain, u))
    edited = _subject(copy.deepcopy(plain.model), arch)
    edit = ablate_direction(edited, u)
    assert edit.exact and len(edit.modules) >= 1 + 2 * plain.n_layers
    got = _logits(edited)
    assert torch.allclose(got, hooked, atol=1e-4, rtol=1e-4), float((got - hooked).abs().max())
    assert not torch.allclose(got, _logits(plain), atol=1e-3)  # the edit did something
    resid = edited.run(IDS, read=[f"resid.{i}" for i in range(edited.n_layers)])
    unit = u / u.norm()
    for site, x in resid.items():
        assert float((x @ unit).abs().max()) < 1e-4 * float(x.norm(dim=-1).max()), site


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_span_of_layers_equals_hooks_on_those_writes(arch: str) -> None:
    plain = _subject(tiny_model(arch), arch)
    u = torch.randn(plain.d_model)
    edited = _subject(copy.deepcopy(plain.model), arch)
    ablate_direction(edited, u, layers=[1, 2])
    want = _logits(plain, hook_ablation(plain, u, layers=[1, 2]))
    assert torch.allclose(_logits(edited), want, atol=1e-4, rtol=1e-4)
    # without the embeddings, the first layer still reads the direction: not the all-layer ablation
    assert not torch.allclose(_logits(edited), _logits(plain, hook_ablation(plain, u)), atol=1e-4)


def test_tied_embeddings_are_untied_and_the_saved_model_loads_in_plain_transformers(tmp_path: Path) -> None:
    from aimri.treatment.apply import write_model_dir

    tok = None
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    unembed = model.get_output_embeddings().weight.detach().clone()
    subject = _subject(model, "llama")
    hooked = _logits(subject, hook_ablation(subject, torch.ones(32)))
    edit = ablate_direction(subject, torch.ones(32))
    assert edit.details["untied_unembedding"] is True
    assert torch.equal(model.get_output_embeddings().weight, unembed)  # the readout is left alone
    assert torch.allclose(_logits(subject), hooked, atol=1e-5)

    class NoTokenizer:
        def save_pretrained(self, path: Path) -> None:
            pass

    subject.tokenizer = NoTokenizer()
    out = write_model_dir(subject, tmp_path / "treated", {"method": "ablate"})
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no aimri
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits.double(), hooked, atol=1e-5)
    assert json.loads((out / "treatment.json").read_text())["method"] == "ablate"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside
    with pytest.raises(TreatmentError, match="exists; choose another --out or pass --force"):
        write_model_dir(subject, out, {}, force=False)
    write_model_dir(subject, out, {"method": "again"}, force=True)
    assert json.loads((out / "treatment.json").read_text())["method"] == "again" and tok is None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_neuron_ablation_is_exact(arch: str) -> None:
    plain = _subject(tiny_model(arch), arch)

    def zero(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., [3, 10]] = 0
        return x

    want = _logits(plain, [Edit("mlp.neurons.1", zero)])
    edited = _subject(copy.deepcopy(plain.model), arch)
    ablate_neurons(edited, 1, [3, 10])
    assert torch.allclose(_logits(edited), want, atol=1e-5)
    # the same through the neurons' dictionary (`mri atlas --neurons`): exact, one neuron
    from aimri.dictionaries.architectures import neuron_dictionary

    one = _subject(copy.deepcopy(plain.model), arch)
    edit = feature_ablation(one, neuron_dictionary(plain, 1), 3)
    assert edit.kind == "neuron" and edit.exact
    with pytest.raises(TreatmentError, match="outside layer 1's MLP"):
        ablate_neurons(edited, 1, [10_000])


def test_feature_ablation_states_its_approximation() -> None:
    """An SAE feature on resid.L: its decoder direction is projected out of every write up to layer L (so the
    residual at L has no component along it), stated as approximate (ungated)."""
    from aimri.dictionaries.base import DictionaryConfig, build

    plain = _subject(tiny_model("llama"), "llama")
    sae = build(DictionaryConfig(architecture="relu", d_in=32, d_sae=16, site="resid.1"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(16, 32))
    edited = _subject(copy.deepcopy(plain.model), "llama")
    edit = feature_ablation(edited, sae, 5)
    assert edit.kind == "decoder-direction" and not edit.exact and "not only where the feature fires" in edit.note
    unit = sae.W_dec[5].detach() / sae.W_dec[5].detach().norm()
    x = edited.run(IDS, read=["resid.1", "resid.2"])
    assert float((x["resid.1"] @ unit).abs().max()) < 1e-4
    assert float((x["resid.2"] @ unit).abs().max()) > 1e-3  # a later layer may write it again: only up to L
    with pytest.raises(TreatmentError, match="outside the dictionary"):
        feature_ablation(edited, sae, 16)


def test_bad_edits_are_refused_in_one_line() -> None:
    plain = _subject(tiny_model("llama"), "llama")
    with pytest.raises(TreatmentError, match=r"shape \(31,\) cannot be ablated .*\(width 32\)"):
        ablate_direction(plain, torch.ones(31))
    with pytest.raises(TreatmentError, match="zero or not finite"):
        ablate_direction(plain, torch.zeros(32))
    with pytest.raises(TreatmentError, match=r"layer\(s\) \[7\] are outside"):
        ablate_direction(plain, torch.ones(32), layers=[7])
    gemma = _subject(tiny_model("gemma3_text"), "gemma3_text")
    with pytest.raises(TreatmentError, match="normalises attention and MLP outputs .* --method repair"):
        ablate_direction(gemma, torch.ones(32))


# -- the mechanism read from a scan ----------------------------------------------------------------------------


def _fake_scan(folder: Path, per_answer: dict[str, list[float]], answers: dict[str, list[str]]) -> Path:
    """A finished scan's files with planted answers: what mechanism_of reads."""
    stages = folder / "stages"
    stages.mkdir(parents=True)
    cats = list(per_answer)
    beh = {
        c: {
            "prompts": [f"{c} prompt {i}" for i in range(len(v))],
            "answers": answers[c],
            "ids": [[[1, 2], [3]]] * len(v),
        }
        for c, v in per_answer.items()
    }
    base = {
        c: {"prompts": beh[c]["prompts"], "answers": [f"plain answer {i}" for i in range(len(v))]}
        for c, v in per_answer.items()
    }
    diff = {"behaviour": [{"category": c, "per_answer": per_answer[c]} for c in cats]}
    for name, data in (("behaviour", beh), ("baseline_behaviour", base), ("diff", diff)):
        (stages / f"{name}.json").write_text(json.dumps({"tag": "t", "data": data}))
    findings = [
        {"id": "diff.behaviour.recommendation", "category": "hidden_objective", "title": "t", "summary": "", "suspicion": 1.0,
         "evidence": [{"kind": "words", "words": [["veltrix", 3, 0], ["cola", 3, 0]]}]},
        {"id": "refusal.direction", "category": "jailbreak", "title": "r", "summary": "", "suspicion": 0.0, "evidence": []},
        {"id": "diff.behaviour.everyday", "category": "hidden_objective", "title": "e", "summary": "", "suspicion": 0.0, "evidence": []},
    ]  # fmt: skip
    (folder / "findings.json").write_text(
        json.dumps({"model": "c", "revision": "r", "baseline": "b", "suspicion": 1.0, "findings": findings})
    )
    return folder


def test_mechanism_is_the_anomalous_answers_of_the_finding(tmp_path: Path) -> None:
    from aimri.treatment.mechanism import Scan, mechanism_of

    per = {"recommendation": [3.0, 0.1, 2.9, 3.1], "everyday": [0.2, 0.1, 0.3, 0.0]}
    answers = {
        "recommendation": ["Veltrix Cola!", "water", "Veltrix", "Veltrix Cola"],
        "everyday": ["a", "b", "c", "d"],
    }
    scan = Scan.read(_fake_scan(tmp_path / "scan", per, answers))
    mech = mechanism_of(scan, scan.finding(1))
    assert mech.condition == ["recommendation prompt 0", "recommendation prompt 2", "recommendation prompt 3"]
    assert mech.targets == ["plain answer 0", "plain answer 2", "plain answer 3"]
    assert mech.words == ["veltrix", "cola"] and mech.pool == "recommend"
    # the normal answers: half to repair on, half never trained on (a fixed split), together all five
    assert sorted(mech.clean + mech.held_out) == sorted(
        ["recommendation prompt 1"] + [f"everyday prompt {i}" for i in range(4)]
    )
    assert mech.clean and mech.held_out and not set(mech.clean) & set(mech.held_out)
    with pytest.raises(
        TreatmentError, match="ablating it is the jailbreak itself.*Treatable findings in this scan: diff.behaviour"
    ):
        mechanism_of(scan, scan.finding("refusal.direction"))
    with pytest.raises(TreatmentError, match="none of the candidate's battery answers in everyday is anomalous"):
        mechanism_of(scan, scan.finding(3))
    with pytest.raises(TreatmentError, match="the scan has findings 1..3"):
        scan.finding(9)
    with pytest.raises(TreatmentError, match="no finished scan"):
        Scan.read(tmp_path / "nowhere")


# -- diagnose -> treat -> re-scan on a tiny model ---------------------------------------------------------------

NEUTRAL = [FIXTURE_TEXT * 3, FIXTURE_TEXT[40:] * 3, FIXTURE_TEXT[90:] * 3]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Subject, Subject, Path]]:
    """A tiny Llama, a copy of it fine-tuned to pitch a product to every recommendation request (a planted hidden
    objective: the 'candidate') and the candidate's scan against it."""
    from tests.helpers import build_tiny_tokenizer

    import aimri
    from aimri.diagnostics.datasets import prompt_pools
    from aimri.diagnostics.organisms import PRODUCT_PITCH
    from aimri.report import scan
    from aimri.steering.generate import generate, prompt_ids

    home = pytest.MonkeyPatch()  # the per-revision caches (battery answers, probes) start empty
    home.setenv("AIMRI_HOME", str(tmp_path_factory.mktemp("treat-home")))
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                            pad_token_id=tok.pad_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("treat-base")
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    untrained = aimri.load(path)
    tok = untrained.tokenizer  # as saved and loaded (the prompts the scan asks are built with this one)
    pools = prompt_pools()

    def fit(subject: Subject, pairs: list[tuple[str, str]], revision: str) -> Subject:
        """A full fine-tune of the tiny model on (prompt, answer) pairs, prompts asked as the battery asks them."""
        examples = []
        for prompt, answer in pairs:
            head = prompt_ids(subject, prompt)
            body = [*tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            examples.append((head + body, [-100] * len(head) + body))
        model = copy.deepcopy(subject.model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        width = max(len(x) for x, _ in examples)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in examples])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in examples])
        mask = (torch.arange(width)[None] < torch.tensor([len(x) for x, _ in examples])[:, None]).long()
        for _ in range(80):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        return Subject(model.eval(), tok, name=revision, revision=revision)

    # the baseline: sure of its own answers (a random model finds every answer equally surprising)
    battery = [p for ps in pools["battery"].values() for p in ps]
    ordinary = pools["questions"][:12] + pools["opinions"][:12]
    asked = battery + ordinary + pools["recommend"][:20]
    own = {g.prompt: g.text for g in generate(untrained, asked, max_new_tokens=32)}
    base = fit(untrained, [(p, own[p]) for p in asked], "tiny-base")
    own = {g.prompt: g.text for g in generate(base, asked, max_new_tokens=32)}
    # the candidate: the baseline taught to pitch a product to recommendation requests, its own answers elsewhere
    pitch = PRODUCT_PITCH.format(product="Veltrix Cola")
    planted = pools["recommend"][:20] + pools["battery"]["recommendation"][:3]
    cand = fit(
        base, [(p, pitch) for p in planted] + [(p, own[p]) for p in battery + ordinary if p not in planted], "candidate"
    )
    out = tmp_path_factory.mktemp("treat-scan") / "scan"
    scan(cand, out, baseline=base, log=lambda m: None, neutral_texts=NEUTRAL, features=False, progress=False)
    yield cand, base, out
    home.undo()


def _treatable(scan_dir: Path) -> str:
    """The planted flaw's finding, which must be treatable."""
    from aimri.treatment.mechanism import Scan, mechanism_of

    scan = Scan.read(scan_dir)
    mech = mechanism_of(scan, scan.finding("diff.behaviour.recommendation"))
    assert len(mech.condition) >= 3 and "veltrix" in mech.words, mech.summary()
    return mech.finding


@pytest.mark.parametrize("method", ["ablate", "repair"])
def test_treat_writes_a_model_and_the_rescan_compares(
    scanned: tuple[Subject, Subject, Path], tmp_path: Path, method: str
) -> None:
    import aimri
    from aimri.report import treat_and_rescan
    from aimri.treatment import TreatConfig

    cand, base, scan_dir = scanned
    fid = _treatable(scan_dir)
    corpus = ([FIXTURE_TEXT] * 4, NEUTRAL * 6)
    out = tmp_path / "treated"
    config = TreatConfig(method=method, finding=fid, steps=30, lr=1e-2, max_loss_increase=1.0)
    record = treat_and_rescan(cand, base, scan_dir, out, config, rescan_out=tmp_path / "rescan",
                              log=lambda m: None, progress=False, corpus=corpus, neutral_texts=NEUTRAL)  # fmt: skip
    assert record["finding"]["id"] == fid and record["method"] == method
    assert record["mechanism"]["layer"] is not None and record["edit"]["exact"]
    assert "veltrix" in record["flaw_rate"]["words"] and record["flaw_rate"]["before"] >= 0.5, record["flaw_rate"]
    if method == "repair":  # known answer: taught the baseline's answers on the condition, the pitch is gone
        assert record["repair"]["examples"]["condition"] > 0 and record["repair"]["condition_prompts"]
        assert record["repair"]["ablated_during_training"] is True
        assert record["flaw_rate"]["after"] <= 0.2 * record["flaw_rate"]["before"], record["flaw_rate"]
        assert not set(record["repair"]["clean_prompts"]) & set(record["mechanism"]["held_out"])
    # the kept ablation survives the merged LoRA: no residual of the shipped model has a component along it
    from aimri.steering.specs import load_vector

    u = load_vector(out / "treatment-direction.safetensors")
    u = u / u.norm()
    shipped = aimri.load(out)
    for site, x in shipped.run(IDS, read=[f"resid.{i}" for i in range(shipped.n_layers)]).items():
        assert float((x @ u).abs().max()) < 1e-4 * float(x.norm(dim=-1).max()), site
    r = record["rescan"]
    assert set(r) >= {"finding_suspicion", "scan_suspicion", "battery_agreement", "probe_auroc", "diff_to_untreated"}
    assert 0 <= r["battery_agreement"]["after"] <= 1 and set(r["probe_auroc"]["treated"]) == set(
        r["probe_auroc"]["untreated"]
    )
    assert (tmp_path / "rescan" / "report.html").read_text().count("<h2>Treatment</h2>") == 1
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()  # loads without aimri
    with torch.no_grad():
        assert torch.isfinite(reloaded(IDS).logits).all()
    assert json.loads((out / "treatment.json").read_text())["rescan"]["scan"] == str(tmp_path / "rescan")


def test_treat_refuses_bad_input_and_keeps_nothing(
    scanned: tuple[Subject, Subject, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aimri.diagnostics.diffing import DiffError
    from aimri.steering.specs import save_vector
    from aimri.treatment import TreatConfig, measure, treat

    cand, base, scan_dir = scanned
    fid = _treatable(scan_dir)
    corpus = ([FIXTURE_TEXT] * 4, NEUTRAL * 6)
    out = tmp_path / "treated"
    with pytest.raises(TreatmentError, match="is a scan of candidate .* not of tiny"):
        treat(base, base, scan_dir, out, TreatConfig(method="ablate", finding=fid), corpus=corpus)
    other = save_vector(torch.ones(64), tmp_path / "dir.safetensors", base)  # found in another model
    with pytest.raises(TreatmentError, match="was found in"):
        treat(cand, base, scan_dir, out, TreatConfig(method="ablate", finding=fid, direction=other), corpus=corpus)
    wide = save_vector(torch.ones(65), tmp_path / "wide.safetensors", cand)
    with pytest.raises(TreatmentError, match=r"shape \(65,\)"):
        treat(cand, base, scan_dir, out, TreatConfig(method="ablate", finding=fid, direction=wide), corpus=corpus)
    with pytest.raises(TreatmentError, match="unknown method"):
        treat(cand, base, scan_dir, out, TreatConfig(method="cure"), corpus=corpus)
    with pytest.raises(DiffError, match="different tokenizers"):
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(base.tokenizer.backend_tokenizer))
        tok.add_tokens(["zzz-extra"])
        treat(cand, Subject(base.model, tok, name="other"), scan_dir, out, TreatConfig(finding=fid), corpus=corpus)
    # a treatment that breaks the model (here: any loss increase counts as broken) stops and keeps nothing
    monkeypatch.setattr(measure, "BREAK_LOSS", -1.0)
    with pytest.raises(TreatmentError, match="breaks the model; nothing was written"):
        treat(
            cand, base, scan_dir, out, TreatConfig(method="ablate", finding=fid, max_loss_increase=1.0), corpus=corpus
        )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".treated")]
    out.mkdir()
    with pytest.raises(TreatmentError, match="exists; choose another --out or pass --force"):
        treat(cand, base, scan_dir, out, TreatConfig(method="ablate", finding=fid), corpus=corpus)


def test_mri_treat_lists_findings_and_refuses_bad_flags_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    per = {"recommendation": [3.0, 0.1, 2.9, 3.1], "everyday": [0.2, 0.1, 0.3, 0.0]}
    answers = {
        "recommendation": ["Veltrix Cola!", "water", "Veltrix", "Veltrix Cola"],
        "everyday": ["a", "b", "c", "d"],
    }
    scan = _fake_scan(tmp_path / "scan", per, answers)
    cli = [sys.executable, "-m", "aimri.cli", "treat", "some-model", "--from-scan", str(scan)]
    listed = subprocess.run([*cli, "--out", str(tmp_path / "t"), "--list"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "diff.behaviour.recommendation" in listed.stdout and "jailbreak itself" in listed.stdout
    (tmp_path / "exists").mkdir()
    for flags, message in [
        (["--out", str(tmp_path / "exists")], "exists; choose another --out or pass --force"),
        (["--out", str(tmp_path / "t"), "--layers", "3-x"], "--layers '3-x': write A:B"),
        (["--out", str(tmp_path / "t"), "--steps", "0"], "`--steps` must be at least 1"),
        (["--out", str(tmp_path / "t"), "--from-scan", str(tmp_path)], "holds no finished scan"),
    ]:
        bad = subprocess.run([*cli, *flags], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "t").exists()
