"""Dictionaries: sparse-backward exactness, planted-dictionary recovery, exact resume, formats, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aimri.dictionaries import DictionaryConfig, TrainConfig, Trainer, build, fit, load_dictionary, save_dictionary
from aimri.dictionaries.sparse import topk_autoencode
from aimri.errors import AimriError


def _dense_topk(x, W_enc, b_enc, W_dec, b_dec, k):
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = pre.topk(k, -1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ W_dec + b_dec


@pytest.mark.parametrize("encoder_layout", ["d_in-major", "latent-major"])
def test_sparse_backward_equals_dense_autograd(encoder_layout: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, dtype=torch.float64, generator=g).requires_grad_()
    shapes = [(16, 96), (96,), (96, 16), (16,)]
    params = [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes]
    if encoder_layout == "latent-major":  # how Dictionary stores W_enc: the transpose of [d_sae, d_in]
        params[0] = params[0].t().contiguous().t()
    params = [p.requires_grad_() for p in params]
    sparse = topk_autoencode(x, *params, 5, True)[0]
    sparse.pow(2).sum().backward()
    grads = [p.grad.clone() for p in [x, *params]]  # type: ignore[union-attr]
    for p in [x, *params]:
        p.grad = None
    dense = _dense_topk(x, *params, 5)
    dense.pow(2).sum().backward()
    assert torch.allclose(sparse, dense)
    for got, want in zip(grads, [p.grad for p in [x, *params]], strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_blocked_selection_matches_whole_batch() -> None:
    """Wide dictionaries select a block of rows at a time: codes, reconstruction and gradients are the
    same as from one [batch, width] workspace."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 16, generator=g)
    shapes = [(16, 300), (300,), (300, 16), (16,)]
    results = []
    for rows in (50, 7):  # the whole batch at once, then blocks of 7 rows (the last one short)
        params = [
            torch.randn(*s, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, s in enumerate(shapes)
        ]
        recon, vals, idx, _ = topk_autoencode(x, *params, 6, True, torch.empty(rows, 300))
        recon.pow(2).sum().backward()
        results.append((recon.detach(), vals, idx.sort(1).values, [p.grad for p in params]))
    params = [
        torch.randn(*s, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, s in enumerate(shapes)
    ]
    buffers = (torch.zeros(300, 16), torch.zeros(300, 16))  # gradients added in place: W_enc's latent-major
    topk_autoencode(x, *params, 6, True, torch.empty(7, 300), buffers)[0].pow(2).sum().backward()
    assert params[0].grad is None and params[2].grad is None
    assert torch.allclose(buffers[0].t(), results[0][3][0], rtol=1e-4, atol=1e-3)  # summation order only
    assert torch.allclose(buffers[1], results[0][3][2], rtol=1e-4, atol=1e-3)
    (r1, v1, i1, g1), (r2, v2, i2, g2) = results
    assert torch.equal(i1, i2) and torch.allclose(v1, v2) and torch.allclose(r1, r2, atol=1e-4)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)


def test_candidates_choose_like_masking_the_others() -> None:
    """AuxK's two ways of choosing among dead latents (gathered columns, or -inf biases elsewhere) agree."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 16, generator=g)
    W_enc = torch.randn(200, 16, generator=g).t().requires_grad_()
    b_enc = torch.randn(200, generator=g).requires_grad_()
    W_dec, b_dec = torch.randn(200, 16, generator=g).requires_grad_(), torch.zeros(16)
    dead = torch.zeros(200, dtype=torch.bool)
    dead[torch.randperm(200, generator=g)[:30]] = True
    out = []
    for gathered in (True, False):
        buffers = (torch.zeros(200, 16), torch.zeros(200, 16))
        bias = b_enc if gathered else b_enc.masked_fill(~dead, float("-inf"))
        cand = dead.nonzero().squeeze(1) if gathered else None
        recon, _, idx, _ = topk_autoencode(x, W_enc, bias, W_dec, b_dec, 5, False, None, buffers, cand)
        recon.pow(2).sum().backward()
        assert dead[idx].all()
        out.append((recon.detach(), idx.sort(1).values, buffers))
    (r1, i1, b1), (r2, i2, b2) = out
    assert torch.equal(i1, i2) and torch.allclose(r1, r2, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) and a.abs().sum() > 0 for a, b in zip(b1, b2, strict=True))


def test_bf16_selection_keeps_exact_values() -> None:
    """A bfloat16 workspace picks the latents; their values (and so the reconstruction) stay exact fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g) * 3
    W_enc = torch.randn(512, 32, generator=g).t()
    b_enc, W_dec, b_dec = torch.randn(512, generator=g) * 0.1, torch.randn(512, 32, generator=g), torch.zeros(32)
    exact = (x @ W_enc + b_enc).topk(8, dim=-1)
    work = torch.empty(256, 512, dtype=torch.bfloat16)
    recon, vals, idx, _ = topk_autoencode(x, W_enc, b_enc, W_dec, b_dec, 8, True, work)
    assert torch.allclose(vals, (x @ W_enc + b_enc).gather(1, idx).relu(), atol=1e-5)
    assert torch.allclose(recon, torch.zeros(256, 512).scatter(1, idx, vals) @ W_dec + b_dec, atol=1e-4)
    chosen = torch.zeros(256, 512, dtype=torch.bool).scatter(1, idx, True)
    overlap = chosen.gather(1, exact.indices).float().mean()
    assert overlap > 0.95  # only near-ties at the 8th place may differ


def _planted(n_feat: int = 96, d: int = 24, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d_in = torch.randn(n_feat, d, generator=g)
    d_out = torch.randn(n_feat, d, generator=g)
    return d_in / d_in.norm(dim=1, keepdim=True), d_out / d_out.norm(dim=1, keepdim=True)


def _codes(n_feat: int, k: int, batch: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.rand(batch, n_feat, generator=g).argsort(1)[:, :k]
    return torch.zeros(batch, n_feat).scatter_(1, idx, torch.rand(batch, k, generator=g) * 2 + 0.5)


def _sae_batches(
    dictionary: torch.Tensor, k: int, steps: int, batch: int = 1024, seed: int = 1
) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield _codes(len(dictionary), k, batch, g) @ dictionary + 0.3


def _best_cos(planted: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    return (planted @ (learned / learned.norm(dim=1, keepdim=True)).T).max(1).values


def test_sae_recovers_a_planted_dictionary_in_superposition() -> None:
    planted, _ = _planted()  # 96 features in 24 dimensions
    steps = 500
    trainer = Trainer(
        DictionaryConfig("topk", 24, 192, k=3), TrainConfig(steps * 1024, 1024, lr=3e-3, dead_tokens=20_000)
    )
    fit([trainer], _sae_batches(planted, 3, steps), progress=False)
    cos = _best_cos(planted, trainer.export().W_dec.detach())
    assert cos.mean() >= 0.9, cos


def test_transcoder_recovers_a_planted_sparse_map() -> None:
    d_in, d_out = _planted(64, 24)
    g = torch.Generator().manual_seed(2)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(500):
            codes = _codes(64, 3, 1024, g)
            yield codes @ d_in, codes @ d_out

    cfg = DictionaryConfig("topk", 24, 128, d_out=24, k=3, site="mlp.in.0", site_out="mlp.out.0")
    trainer = Trainer(cfg, TrainConfig(500 * 1024, 1024, lr=3e-3, dead_tokens=20_000))
    fit([trainer], batches(), progress=False)
    assert _best_cos(d_out, trainer.export().W_dec.detach()).mean() >= 0.9


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "relu"])
def test_other_architectures_learn(architecture: str) -> None:
    planted, _ = _planted()
    cfg = DictionaryConfig(architecture, 24, 192, k=3 if architecture == "batchtopk" else None)
    trainer = Trainer(cfg, TrainConfig(120 * 512, 512, lr=2e-3))
    first = trainer.step(next(_sae_batches(planted, 3, 1, 512)))["fvu"]
    fit([trainer], _sae_batches(planted, 3, 120, 512, seed=5), progress=False)
    assert trainer.last["fvu"] < 0.5 * first
    model = trainer.export()
    x = next(_sae_batches(planted, 3, 1, 256, seed=9))
    assert torch.isfinite(model(x)).all()


def test_resume_gives_identical_weights(tmp_path: Path) -> None:
    planted, _ = _planted()
    cfg = DictionaryConfig("topk", 24, 192, k=3)
    tcfg = TrainConfig(60 * 256, 256, lr=3e-3, dead_tokens=2_000, checkpoint_every=10)
    whole = Trainer(cfg, tcfg)
    fit([whole], _sae_batches(planted, 3, 60, 256), progress=False)

    class Crash(Exception):
        pass

    def crashing() -> Iterator[torch.Tensor]:
        for i, b in enumerate(_sae_batches(planted, 3, 60, 256)):
            if i == 37:
                raise Crash
            yield b

    with pytest.raises(Crash):
        fit([Trainer(cfg, tcfg)], crashing(), checkpoint_dir=tmp_path, progress=False)
    resumed = Trainer(cfg, tcfg)
    fit([resumed], _sae_batches(planted, 3, 60, 256), checkpoint_dir=tmp_path, progress=False)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_train_from_rows_resumes_to_the_same_weights_and_holds_rows_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkup's diff dictionary trains on rows in memory: interrupted after a checkpoint, a rerun resumes
    to the weights of an uninterrupted run; every 10th row is held out and measured."""
    from aimri.dictionaries.config import DictionarySettings
    from aimri.dictionaries.train import train_from_rows

    planted, _ = _planted()
    rows = torch.cat(list(_sae_batches(planted, 3, 8, 256)))
    settings = DictionarySettings(architecture="batchtopk", width=96, k=3, tokens=40 * 256, batch_size=256)
    whole, _ = train_from_rows(rows, tmp_path / "whole", settings, "resid.1", "m", progress=False, checkpoint_every=10)
    real = Trainer.step

    def crash(self: Trainer, batch: Any) -> Any:
        if self.step_index == 27:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Trainer, "step", crash)
    with pytest.raises(KeyboardInterrupt):
        train_from_rows(rows, tmp_path / "again", settings, "resid.1", "m", progress=False, checkpoint_every=10)
    assert not (tmp_path / "again").exists() and (tmp_path / "again.checkpoints").is_dir()
    monkeypatch.setattr(Trainer, "step", real)
    again, _ = train_from_rows(rows, tmp_path / "again", settings, "resid.1", "m", progress=False, checkpoint_every=10)
    a, b = load_dictionary(whole), load_dictionary(again)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    info = json.loads((whole / "training.json").read_text())
    assert info["heldout_rows"] == len(rows) // 10 + (len(rows) % 10 > 0) and info["heldout_saved"]["fvu"] < 0.5
    with pytest.raises(AimriError, match="fewer than one batch"):
        train_from_rows(rows[:100], tmp_path / "small", settings, "resid.1", "m", progress=False)


def test_export_folds_the_scale_and_round_trips(tmp_path: Path) -> None:
    planted, _ = _planted()
    trainer = Trainer(DictionaryConfig("topk", 24, 192, k=3, site="resid.3"), TrainConfig(20 * 256, 256))
    fit([trainer], (b * 50 for b in _sae_batches(planted, 3, 20, 256)), progress=False)
    x = next(_sae_batches(planted, 3, 1, 64, seed=7)) * 50
    exported = trainer.export()
    with torch.no_grad():
        trainer.model.eval()
        want = trainer.model(x * trainer.scale_in) / trainer.scale_in
        assert torch.allclose(exported(x), want, rtol=1e-4, atol=1e-3)
        loaded = load_dictionary(save_dictionary(exported, tmp_path / "sae"))
        assert torch.equal(loaded.encode(x), exported.encode(x)) and torch.equal(loaded(x), exported(x))


def test_bad_dictionaries(tmp_path: Path) -> None:
    with pytest.raises(AimriError, match="k=300 must be between 1 and the width d_sae=192"):
        build(DictionaryConfig("topk", 24, 192, k=300))
    with pytest.raises(AimriError, match="unknown dictionary architecture 'gated'"):
        build(DictionaryConfig("gated", 24, 192))
    trainer = Trainer(DictionaryConfig("topk", 24, 192, k=3), TrainConfig(1024, 256))
    with pytest.raises(AimriError, match="activations are 32->32 wide but the dictionary expects 24->24"):
        trainer.step(torch.randn(256, 32))
    bad = torch.randn(256, 24)
    bad[3, 4] = float("nan")
    with pytest.raises(AimriError, match="NaN/inf activations"):
        trainer.step(bad)
    path = save_dictionary(build(DictionaryConfig("topk", 24, 192, k=3)), tmp_path / "d")
    weights = path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AimriError, match="sae_weights.safetensors is truncated or corrupted"):
        load_dictionary(path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cfg.json").write_text('{"architecture": "mystery", "d_in": 4, "d_sae": 8}')
    save_dictionary(build(DictionaryConfig("relu", 4, 8)), tmp_path / "y")
    (tmp_path / "x" / "sae_weights.safetensors").write_bytes((tmp_path / "y" / "sae_weights.safetensors").read_bytes())
    with pytest.raises(AimriError, match="unknown architecture 'mystery'"):
        load_dictionary(tmp_path / "x")


def test_mri_train_from_a_store_resumes_and_loads(tiny_lm_dir: str, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.helpers import FIXTURE_TEXT

    import aimri
    from aimri.data.corpus import Corpus
    from aimri.data.harvest import harvest

    subject = aimri.load(tiny_lm_dir)
    store = harvest(
        subject,
        Corpus.from_texts([FIXTURE_TEXT] * 40),
        ["resid.1", "mlp.in.1", "mlp.out.1"],
        tmp_path / "s",
        context=32,
        progress=False,
    )
    base = [
        sys.executable,
        "-m",
        "aimri.cli",
        "train",
        str(tmp_path / "s"),
        "--width",
        "64",
        "--k",
        "4",
        "--batch-size",
        "128",
        "--tokens",
        "6400",
        "--quiet",
    ]
    for extra in (["--site", "resid.1"], ["--site", "mlp.in.1", "--site-out", "mlp.out.1", "--skip"]):
        done = subprocess.run([*base, *extra, "--out", str(tmp_path / extra[1])], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        model = load_dictionary(tmp_path / extra[1])
        assert json.loads((tmp_path / extra[1] / "training.json").read_text())["tokens"] == 6400
        x = torch.from_numpy(store.array(0, extra[1]).copy())
        assert model(x).shape == (len(x), 32)
    again = subprocess.run(
        [*base, "--site", "resid.1", "--out", str(tmp_path / "resid.1")], capture_output=True, text=True
    )
    assert again.returncode == 0  # the finished checkpoint resumes at its last step: nothing to redo
    bad = subprocess.run([*base, "--site", "resid.2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "site 'resid.2' is not in the store" in bad.stderr
    evaluate = [sys.executable, "-m", "aimri.cli", "eval", "--store", str(tmp_path / "s"), "--windows", "0", "--json"]
    refused = subprocess.run([*evaluate, str(tmp_path / "resid.1")], capture_output=True, text=True)
    assert refused.returncode == 2 and "trained on every shard" in refused.stderr  # no held-out rows: no FVU claim
    held = [*base, "--site", "resid.1", "--heldout-shards", "1", "--out", str(tmp_path / "held")]
    assert subprocess.run(held, capture_output=True, text=True).returncode == 0
    report = subprocess.run([*evaluate, str(tmp_path / "held")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    metrics = json.loads(report.stdout.strip().splitlines()[-1])
    assert metrics["heldout_shards"] == [len(store.shards) - 1] and metrics["rows"] == store.shards[-1]["rows"]


def test_mri_train_streams_from_a_model_without_a_store(tiny_lm_dir: str, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tests.helpers import FIXTURE_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(FIXTURE_TEXT * 20)
    cmd = [
        sys.executable, "-m", "aimri.cli", "train", tiny_lm_dir, "--site", "resid.1", "--corpus", str(corpus),
        "--context", "32", "--width", "64", "--k", "4", "--batch-size", "128", "--tokens", "2560", "--quiet",
        "--out", str(tmp_path / "sae"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "sae" / "training.json").read_text())
    assert info["tokens"] == 2560 and info["context"] == 32 and len(info["corpus"]) == 64
    assert load_dictionary(tmp_path / "sae").cfg.site == "resid.1"
    wrong = subprocess.run([*cmd[:6], "resid.9", *cmd[7:]], capture_output=True, text=True)
    assert wrong.returncode == 2 and "resid.9" in wrong.stderr and "Traceback" not in wrong.stderr
    neither = subprocess.run([*cmd[:4], str(tmp_path), *cmd[5:]], capture_output=True, text=True)
    assert neither.returncode == 2 and "neither an activation store" in neither.stderr


@pytest.mark.integration
def test_downstream_metrics_known_answers() -> None:
    """On SmolLM2: an exact dictionary (codes [relu(x), relu(-x)]) recovers 100% of the CE loss with zero
    KL; one that reconstructs nothing recovers 0%."""
    from tests.helpers import FIXTURE_TEXT

    import aimri
    from aimri.data.corpus import Corpus
    from aimri.dictionaries.evaluate import downstream_metrics

    subject = aimri.load("smollm2-135m-instruct")
    d = subject.d_model
    exact = build(DictionaryConfig("relu", d, 2 * d, site="resid.5"))
    with torch.no_grad():  # codes = [relu(x), relu(-x)]; decode recombines: reconstructs x exactly
        exact.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
        exact.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    corpus = Corpus.from_texts([FIXTURE_TEXT] * 3)
    good = downstream_metrics(exact, subject, corpus, context=64, n_windows=4)
    assert good["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4) and good["kl_div"] == pytest.approx(0.0, abs=1e-5)
    useless = build(DictionaryConfig("relu", d, 2 * d, site="resid.5"))
    with torch.no_grad():
        useless.W_dec.zero_()
        useless.b_dec.zero_()
    bad = downstream_metrics(useless, subject, corpus, context=64, n_windows=4)
    assert bad["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4) and bad["kl_div"] > 0.01


def test_transcoders_for_every_layer_in_one_pass(tiny_lm_dir: str, tmp_path: Path) -> None:
    from tests.helpers import FIXTURE_TEXT

    import aimri
    from aimri.data.corpus import Corpus
    from aimri.dictionaries.config import TranscodersConfig
    from aimri.dictionaries.train import train_transcoders

    subject = aimri.load(tiny_lm_dir)
    corpus = Corpus.from_texts([FIXTURE_TEXT] * 30)
    kwargs = dict(width=64, k=4, tokens=256 * 12, batch_size=256, context=32, heldout_every=5)
    config = TranscodersConfig(eval_windows=4, downstream_windows=2, **kwargs)
    metrics = train_transcoders(subject, corpus, tmp_path / "tc", config, progress=False)
    assert sorted(metrics) == [0, 1, 2] and all(m["tokens"] == 256 * 12 for m in metrics.values())
    for layer in range(3):
        tc = load_dictionary(tmp_path / "tc" / f"layer-{layer}")
        assert (tc.cfg.site, tc.cfg.site_out) == (f"mlp.in.{layer}", f"mlp.out.{layer}")
        m = metrics[layer]  # measured on held-out windows, and downstream with the transcoder spliced in
        assert 0 < m["fvu"] < 2 and m["l0"] <= 4 and m["rows"] > 0 and 0 <= m["dead_frac"] <= 1
        assert m["ce_spliced"] > 0 and m["downstream_tokens"] > 0
    saved = json.loads((tmp_path / "tc" / "metrics.json").read_text())
    assert saved["eval_windows"] == 4 and saved["layers"]["1"]["fvu"] == metrics[1]["fvu"]
    stamp = (tmp_path / "tc" / "metrics.json").stat().st_mtime_ns
    again = train_transcoders(subject, corpus, tmp_path / "tc", config, progress=False)
    assert again[2]["fvu"] == metrics[2]["fvu"]  # cached: the same settings neither retrain nor re-evaluate
    assert (tmp_path / "tc" / "metrics.json").stat().st_mtime_ns == stamp
    # the first dictionary matches one trained alone on the same stream: one pass feeds each its own sites
    alone = train_transcoders(
        subject, corpus, tmp_path / "one", TranscodersConfig(layers=[0], **kwargs), progress=False
    )
    assert alone[0]["train_fvu"] == pytest.approx(metrics[0]["train_fvu"], rel=1e-5)


def test_heldout_windows_are_never_trained_on(tiny_lm_dir: str) -> None:
    from tests.helpers import FIXTURE_TEXT

    import aimri
    from aimri.data.corpus import Corpus, Packing, pack
    from aimri.dictionaries.stream import heldout_windows, training_windows

    tokenizer, corpus = aimri.load(tiny_lm_dir).tokenizer, Corpus.from_texts([FIXTURE_TEXT] * 30)
    every = [tuple(w.ids) for w in pack(corpus, tokenizer, Packing.for_tokenizer(tokenizer, 32))]
    trained = [tuple(w.ids) for w in training_windows(tokenizer, corpus, 32, heldout_every=4)]
    held = [tuple(w.ids) for w in heldout_windows(tokenizer, corpus, 32, 4, n=10_000)]
    assert len(trained) + len(held) == len(every) and len(held) == len(every) // 4
    assert held == every[3::4] and trained == [w for i, w in enumerate(every) if i % 4 != 3]


def test_crosscoder_finds_the_concepts_a_finetune_added() -> None:
    """Two synthetic 'models' share 48 features; the second also has 16 of its own. The crosscoder's
    latents for those 16 have almost all their decoder norm in source 1 (model diffing's known answer)."""
    from aimri.dictionaries.architectures import Crosscoder

    g = torch.Generator().manual_seed(4)
    d, shared, added = 24, 48, 16
    base = torch.randn(shared + added, d, generator=g)
    tuned = base + 0.1 * torch.randn(shared + added, d, generator=g)
    base[shared:] = 0  # the added concepts do not exist in the base model
    base_dirs = base / base.norm(dim=1, keepdim=True).clamp_min(1e-9)
    tuned_dirs = tuned / tuned.norm(dim=1, keepdim=True)

    def batches() -> Iterator[torch.Tensor]:
        for _ in range(600):
            codes = _codes(shared + added, 3, 1024, g)
            yield torch.cat([codes @ base_dirs, codes @ tuned_dirs], dim=1)

    cfg = DictionaryConfig("crosscoder", 2 * d, 128, k=3, extra={"sources": 2})
    trainer = Trainer(cfg, TrainConfig(600 * 1024, 1024, lr=3e-3, dead_tokens=20_000))
    fit([trainer], batches(), progress=False)
    model = trainer.export()
    assert isinstance(model, Crosscoder)
    dec = model.W_dec.detach()[:, d:]  # source-1 decoders
    match = (tuned_dirs[shared:] @ (dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-9)).T).argmax(1)
    rel = model.relative_norm(1).detach()
    assert rel[match].mean() > 0.9  # the added concepts' latents live in the fine-tune only
    shared_match = (tuned_dirs[:shared] @ (dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-9)).T).argmax(1)
    assert 0.3 < rel[shared_match].mean() < 0.7  # shared concepts are shared


def test_paired_batches_need_the_same_tokenizer(tiny_lm_dir: str) -> None:
    from tests.helpers import FIXTURE_TEXT

    import aimri
    from aimri.data.corpus import Corpus
    from aimri.dictionaries.stream import paired_batches

    a, b = aimri.load(tiny_lm_dir), aimri.load(tiny_lm_dir)
    with torch.no_grad():
        b.layer(0).mlp.up_proj.weight.mul_(1.5)
    batch = next(
        paired_batches(
            [a, b], Corpus.from_texts([FIXTURE_TEXT] * 20), "resid.1", batch_size=64, context=32, buffer_rows=256
        )
    )
    assert batch.shape == (64, 2 * a.d_model) and not torch.allclose(batch[:, : a.d_model], batch[:, a.d_model :])
    b.tokenizer = type(a.tokenizer).from_pretrained(tiny_lm_dir)
    b.tokenizer.add_tokens(["<extra>"])
    with pytest.raises(AimriError, match="different tokenizers"):
        next(paired_batches([a, b], Corpus.from_texts([FIXTURE_TEXT]), "resid.1"))


def test_eval_refuses_a_site_the_dictionary_was_not_trained_on(tiny_lm_dir: str, tmp_path: Path) -> None:
    from tests.helpers import FIXTURE_TEXT

    import aimri
    from aimri.data.corpus import Corpus
    from aimri.data.harvest import harvest
    from aimri.dictionaries.evaluate import reconstruction_metrics

    store = harvest(
        aimri.load(tiny_lm_dir),
        Corpus.from_texts([FIXTURE_TEXT] * 4),
        ["resid.1"],
        tmp_path / "s",
        context=32,
        progress=False,
    )
    with pytest.raises(AimriError, match="trained on 'resid.2', which the store .* lacks"):
        reconstruction_metrics(build(DictionaryConfig("topk", 32, 64, k=4, site="resid.2")), store)
    with pytest.raises(AimriError, match="store resid.1 is 32 wide, the dictionary expects d_in=16"):
        reconstruction_metrics(build(DictionaryConfig("topk", 16, 64, k=4, site="resid.1")), store)
    fine = reconstruction_metrics(build(DictionaryConfig("topk", 32, 64, k=4, site="resid.1")), store)
    assert fine["l0"] <= 4 and 0 <= fine["dead_frac"] <= 1 and sum(fine["density_log10_hist"]["counts"]) > 0


def test_cli_crosscoder_on_two_tiny_models(tiny_lm_dir: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    corpus = tmp_path / "c.txt"
    from tests.helpers import FIXTURE_TEXT

    corpus.write_text(FIXTURE_TEXT * 30)
    cmd = [sys.executable, "-m", "aimri.cli", "train-crosscoder", tiny_lm_dir, tiny_lm_dir, "--site", "resid.1", "--width", "64",
           "--k", "4", "--tokens", "1024", "--batch-size", "256", "--context", "32", "--corpus", str(corpus), "--out", str(tmp_path / "cc"), "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cc = load_dictionary(tmp_path / "cc")
    assert cc.architecture == "crosscoder" and cc.cfg.d_in == 64


def test_dead_latent_counters_and_auxk() -> None:
    planted, _ = _planted()
    trainer = Trainer(DictionaryConfig("topk", 24, 192, k=3), TrainConfig(10 * 256, 256, dead_tokens=600))
    with torch.no_grad():
        trainer.model.b_enc[:100] = -1e4  # these latents can never win the top-k
    batches = _sae_batches(planted, 3, 4, 256)
    first = trainer.step(next(batches))
    assert first["auxk"] == 0.0 and first["dead_frac"] == 0.0  # nobody is dead after 256 tokens
    trainer.step(next(batches))
    third = trainer.step(next(batches))  # 768 tokens silent > 600: dead, and AuxK now trains them
    assert (
        bool((trainer.since_fired[:100] == 768).all()) and third["dead_frac"] >= 100 / 192 - 1e-6 and third["auxk"] > 0
    )
    assert bool((trainer.since_fired[100:] < 768).any())
