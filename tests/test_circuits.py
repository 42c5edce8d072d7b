"""The local replacement model on tiny random models: logits exactly the model's, error nodes exactly zero
when the transcoders are the MLPs themselves, frozen attention and norms in the backward."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tests.helpers import random_transcoders, tiny_subject

from aimri import Subject
from aimri.circuits.replacement import ReplacementModel
from aimri.dictionaries.base import DictionaryConfig, build
from aimri.dictionaries.match import prompt_ids
from aimri.errors import AimriError


def exact_gpt2() -> tuple[Subject, dict]:
    """A GPT-2 with ReLU MLPs: each MLP *is* a ReLU transcoder (c_fc = encoder, c_proj = decoder)."""
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=128, activation_function="relu")
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    subject = Subject(model, None, name="tiny-gpt2-relu", revision="relu")
    transcoders = {}
    for layer, block in enumerate(model.transformer.h):
        tc = build(DictionaryConfig("relu", 32, 128, d_out=32, site=f"mlp.in.{layer}", site_out=f"mlp.out.{layer}"))
        with torch.no_grad():
            tc.W_enc.copy_(block.mlp.c_fc.weight)
            tc.b_enc.copy_(block.mlp.c_fc.bias)
            tc.W_dec.copy_(block.mlp.c_proj.weight)
            tc.b_dec.copy_(block.mlp.c_proj.bias)
        transcoders[layer] = tc
    return subject, transcoders


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen3", "gpt_neox"])
def test_replacement_reproduces_the_logits_exactly(arch: str) -> None:
    subject = tiny_subject(arch)
    ids = torch.randint(1, 96, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = subject.model(input_ids=ids[None]).logits[0]
    replaced = ReplacementModel(subject, random_transcoders(subject)).run(ids)
    assert torch.allclose(replaced.logits, plain, atol=1e-5, rtol=0)
    assert set(replaced.codes) == set(range(subject.n_layers))
    assert all(
        float(e.detach().abs().max()) > 1e-3 for e in replaced.errors.values()
    )  # random transcoders: real errors
    replaced.logits[-1, 5].backward()
    assert replaced.codes[0].grad is not None and replaced.embeddings.grad is not None


def test_exact_transcoders_leave_zero_error_nodes() -> None:
    subject, transcoders = exact_gpt2()
    ids = torch.randint(1, 96, (10,), generator=torch.Generator().manual_seed(2))
    replaced = ReplacementModel(subject, transcoders).run(ids)
    assert max(float(e.detach().abs().max()) for e in replaced.errors.values()) < 1e-5


def test_frozen_pattern_and_norms_make_the_pass_linear() -> None:
    """Frozen patterns and norm denominators make the logits a linear map of the leaves (a bias-free Llama,
    transcoders with b_dec = 0): by Euler's identity a logit equals the sum of gradient x value over the
    embeddings, every feature activation and every error node, i.e. the direct effects add up to it."""
    subject = tiny_subject("llama")
    transcoders = random_transcoders(subject)
    for tc in transcoders.values():
        torch.nn.init.zeros_(tc.b_dec)
    ids = torch.randint(1, 96, (9,), generator=torch.Generator().manual_seed(3))
    replaced = ReplacementModel(subject, transcoders).run(ids)
    leaves = [replaced.embeddings, *replaced.codes.values(), *replaced.errors.values()]
    target = replaced.logits[-1, 7]
    grads = torch.autograd.grad(target, leaves)
    total = sum(float((g * leaf).sum()) for g, leaf in zip(grads, leaves, strict=True))
    assert total == pytest.approx(float(target), rel=1e-4, abs=1e-5)
    assert abs(float(target)) > 1e-3  # a logit far from zero, so the identity is not trivially 0 = 0


def test_incomplete_or_foreign_transcoders_are_named() -> None:
    subject = tiny_subject("llama")
    transcoders = random_transcoders(subject)
    del transcoders[1]
    with pytest.raises(AimriError, match=r"layers \[1\] have none"):
        ReplacementModel(subject, transcoders)
    foreign = random_transcoders(subject)
    foreign[0] = build(DictionaryConfig("relu", 64, 16, d_out=64, site="mlp.in.0", site_out="mlp.out.0"))
    with pytest.raises(AimriError, match="another model"):
        ReplacementModel(subject, foreign)
    with pytest.raises(AimriError, match="empty"):
        ReplacementModel(subject, random_transcoders(subject)).run(torch.tensor([], dtype=torch.long))


def test_graph_rows_add_up_to_their_targets() -> None:
    """Bias-free Llama, transcoders with b_dec = 0: every logit node's incoming edges sum to its demeaned
    logit and every feature's to its pre-activation minus b_enc (the graph is complete, and exact)."""
    from aimri.circuits.attribution import attribute

    subject = tiny_subject("llama")
    transcoders = random_transcoders(subject, width=24)
    for tc in transcoders.values():
        torch.nn.init.zeros_(tc.b_dec)
    model = ReplacementModel(subject, transcoders)
    ids = torch.randint(1, 96, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    graph = attribute(model, ids, max_feature_nodes=10_000, batch_size=16, progress=False, constant_positions=0)
    assert bool(graph.expanded[: graph.n_features].all()) and graph.n_features > 20
    with torch.no_grad():
        logits = subject.model(input_ids=torch.tensor([ids])).logits[0, -1]
    for j, token in enumerate(graph.logit_tokens):
        _, w = graph.row(graph.logit_start + j)
        assert float(w.sum()) == pytest.approx(float(logits[token] - logits.mean()), rel=1e-4, abs=1e-4)
    acts = subject.run(torch.tensor([ids]), read=[f"mlp.in.{layer}" for layer in range(subject.n_layers)])
    for node in torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[:15].tolist():
        layer, pos, idx = graph.features[node].tolist()
        pre = (acts[f"mlp.in.{layer}"][0, pos] @ transcoders[layer].W_enc[:, idx]).detach()
        sources, w = graph.row(node)
        assert float(w.sum()) == pytest.approx(float(pre), rel=1e-4, abs=1e-4)
        assert all(graph.kind(s) != "logit" for s in sources.tolist())
    # causality: no edge from a later position, and none from a feature at the same or a later layer
    for t, s in zip(graph.edge_targets.tolist(), graph.edge_sources.tolist(), strict=True):
        if t < graph.n_features and s < graph.n_features:
            assert graph.features[s, 0] < graph.features[t, 0] and graph.features[s, 1] <= graph.features[t, 1]


def test_constant_positions_have_no_nodes() -> None:
    """The leading positions are held constant (circuit-tracer's BOS): no feature there, no edge from their
    error nodes; their token embeddings stay sources."""
    from aimri.circuits.attribution import attribute

    subject = tiny_subject("llama")
    model = ReplacementModel(subject, random_transcoders(subject, width=24))
    ids = torch.randint(1, 96, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    free = attribute(model, ids, max_feature_nodes=8, progress=False, constant_positions=0)
    held = attribute(model, ids, max_feature_nodes=8, progress=False, constant_positions=2)
    assert bool((free.features[:, 1] < 2).any()) and not bool((held.features[:, 1] < 2).any())
    error_pos = lambda g, s: (s - g.error_start) % g.n_pos  # noqa: E731
    for graph, has in ((free, True), (held, False)):
        s = graph.edge_sources
        from_early_errors = (s >= graph.error_start) & (s < graph.embed_start) & (error_pos(graph, s) < 2)
        assert bool(from_early_errors.any()) == has
        assert bool((graph.edge_sources == graph.embed_start).any())  # the first token's embedding
    assert held.meta["constant_positions"] == 2
    with pytest.raises(AimriError, match="constant_positions"):
        attribute(model, ids, progress=False, constant_positions=6)


def test_pruning_and_scores() -> None:
    from aimri.circuits.attribution import attribute
    from aimri.circuits.prune import prune, supernodes

    subject, transcoders = exact_gpt2()
    ids = torch.randint(1, 96, (6,), generator=torch.Generator().manual_seed(5)).tolist()
    exact = attribute(ReplacementModel(subject, transcoders), ids, max_feature_nodes=10_000, progress=False)
    full = prune(exact, 1.0, 1.0)
    assert full.replacement_full == pytest.approx(1.0) and full.completeness_full == pytest.approx(1.0)  # no error mass
    # features never expanded are outside the graph, as in circuit-tracer: not counted as error either
    partial = attribute(ReplacementModel(subject, transcoders), ids, max_feature_nodes=4, progress=False)
    assert int(partial.expanded[: partial.n_features].sum()) == 4 < partial.n_features
    assert prune(partial, 1.0, 1.0).replacement_full == pytest.approx(1.0)

    llama = tiny_subject("llama")
    graph = attribute(
        ReplacementModel(llama, random_transcoders(llama, width=24)), ids, max_feature_nodes=10_000, progress=False
    )
    pruned = prune(graph, 0.8, 0.98)
    assert 0 < pruned.replacement_full < 1 and 0 < pruned.completeness_full < 1
    assert (
        pruned.replacement <= pruned.replacement_full + 1e-6 and pruned.completeness <= pruned.completeness_full + 1e-6
    )
    kept_features = int(pruned.node_mask[: graph.n_features].sum())
    assert 0 < kept_features < graph.n_features and bool(pruned.node_mask[graph.embed_start :].all())
    loose = prune(graph, 0.5, 0.5)
    assert int(loose.node_mask.sum()) <= int(pruned.node_mask.sum()) and int(loose.edge_mask.sum()) <= int(
        pruned.edge_mask.sum()
    )
    for bad in (0.0, 1.5):
        with pytest.raises(AimriError, match=r"\(0, 1\]"):
            prune(graph, bad, 0.9)
    decoders = {layer: tc.W_dec.detach() for layer, tc in random_transcoders(llama, width=24).items()}
    kept = pruned.node_mask.nonzero().flatten().tolist()
    labels = {i: "same" for i in kept[:2] if i < graph.n_features}
    groups = supernodes(graph, pruned.node_mask, decoders, labels, cosine=0.99)
    assert len(labels) < 2 or any(set(labels) <= set(g) for g in groups)


def test_graph_interventions_scale_and_set_features() -> None:
    from aimri.circuits.intervene import intervene, parse_change

    subject, transcoders = exact_gpt2()
    ids = torch.randint(1, 96, (6,), generator=torch.Generator().manual_seed(6)).tolist()
    assert parse_change("2/17@3,5=x-2") == parse_change("2/17@3,5=x-2.0")
    change = parse_change("2/17@5=x1")
    assert (change.layer, change.index, change.positions, change.mode, change.value) == (2, 17, [5], "scale", 1.0)
    same = intervene(subject, transcoders, ids, [change])
    assert same["before"] == same["after"]  # x1 is no change
    acts = subject.run(torch.tensor([ids]), read=["mlp.in.2"])["mlp.in.2"][0, -1]
    busiest = int(transcoders[2].encode(acts).argmax())
    moved = intervene(subject, transcoders, ids, [parse_change(f"2/{busiest}@5=x-20")])
    assert moved["before"] != moved["after"]
    # "set" at the last position equals a direct edit of the MLP output by (value - a) * W_dec
    a = float(transcoders[2].encode(acts)[busiest].detach())
    out = intervene(subject, transcoders, ids, [parse_change(f"2/{busiest}@5=0")], k=3)
    edit = {
        "mlp.out.2": lambda x: (
            x - torch.where(torch.arange(6)[None, :, None] == 5, a * transcoders[2].W_dec[busiest], 0)
        )
    }
    probs = subject.run(torch.tensor([ids]), edit=edit, stop=False)["logits"][0, -1].softmax(-1)
    assert [p for _, p in out["after"]] == pytest.approx(probs.topk(3).values.tolist(), rel=1e-4)
    for bad in ("2/17", "2/9999=1", "2/1@99=1", "9/1=1"):
        with pytest.raises(AimriError):
            intervene(subject, transcoders, ids, [parse_change(bad)])


def test_cli_trace_writes_graph_json_and_html(tiny_lm_dir: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    import aimri
    from aimri.dictionaries.formats import save_dictionary

    subject = aimri.load(tiny_lm_dir)
    for layer, tc in random_transcoders(subject, width=24).items():
        save_dictionary(tc, tmp_path / "tcs" / f"layer-{layer}")
    cli = [sys.executable, "-m", "aimri.cli", "trace", tiny_lm_dir, "The lighthouse keeper climbed the",
           "--transcoders", str(tmp_path / "tcs"), "--out", str(tmp_path / "g" / "graph.json"), "--quiet"]  # fmt: skip
    done = subprocess.run([*cli, "--intervene", "1/3=x-2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["features_expanded"] > 0 and 0 < summary["replacement_full"] <= 1
    assert {"before", "after"} <= set(summary["intervention"])
    data = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(data)
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds and data["metadata"]["prompt_tokens"][:2] == ["<|endoftext|>", "The"]
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert (tmp_path / "g" / "graph.html").read_text().startswith("<!doctype html>")
    (tmp_path / "tcs" / "layer-1" / "cfg.json").unlink()
    incomplete = subprocess.run(cli, capture_output=True, text=True)
    assert incomplete.returncode == 2 and "layers [1]" in incomplete.stderr
    bad = subprocess.run([*cli[:-1], "--node-threshold", "1.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "(0, 1]" in bad.stderr


@pytest.mark.integration
def test_replacement_on_the_default_model_is_exact_and_attributes() -> None:
    """SmolLM2 with a (random, untrained) transcoder at all 30 layers: the replacement's logits are the
    model's, and the graph's logit rows are built from every kind of node."""
    import aimri
    from aimri.circuits.attribution import attribute

    subject = aimri.load()
    model = ReplacementModel(subject, random_transcoders(subject, width=64))
    ids = subject.tokenizer("The capital of the state containing Dallas is")["input_ids"]
    with torch.no_grad():
        plain = subject.model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(model.run(torch.tensor(ids)).logits, plain, atol=1e-4, rtol=0)
    assert subject.tokenizer.decode([int(plain[-1].argmax())]) == " Texas"
    graph = attribute(model, ids, max_feature_nodes=16, batch_size=16, progress=False)
    sources, _ = graph.row(graph.logit_start)
    kinds = {graph.kind(s) for s in sources.tolist()}
    assert kinds == {"feature", "error", "embedding"} and graph.meta["features_expanded"] == 16
    # a text prompt opens as the harvest's windows do (<|endoftext|>, which SmolLM2's tokenizer does not add):
    # the BOS is the attention sink, and the prompt's first word is an ordinary position with nodes
    opened = prompt_ids(subject.tokenizer, "The capital of the state containing Dallas is", model.transcoders.values())
    assert opened == [subject.tokenizer.convert_tokens_to_ids("<|endoftext|>"), *ids]
    bare = subject.run(torch.tensor([ids]), read=["resid.15"])["resid.15"][0].norm(dim=-1)
    norms = subject.run(torch.tensor([opened]), read=["resid.15"])["resid.15"][0].norm(dim=-1)
    assert bare[0] > 20 * bare[1:].median()  # bare: the first word is the sink
    assert norms[0] > 20 * norms[2:].median() and norms[1] < 3 * norms[2:].median()


@pytest.mark.integration
def test_factual_path_on_the_default_model() -> None:
    """SmolLM2 with its trained transcoders (all 30 layers; AIMRI_TRANSCODERS or the default run folder):
    "The capital of the state containing Dallas is" -> " Texas". The most influential feature at " Dallas"
    reads Dallas (in other sentences it fires most strongly on " Dallas"); scaling the three most influential
    features there x-2 moves the answer off the top, and scaling three random active features there that
    pruning dropped (five draws) does not."""
    import importlib.util
    import os
    import sys
    from pathlib import Path

    import aimri
    from aimri.circuits.replacement import load_transcoders

    root = Path(__file__).resolve().parents[1]
    from aimri.run import Run

    folder = Path(
        os.environ.get("AIMRI_TRANSCODERS", Run.for_model("smollm2-135m-instruct", root / "runs").transcoders)
    )
    if not (folder / "layer-29" / "cfg.json").exists():
        pytest.skip(f"no trained transcoders at {folder}: `mri train-transcoders --tokens 600000` makes them (~1.5 h)")
    sys.path.insert(0, str(root / "bench"))
    spec = importlib.util.spec_from_file_location("bench_trace", root / "bench" / "trace.py")  # not stdlib `trace`
    assert spec is not None and spec.loader is not None
    bench_trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_trace)  # the same check `bench/trace.py --json` reports

    subject = aimri.load()
    result = bench_trace.factual_path(subject, load_transcoders(folder, subject))
    print(result)
    assert result["top_logits"][0][0] == " Texas"
    assert all(r["strongest_token"] == " Dallas" and r["activation"] > 0 for r in result["readings"]), result
    assert result["answer_rank_after_ablation"] >= 1, result
    assert result["answer_rank_after_controls"] == [0] * 5, result


@pytest.mark.integration
def test_edges_agree_with_circuit_tracer(tiny_lm_dir: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same tiny Llama, TopK transcoders and prompt through circuit-tracer's nnsight backend (its own
    venv, bench/.venvs/circuit_tracer): the top logit's incoming edges from the features it selected and from
    the token embeddings equal ours."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import aimri
    from aimri.circuits.attribution import attribute
    from aimri.dictionaries.formats import save_dictionary

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from common import peer_python

    subject = aimri.load(tiny_lm_dir)
    torch.manual_seed(7)
    transcoders = {}
    for layer in range(subject.n_layers):
        tc = build(DictionaryConfig("topk", 32, 24, d_out=32, k=4, site=f"mlp.in.{layer}", site_out=f"mlp.out.{layer}"))
        with torch.no_grad():
            tc.b_enc.fill_(2.0)  # top-k pre-activations positive: its TopK keeps sign, ours clips at 0
        save_dictionary(tc, tmp_path / "tcs" / f"layer-{layer}")
        transcoders[layer] = tc
    ids = [subject.tokenizer.bos_token_id, *subject.tokenizer(" The lighthouse keeper climbed the")["input_ids"]]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    python = peer_python("circuit_tracer", log=lambda m: None)
    done = subprocess.run(
        [str(python), str(root / "bench" / "peers" / "circuit_tracer_trace.py"), tiny_lm_dir, str(tmp_path / "tcs"),
         str(tmp_path / "ids.json"), "16", str(tmp_path / "ct.json")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "ct.json").read_text())
    assert theirs["tokens"] == ids
    graph = attribute(ReplacementModel(subject, transcoders), ids, max_feature_nodes=16, progress=False)
    sources, weights = graph.row(graph.logit_start)
    ours = dict(zip(sources.tolist(), weights.tolist(), strict=True))
    index = {"_".join(map(str, f)): i for i, f in enumerate(graph.features.tolist())}
    pairs = [(ours.get(index[k], 0.0), w) for k, w in theirs["feature_edges"].items() if k in index]
    pairs += [(ours.get(graph.embed_start + p, 0.0), w) for p, w in enumerate(theirs["embed_edges"])]
    assert len(pairs) > 10
    scale = max(abs(b) for _, b in pairs)
    assert max(abs(a - b) for a, b in pairs) < 1e-3 * scale
