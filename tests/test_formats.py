"""Dictionary formats against the real peer libraries, each in its own venv (created on first use):
ours -> sae_lens, sae_lens -> ours, sparsify -> ours; and Gemma Scope params.npz."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aimri.dictionaries import DictionaryConfig, build, load_dictionary, save_dictionary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import peer_python  # noqa: E402

pytestmark = pytest.mark.integration


def _peer(peer: str, script: str, *args: str) -> None:
    python = peer_python(peer, log=lambda m: None)
    done = subprocess.run([str(python), str(ROOT / "bench" / "peers" / script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _inputs(tmp_path: Path, d: int = 24) -> tuple[torch.Tensor, Path]:
    x = torch.randn(50, d, generator=torch.Generator().manual_seed(1)) * 2
    np.savez(tmp_path / "x.npz", x=x.numpy())
    return x, tmp_path / "x.npz"


def _randomised(cfg: DictionaryConfig):
    model = build(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if name == "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    return model.eval()


@pytest.mark.parametrize(
    "cfg",
    [
        DictionaryConfig("topk", 24, 64, k=5, site="resid.3"),
        DictionaryConfig("jumprelu", 24, 64, site="resid.3"),
        DictionaryConfig("relu", 24, 64, site="resid.3"),
        DictionaryConfig("relu", 24, 64, d_out=24, skip=True, site="mlp.in.3", site_out="mlp.out.3"),
    ],
    ids=["topk", "jumprelu", "relu", "skip-transcoder"],
)
def test_ours_loads_in_sae_lens(cfg: DictionaryConfig, tmp_path: Path) -> None:
    x, inputs = _inputs(tmp_path)
    ours = _randomised(cfg)
    save_dictionary(ours, tmp_path / "d")
    _peer("sae_lens", "sae_lens_interop.py", "run", str(tmp_path / "d"), str(inputs), str(tmp_path / "out.npz"))
    theirs = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        codes = ours.encode(x)
        assert np.allclose(theirs["codes"], codes.numpy(), atol=1e-5)
        assert np.allclose(theirs["recon"], ours.decode(codes, x).numpy(), atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "standard", "transcoder"])
def test_sae_lens_loads_in_ours(arch: str, tmp_path: Path) -> None:
    x, inputs = _inputs(tmp_path)
    _peer("sae_lens", "sae_lens_interop.py", "make", arch, str(tmp_path / "d"), str(inputs), str(tmp_path / "out.npz"))
    theirs = np.load(tmp_path / "out.npz")
    ours = load_dictionary(tmp_path / "d")
    with torch.no_grad():
        assert np.allclose(ours.encode(x).numpy(), theirs["codes"], atol=1e-5)
        assert np.allclose(ours(x).numpy(), theirs["recon"], atol=1e-5)
    assert ours.cfg.site == "resid.3"  # its metadata.hook_name, read as our Site


@pytest.mark.parametrize("transcode", [False, True], ids=["sae", "skip-transcoder"])
def test_sparsify_checkpoints_load(transcode: bool, tmp_path: Path) -> None:
    x, inputs = _inputs(tmp_path)
    _peer(
        "sparsify",
        "sparsify_interop.py",
        str(tmp_path / "d"),
        str(inputs),
        str(tmp_path / "out.npz"),
        *(["t"] if transcode else []),
    )
    ours = load_dictionary(tmp_path / "d", site="resid.3")
    with torch.no_grad():
        assert np.allclose(ours(x).numpy(), np.load(tmp_path / "out.npz")["recon"], atol=1e-4)


def test_gemma_scope_params_npz(tmp_path: Path) -> None:
    """The published Gemma Scope layout: JumpReLU on x @ W_enc + b_enc (no b_dec centring)."""
    g = np.random.default_rng(0)
    params = {
        "W_enc": g.normal(size=(24, 64)).astype(np.float32),
        "b_enc": g.normal(size=64).astype(np.float32),
        "W_dec": g.normal(size=(64, 24)).astype(np.float32),
        "b_dec": g.normal(size=24).astype(np.float32),
        "threshold": np.abs(g.normal(size=64)).astype(np.float32),
    }
    np.savez(tmp_path / "params.npz", **params)
    x = g.normal(size=(10, 24)).astype(np.float32)
    pre = x @ params["W_enc"] + params["b_enc"]
    want = (pre * (pre > params["threshold"])) @ params["W_dec"] + params["b_dec"]
    ours = load_dictionary(tmp_path, site="resid.12")
    with torch.no_grad():
        assert np.allclose(ours(torch.from_numpy(x)).numpy(), want, atol=1e-4)
