"""Loading paths that need no real model: local directories, the HF cache, bad files, bad names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aimri
from aimri.errors import AimriError


def test_local_directory(tiny_lm_dir: str) -> None:
    subject = aimri.load(tiny_lm_dir)
    assert subject.n_layers == 3 and subject.tokenizer is not None
    assert len(subject.revision) == 64 and aimri.load(tiny_lm_dir).revision == subject.revision


def test_hub_id_from_local_cache(tiny_lm_dir: str, tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--aimri-test--tiny"
    shutil.copytree(tiny_lm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # huggingface_hub reads its cache location at import: load in a fresh interpreter
    code = (
        "import aimri, torch; s = aimri.load('aimri-test/tiny'); "
        "print(s.revision, s.run(torch.tensor([[5, 6, 7]]), stop=False)['logits'].sum().item())"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    expected = aimri.load(tiny_lm_dir).run(torch.tensor([[5, 6, 7]]), stop=False)["logits"].sum().item()
    assert out[0] == commit and float(out[1]) == pytest.approx(expected, rel=1e-6)


def test_unreachable_hub_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AimriError, match="not in the local Hugging Face cache and the hub is unreachable"):
        aimri.load("nobody/nothing")


def test_bad_names_and_files(tmp_path: Path) -> None:
    with pytest.raises(AimriError, match="no model 'not-a-model'"):
        aimri.load("not-a-model")
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(AimriError, match="is not a GGUF file"):
        aimri.load(text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(AimriError, match="GGUF"):
        aimri.load(fake)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(AimriError, match="not a Hugging Face model directory"):
        aimri.load(tmp_path / "emptydir")
