"""ActivationStore and harvest on a tiny real model directory: exact rows, resume after kill -9, bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import FIXTURE_TEXT

import aimri
from aimri.data.corpus import Corpus, Packing, pack
from aimri.data.harvest import harvest
from aimri.data.store import ActivationStore, StoreWriter
from aimri.errors import AimriError, CorpusError, SiteError, StoreError

SITES = ["resid.1", "mlp.out.0"]


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    lines = FIXTURE_TEXT.strip().splitlines()
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(lines[i % 5 :] + lines[: i % 5]), "source": f"s{i % 3}"}) + "\n")
    return path


def _harvest(model_dir: str, corpus: Path, out: Path, **kw) -> ActivationStore:
    subject = aimri.load(model_dir)
    kw = {"context": 32, "batch_size": 4, "windows_per_shard": 8, "progress": False, **kw}
    return harvest(subject, Corpus.from_paths([corpus]), SITES, out, **kw)


def test_store_holds_exactly_the_tapped_rows(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path) -> None:
    store = _harvest(tiny_lm_dir, corpus_file, tmp_path / "store")
    assert store.complete and store.verify() == [] and len(store.shards) > 2
    subject = aimri.load(tiny_lm_dir)
    packing = Packing.for_tokenizer(subject.tokenizer, 32)
    windows = list(pack(Corpus.from_paths([corpus_file]), subject.tokenizer, packing))
    ids = torch.from_numpy(np.stack([w.ids for w in windows]))
    att = torch.from_numpy(np.stack([w.attention for w in windows])).long()
    valid = torch.from_numpy(np.stack([w.valid for w in windows]))
    ref = subject.run(ids, att, read=SITES)
    for site in SITES:
        got = np.concatenate(list(store.activations(site)))
        assert np.allclose(got, ref[site][valid].numpy(), atol=1e-5)
    tokens = np.concatenate([store.array(i, "tokens") for i in range(len(store.shards))])
    assert np.array_equal(tokens, ids[valid].numpy())
    assert store.rows == int(valid.sum()) and 0 not in np.concatenate(
        [store.array(i, "offset") for i in range(len(store.shards))]
    )


def test_shuffled_batches_cover_every_row_once(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path) -> None:
    store = _harvest(tiny_lm_dir, corpus_file, tmp_path / "store")
    batches = list(store.batches("resid.1", 50, shuffle=True, seed=3, shards_per_buffer=2))
    got = torch.cat(batches).numpy()
    ref = np.concatenate(list(store.activations("resid.1")))
    assert got.shape == ref.shape
    assert not np.array_equal(got, ref)  # shuffled
    assert np.array_equal(np.sort(got, axis=0), np.sort(ref, axis=0))
    with pytest.raises(StoreError, match="not in the store"):
        next(iter(store.batches("resid.9", 4)))


def _kill_script() -> str:
    # a harvest through the real CLI, slowed after each shard so the test can kill it mid-run
    return (
        "import time, aimri.data.store as s\n"
        "orig = s.StoreWriter.write_shard\n"
        "def slow(self, *a, **k):\n    orig(self, *a, **k); time.sleep(0.15)\n"
        "s.StoreWriter.write_shard = slow\n"
        "from aimri.cli import main\nmain()\n"
    )


def test_resume_after_kill_is_identical(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path) -> None:
    ref = _harvest(tiny_lm_dir, corpus_file, tmp_path / "ref")
    out = tmp_path / "killed"
    args = ["harvest", tiny_lm_dir, "--site", SITES[0], "--site", SITES[1], "--corpus", str(corpus_file), "--out", str(out),
            "--context", "32", "--batch-size", "4", "--windows-per-shard", "8", "--max-tokens", "0", "--quiet"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", _kill_script(), *args], env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = out / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = ActivationStore(out)
    assert not partial.complete and 2 <= len(partial.shards) < len(ref.shards)
    (out / ".shard-000099.tmp").mkdir()  # debris a crash can leave
    rc = subprocess.run([sys.executable, "-m", "aimri.cli", *args], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    resumed = ActivationStore(out)
    assert resumed.complete and resumed.verify() == []
    assert [s["files"] for s in resumed.shards] == [s["files"] for s in ref.shards]  # identical checksums
    assert not (out / ".shard-000099.tmp").exists()


def test_resume_with_other_settings_is_refused(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path) -> None:
    _harvest(tiny_lm_dir, corpus_file, tmp_path / "store", max_tokens=64)
    with pytest.raises(StoreError, match=r"different settings \(.*context"):
        _harvest(tiny_lm_dir, corpus_file, tmp_path / "store", max_tokens=64, context=16)
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_lm_dir, other_model)
    retrained = aimri.load(other_model)
    with torch.no_grad():
        retrained.layer(0).mlp.up_proj.weight.mul_(1.01)
    retrained.model.save_pretrained(other_model)
    with pytest.raises(StoreError, match="model.revision: store has"):
        _harvest(str(other_model), corpus_file, tmp_path / "store", max_tokens=64)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a different corpus entirely"}) + "\n")
    with pytest.raises(StoreError, match="corpus.fingerprint"):
        _harvest(tiny_lm_dir, other, tmp_path / "store", max_tokens=64)


def test_corrupted_and_truncated_files_are_named(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path) -> None:
    store = _harvest(tiny_lm_dir, corpus_file, tmp_path / "store")
    shard = tmp_path / "store" / "shard-000001" / "resid.1.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    problems = store.verify()
    assert len(problems) == 1 and "shard-000001/resid.1.npy" in problems[0] and "truncated" in problems[0]
    with pytest.raises(StoreError, match=r"shard-000001/resid.1.npy is truncated"):
        store.array(1, "resid.1")
    other = tmp_path / "store" / "shard-000002" / "tokens.npy"
    raw = bytearray(other.read_bytes())
    raw[-1] ^= 0xFF
    other.write_bytes(bytes(raw))
    assert any("shard-000002/tokens.npy: checksum mismatch" in p for p in store.verify())
    rc = subprocess.run(
        [sys.executable, "-m", "aimri.cli", "store", "verify", str(tmp_path / "store")], capture_output=True, text=True
    )
    assert rc.returncode == 1 and "shard-000001/resid.1.npy" in rc.stderr
    (tmp_path / "store" / "manifest.json").write_text('{"format": "aimri.activation_st')
    with pytest.raises(StoreError, match=r"manifest.json is truncated or corrupted"):
        ActivationStore(tmp_path / "store")


def test_disk_full_keeps_finished_shards(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path, monkeypatch) -> None:
    real_save = np.save
    calls = {"n": 0}

    def failing_save(f, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] > 14:  # 7 files per shard: fail inside the third shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(StoreError, match=r"disk full while writing shard-000002 .* the 2 finished shards are kept"):
        _harvest(tiny_lm_dir, corpus_file, tmp_path / "store")
    monkeypatch.setattr(np, "save", real_save)
    partial = ActivationStore(tmp_path / "store")
    assert len(partial.shards) == 2 and partial.verify() == []
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".shard")]
    assert _harvest(tiny_lm_dir, corpus_file, tmp_path / "store").complete


def test_bad_requests_write_nothing(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="has no text"):
        _harvest(tiny_lm_dir, empty, tmp_path / "a")
    with pytest.raises(SiteError, match="Did you mean"):
        harvest(aimri.load(tiny_lm_dir), Corpus.from_paths([corpus_file]), ["resid_1"], tmp_path / "b", progress=False)
    with pytest.raises(AimriError, match="exceeds the model's 128 positions"):
        _harvest(tiny_lm_dir, corpus_file, tmp_path / "c", context=4096)
    assert not any((tmp_path / n).exists() for n in "abc")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="exists and is not an activation store"):
        _harvest(tiny_lm_dir, corpus_file, tmp_path / "d")


def test_second_writer_is_refused(tiny_lm_dir: str, tmp_path: Path) -> None:
    spec = {"sites": ["resid.0"]}
    first = StoreWriter(tmp_path / "s", spec)
    with (
        first.locked(),
        pytest.raises(StoreError, match="being written by another process"),
        StoreWriter(tmp_path / "s", spec).locked(),
    ):
        pass


def test_nan_activations_are_refused(tiny_lm_dir: str, corpus_file: Path, tmp_path: Path) -> None:
    subject = aimri.load(tiny_lm_dir)
    with torch.no_grad():
        subject.layer(0).mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(AimriError, match="NaN/inf at resid.1 in shard 0"):
        harvest(subject, Corpus.from_paths([corpus_file]), ["resid.1"], tmp_path / "s", context=32, progress=False)
