"""Cross-layer transcoders: the exact CLT (decoders = the MLPs) gives a replacement model with zero error and
scores 1; cross-layer decoders are wired linearly and completely (graph rows add up); training streams,
checkpoints and resumes; files round-trip through ours, circuit-tracer's and Gemma Scope 2's layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.helpers import tiny_subject
from tests.test_circuits import exact_gpt2

from aimri.circuits.attribution import attribute
from aimri.circuits.prune import prune
from aimri.circuits.replacement import ReplacementModel, load_transcoders
from aimri.dictionaries.clt import CLTConfig, CrossLayerTranscoder
from aimri.dictionaries.clt_formats import check_clt, load_clt, save_clt
from aimri.errors import AimriError


def exact_clt() -> tuple[object, CrossLayerTranscoder]:
    """The ReLU GPT-2 whose MLPs a CLT reproduces exactly: layer L's encoder is c_fc, its decoder to L is c_proj,
    its decoders to later layers zero (the cross-layer wiring is checked on a random CLT below)."""
    subject, tcs = exact_gpt2()
    L = subject.n_layers
    clt = CrossLayerTranscoder(CLTConfig(L, 32, [128] * L, activation="relu", model_name=subject.name,
                                         model_revision=subject.revision))  # fmt: skip
    with torch.no_grad():
        for layer, tc in tcs.items():
            clt.W_enc[layer].copy_(tc.W_enc.t())
            clt.b_enc[layer].copy_(tc.b_enc)
            clt.W_dec[layer][:, 0] = tc.W_dec
            clt.b_dec[layer].copy_(tc.b_dec)
    return subject, clt


def test_exact_clt_reproduces_the_model_with_scores_one() -> None:
    subject, clt = exact_clt()
    ids = torch.randint(1, 96, (10,), generator=torch.Generator().manual_seed(2))
    replaced = ReplacementModel(subject, clt).run(ids)
    with torch.no_grad():
        plain = subject.model(input_ids=ids[None]).logits[0]
    assert torch.equal(replaced.logits.detach(), plain)
    assert max(float(e.detach().abs().max()) for e in replaced.errors.values()) < 1e-5
    graph = attribute(ReplacementModel(subject, clt), ids.tolist(), max_feature_nodes=10_000, progress=False)
    pruned = prune(graph)
    assert pruned.replacement_full == pytest.approx(1.0, abs=1e-5)
    assert pruned.completeness_full == pytest.approx(1.0, abs=1e-5)


def random_clt(subject, width: int = 24, seed: int = 0, skip: bool = False) -> CrossLayerTranscoder:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    L, d = subject.n_layers, subject.d_model
    clt = CrossLayerTranscoder(CLTConfig(L, d, [width] * L, activation="relu", skip=skip))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.3)
        clt.b_dec.zero_()
    return clt


def test_cross_layer_decoders_are_summed_and_graph_rows_add_up() -> None:
    """Bias-free Llama, a random CLT with b_dec = 0: layer T's replacement output is clt.decode(T, codes) on the
    model's own MLP inputs, and every logit's incoming edges sum to its demeaned logit (Euler's identity holds
    through the cross-layer decoders)."""
    subject = tiny_subject("llama")
    clt = random_clt(subject)
    model = ReplacementModel(subject, clt)
    ids = torch.randint(1, 96, (7,), generator=torch.Generator().manual_seed(4))
    replaced = model.run(ids)
    acts = subject.run(ids[None], read=[f"mlp.in.{i}" for i in range(3)] + [f"mlp.out.{i}" for i in range(3)])
    with torch.no_grad():
        codes = {i: clt.encode(i, acts[f"mlp.in.{i}"][0]) for i in range(3)}
        for t in range(3):
            recon = clt.decode(t, codes)
            assert torch.allclose(recon + replaced.errors[t].detach(), acts[f"mlp.out.{t}"][0], atol=1e-5)
    assert float(clt.decoder(0, 2).abs().sum()) > 0  # the cross-layer decoders are in play
    graph = attribute(
        model, ids.tolist(), max_feature_nodes=10_000, batch_size=16, progress=False, constant_positions=0
    )
    with torch.no_grad():
        logits = subject.model(input_ids=ids[None]).logits[0, -1]
    for j, token in enumerate(graph.logit_tokens):
        _, w = graph.row(graph.logit_start + j)
        assert float(w.sum()) == pytest.approx(float(logits[token] - logits.mean()), rel=1e-4, abs=1e-4)
    # a layer-2 feature's pre-activation is reached from layer-0 features directly (their decoders to 1 and 2)
    for node in range(graph.n_features):
        layer, pos, idx = graph.features[node].tolist()
        if layer == 2:
            pre = float(acts["mlp.in.2"][0, pos] @ clt.encoder(2)[:, idx])
            _, w = graph.row(node)
            assert float(w.sum()) == pytest.approx(pre, rel=1e-4, abs=1e-4)
            break


def test_files_round_trip_in_every_layout(tmp_path: Path) -> None:
    subject = tiny_subject("llama")
    clt = random_clt(subject, skip=True)
    clt.cfg.model_name, clt.cfg.model_revision, clt.cfg.activation = subject.name, subject.revision, "jumprelu"
    for i in range(3):
        clt.set_threshold(i, torch.rand(24) * 0.1)
    save_clt(clt, tmp_path / "ours")
    back = load_clt(tmp_path / "ours")
    x = torch.randn(5, 32)
    for i in range(3):
        assert torch.equal(back.encode(i, x), clt.encode(i, x))
    record = json.loads((tmp_path / "ours" / "clt.json").read_text())
    assert record["format_version"] == 1 and not record["circuit_tracer"]["reads_as_we_do"]  # the skip term
    # circuit-tracer's own files (no clt.json): the same tensors
    (tmp_path / "ours" / "clt.json").unlink()
    ct = load_clt(tmp_path / "ours")
    assert torch.equal(ct.W_dec[1], clt.W_dec[1]) and ct.cfg.skip
    # Gemma Scope 2: per layer w_enc [d, w], w_dec [w, L, d]
    gs = tmp_path / "gs2"
    gs.mkdir()
    for i in range(3):
        w_dec = torch.zeros(24, 3, 32)
        w_dec[:, i:] = clt.W_dec[i].detach()
        save_file({"w_enc": clt.W_enc[i].detach().t().contiguous(), "w_dec": w_dec, "b_enc": clt.b_enc[i].detach(),
                   "b_dec": clt.b_dec[i].detach(), "threshold": clt.threshold(i),
                   "affine_skip_connection": clt.W_skip[i].detach()}, str(gs / f"layer_{i}.safetensors"))  # type: ignore[index]  # fmt: skip
    g = load_clt(gs)
    codes = {i: clt.encode(i, x) for i in range(3)}
    assert torch.allclose(g.decode(2, codes, x), clt.decode(2, codes, x), atol=1e-6)
    # what loads on a model goes through the same checks
    assert isinstance(load_transcoders(tmp_path / "ours", subject), CrossLayerTranscoder)


def test_bad_clts_are_named(tmp_path: Path) -> None:
    subject = tiny_subject("llama")
    clt = random_clt(subject)
    wrong = CrossLayerTranscoder(CLTConfig(2, 32, [8, 8]))
    with pytest.raises(AimriError, match="spans 2 layers but tiny-llama has 3"):
        ReplacementModel(subject, wrong)
    with pytest.raises(AimriError, match="reads 16-wide activations"):
        check_clt(CrossLayerTranscoder(CLTConfig(3, 16, [8] * 3)), subject)
    save_clt(clt, tmp_path / "c")
    record = json.loads((tmp_path / "c" / "clt.json").read_text())
    record["format_version"] = 7
    (tmp_path / "c" / "clt.json").write_text(json.dumps(record))
    with pytest.raises(AimriError, match="format version 7; this AI MRI reads version 1"):
        load_clt(tmp_path / "c")
    (tmp_path / "c" / "clt.json").unlink()
    (tmp_path / "c" / "W_dec_1.safetensors").unlink()
    with pytest.raises(AimriError, match="W_dec_1.safetensors is missing"):
        load_clt(tmp_path / "c")
    # circuit-tracer's per-layer transcoders are also layer_i.safetensors: not a CLT, and said so
    per_layer = tmp_path / "ct-plt"
    per_layer.mkdir()
    save_file({"W_enc": torch.zeros(8, 32), "W_dec": torch.zeros(8, 32)}, str(per_layer / "layer_0.safetensors"))
    with pytest.raises(AimriError, match="holds no transcoders"):
        load_transcoders(per_layer, subject)
    # a layer file missing a tensor names it
    save_clt(clt, tmp_path / "d")
    enc = load_file(str(tmp_path / "d" / "W_enc_2.safetensors"))
    del enc["b_enc_2"]
    save_file(enc, str(tmp_path / "d" / "W_enc_2.safetensors"))
    with pytest.raises(AimriError, match="has no tensor 'b_enc_2'"):
        load_clt(tmp_path / "d")
    with pytest.raises(AimriError, match="one positive width per layer"):
        CLTConfig(3, 32, [8, 8]).check()
    other = random_clt(subject)
    other.cfg.model_name, other.cfg.model_revision = "another", "f" * 40
    with pytest.raises(AimriError, match="allow-other-model"):
        check_clt(other, subject)


def test_clt_trains_resumes_and_is_measured(tiny_lm_dir: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers import FIXTURE_TEXT

    import aimri
    from aimri.data.corpus import Corpus
    from aimri.dictionaries.clt_train import CLTTrainer, train_clt
    from aimri.dictionaries.config import CLTTrainConfig

    subject = aimri.load(tiny_lm_dir)
    corpus = Corpus.from_texts([FIXTURE_TEXT] * 30)
    config = CLTTrainConfig(width=48, k=4, tokens=128 * 12, batch_size=128, context=32, heldout_every=5,
                            eval_windows=4, downstream_windows=2, checkpoint_every=4, calibration_batches=2, lr=1e-2)  # fmt: skip
    record = train_clt(subject, corpus, tmp_path / "clt", config, progress=False)
    assert record["steps"] == 12 and sorted(record["layers"]) == [0, 1, 2]
    assert all(0 < m["fvu"] < 1 and m["l0"] > 0 for m in record["layers"].values())
    whole = record["replacement"]
    assert whole["tokens"] > 0 and 0 <= whole["top1_agreement"] <= 1 and whole["ce_replaced"] > 0
    clt = load_clt(tmp_path / "clt")
    assert clt.cfg.model_revision == subject.revision and clt.cfg.activation == "jumprelu"
    assert all(float(clt.threshold(i).min()) > 0 for i in range(3))
    # resuming: a run interrupted after step 8 (checkpointed every 4) ends where the uninterrupted one did
    step = CLTTrainer.step

    def interrupted(self, xs, ys):  # type: ignore[no-untyped-def]
        if self.step_index == 8:
            raise KeyboardInterrupt
        return step(self, xs, ys)

    monkeypatch.setattr(CLTTrainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_clt(subject, corpus, tmp_path / "part", config, progress=False)
    assert (tmp_path / "part.checkpoints" / "clt.pt").exists() and not (tmp_path / "part").exists()
    monkeypatch.setattr(CLTTrainer, "step", step)
    other = CLTTrainConfig(**{**vars(config), "lr": 0.5})
    with pytest.raises(AimriError, match=r"other settings \(lr\)"):
        train_clt(subject, corpus, tmp_path / "part", other, progress=False)
    said: list[str] = []
    resumed = train_clt(subject, corpus, tmp_path / "part", config, progress=False, log=said.append)
    assert resumed["train_last"]["fvu"] == pytest.approx(record["train_last"]["fvu"], rel=1e-4)
    assert said and said[0].startswith("memory estimate") and not (tmp_path / "part.checkpoints").exists()
    again = train_clt(subject, corpus, tmp_path / "part", config, progress=False)
    assert again["cached"] and again["train_last"] == resumed["train_last"]
    with pytest.raises(AimriError, match="one per layer"):
        train_clt(subject, corpus, tmp_path / "w", CLTTrainConfig(widths=[8, 8], tokens=128), progress=False)
    # a skip-CLT with per-layer widths trains and saves its skip term
    skip = CLTTrainConfig(**{**vars(config), "skip": True, "widths": [16, 24, 32], "downstream_windows": 0})
    record = train_clt(subject, corpus, tmp_path / "skip", skip, progress=False)
    saved = load_clt(tmp_path / "skip")
    assert saved.cfg.widths == [16, 24, 32] and saved.W_skip is not None and float(saved.W_skip.abs().sum()) > 0
    assert record["replacement"] is None and all(m["fvu"] < 1 for m in record["layers"].values())


def test_clt_interventions_act_on_every_layer_they_write() -> None:
    """On the exact CLT, scaling a feature equals scaling the same per-layer transcoder feature (its cross-layer
    decoders are zero); on a random CLT, x1 changes nothing and x0 of a layer-0 feature changes the logits
    through its decoders to layers 1 and 2 as well (zeroing those decoders gives another answer)."""
    from aimri.circuits.intervene import Change, intervene

    subject, clt = exact_clt()
    _, tcs = exact_gpt2()
    ids = torch.randint(1, 96, (8,), generator=torch.Generator().manual_seed(5)).tolist()
    x = subject.run(torch.tensor([ids]), read=["mlp.in.0"])["mlp.in.0"][0]
    feature = int(clt.encode(0, x)[5].argmax())
    change = [Change(0, feature, [5], "scale", -3.0)]
    assert intervene(subject, clt, ids, change, k=8) == intervene(subject, tcs, ids, change, k=8)
    llama = tiny_subject("llama")
    random = random_clt(llama)
    x = llama.run(torch.tensor([ids]), read=["mlp.in.0"])["mlp.in.0"][0]
    feature = int(random.encode(0, x)[4].argmax())
    same = intervene(llama, random, ids, [Change(0, feature, [4], "scale", 1.0)], k=5)
    assert same["after"] == same["before"]
    off = intervene(llama, random, ids, [Change(0, feature, None, "scale", 0.0)], k=5)
    with torch.no_grad():
        random.W_dec[0][:, 1:] = 0
    own_only = intervene(llama, random, ids, [Change(0, feature, None, "scale", 0.0)], k=5)
    assert off["after"] != off["before"] and off["after"] != own_only["after"]
    with pytest.raises(AimriError, match="no transcoder for layer 3"):
        intervene(llama, random, ids, [Change(3, 0, None, "scale", 0.0)])


def test_cli_traces_through_a_clt_with_attention_edges(tiny_lm_dir: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    import aimri

    subject = aimri.load(tiny_lm_dir)
    clt = random_clt(subject, width=16)
    clt.cfg.model_name, clt.cfg.model_revision = subject.name, subject.revision
    save_clt(clt, tmp_path / "clt")
    cli = [sys.executable, "-m", "aimri.cli", "trace", tiny_lm_dir, "The lighthouse keeper climbed the",
           "--transcoders", str(tmp_path / "clt"), "--out", str(tmp_path / "g.json"), "--quiet", "--qk-edges", "2",
           "--intervene", "0/3=x0"]  # fmt: skip
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "memory estimate" in said and "linearity check 0.0e+00 (linear)" in said
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["transcoder_kind"] == "cross-layer transcoder" and summary["hessian"] < 1e-6
    assert 0 < summary["replacement_full"] <= 1 and {"before", "after"} <= set(summary["intervention"])
    data = json.loads((tmp_path / "g.json").read_text())
    assert len(data["qk"]) == 2 and data["metadata"]["info"]["hessian"] == summary["hessian"]
    node_ids = {n["node_id"] for n in data["nodes"]}
    for edge in data["qk"]:
        assert edge["source"] in node_ids and edge["target"] in node_ids  # the console finds them by node id
        parts = edge["residual"] + sum(h["weight"] for h in edge["heads"])
        assert parts == pytest.approx(edge["weight"], rel=1e-3, abs=1e-5)  # heads list the top 8 only
        assert "qk" not in edge or edge["qk"]["pairs"]
    assert "Attention-mediated edges" in (tmp_path / "g.html").read_text()
    foreign = CrossLayerTranscoder(CLTConfig(2, subject.d_model, [8, 8]))
    save_clt(foreign, tmp_path / "two")
    bad = subprocess.run([*cli[:7], str(tmp_path / "two"), *cli[8:]], capture_output=True, text=True)
    assert bad.returncode == 2 and "spans 2 layers" in bad.stderr


@pytest.mark.integration
def test_circuit_tracer_reads_our_clt_files(tmp_path: Path) -> None:
    """circuit-tracer's own `load_clt` (its venv, bench/.venvs/circuit_tracer) reads a CLT we saved: its
    encodings equal ours and its decoded layer-2 output matches ours to fp32 rounding."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from common import peer_python

    subject = tiny_subject("llama")
    clt = random_clt(subject)
    clt.cfg.activation = "jumprelu"
    for i in range(3):
        clt.set_threshold(i, torch.rand(24, generator=torch.Generator().manual_seed(i)) * 0.1)
    save_clt(clt, tmp_path / "clt")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    codes = {i: clt.encode(i, x).detach() for i in range(3)}
    torch.save({"x": x, "codes": codes, "recon2": clt.decode(2, codes).detach()}, tmp_path / "ref.pt")
    script = f"""
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
clt = load_clt({str(tmp_path / "clt")!r}, dtype=torch.float32, device=torch.device("cpu"), lazy_decoder=False)
ref = torch.load({str(tmp_path / "ref.pt")!r})
enc = max(float((clt.encode_layer(ref["x"], i) - ref["codes"][i]).abs().max()) for i in range(3))
dec = float((clt.forward(torch.stack([ref["x"]] * 3))[2] - ref["recon2"]).abs().max())
print(enc, dec)
"""
    done = subprocess.run([str(peer_python("circuit_tracer")), "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    enc, dec = (float(v) for v in done.stdout.split())
    assert enc == 0.0 and dec < 1e-4
