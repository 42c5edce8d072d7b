"""Every field of a dictionary format that changes the maths is honoured or refused (issue 19, item 1).

Each test writes a small random file in the format by hand (cfg.json + safetensors / npz), loads it with
load_dictionary and compares the codes and the reconstruction with the format's own formula written out here
in plain torch (from SAELens' sae_lens/saes/*.py and loading/pretrained_sae_loaders.py, sparsify's
sparse_coder.py and fused_encoder.py, the Gemma Scope tutorial), or checks the one-line refusal names the
field and its value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from aimri.dictionaries import load_dictionary, save_dictionary
from aimri.errors import AimriError

D_IN, D_SAE, K = 16, 48, 4
HOOK = "blocks.2.hook_resid_post"
SAE_LENS_6 = {"hook_name": HOOK, "model_name": "tiny", "sae_lens_version": "6.2.0", "prepend_bos": True}


def _x() -> Tensor:
    return torch.randn(40, D_IN, generator=torch.Generator().manual_seed(7)) * 3 + 0.5


def _weights(seed: int = 0, d_out: int = D_IN) -> dict[str, Tensor]:
    """SAELens-layout weights; b_enc positive so a TopK token has at least k positive pre-activations."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
        "b_enc": torch.rand(D_SAE, generator=g) + 1.0,
        "W_dec": torch.randn(D_SAE, d_out, generator=g) * 0.3,
        "b_dec": torch.randn(d_out, generator=g) * 0.3,
    }


def _sae_lens_folder(folder: Path, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", **cfg}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _topk(pre: Tensor, k: int) -> Tensor:
    """SAELens' / sparsify's TopK: the k largest pre-activations, ReLU'd, the rest 0."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def _assert_runs_as(folder: Path | str, codes: Tensor, recon: Tensor, x: Tensor, site: str = "") -> None:
    model = load_dictionary(folder, site=site)
    with torch.no_grad():
        got_codes = model.encode(x)
        assert torch.allclose(got_codes, codes, atol=1e-5), (got_codes - codes).abs().max()
        assert torch.allclose(model(x), recon, atol=1e-5), (model(x) - recon).abs().max()


def _refusal(folder: Path, field: str, value: Any, site: str = "") -> str:
    with pytest.raises(AimriError) as err:
        load_dictionary(folder, site=site)
    message = str(err.value)
    assert f"`{field}`={json.dumps(value)}" in message, message
    assert "\n" not in message
    return message


# -- SAELens ---------------------------------------------------------------------------------------------


def test_sae_lens_pre6_topk_runs_k_latents(tmp_path: Path) -> None:
    """Pre-6 schema: a "standard" SAE with activation_fn_str="topk" is a TopK SAE (handle_pre_6_0_config),
    not a ReLU one: L0 is exactly k."""
    w, x = _weights(), _x()
    cfg = {
        "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
        "hook_name": HOOK, "apply_b_dec_to_input": True, "normalize_activations": "none",
        "finetuning_scaling_factor": False,
    }  # fmt: skip
    folder = _sae_lens_folder(tmp_path / "d", cfg, w)
    codes = _topk((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], K)
    _assert_runs_as(folder, codes, codes @ w["W_dec"] + w["b_dec"], x)
    model = load_dictionary(folder)
    with torch.no_grad():
        assert ((model.encode(x) > 0).sum(-1) == K).all()
    assert model.cfg.site == "resid.2"  # the pre-6 top-level hook_name, read as our Site


def test_sae_lens_pre6_relu_with_finetuning_scaling_factor(tmp_path: Path) -> None:
    """Pre-6 ReLU SAE (keys hook_point, activation_fn_str="relu") with a finetuning scaling factor: the
    decoder reads codes * s (SAELens 5 `apply_finetuning_scaling_factor`)."""
    w, x = _weights(1), _x()
    s = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) + 0.5
    cfg = {
        "architecture": "standard",
        "activation_fn_str": "relu",
        "hook_point": HOOK,
        "finetuning_scaling_factor": True,
    }
    folder = _sae_lens_folder(tmp_path / "d", cfg, w | {"scaling_factor": s})
    codes = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    _assert_runs_as(folder, codes, (codes * s) @ w["W_dec"] + w["b_dec"], x)
    assert load_dictionary(folder).cfg.site == "resid.2"


def test_sae_lens_6_topk_rescaled_by_decoder_norms(tmp_path: Path) -> None:
    """SAELens 6 TopKSAE with rescale_acts_by_decoder_norm: topk of pre * ||W_dec_i||, decoded as
    (codes / ||W_dec_i||) @ W_dec + b_dec."""
    w, x = _weights(3), _x()
    w["W_dec"] = w["W_dec"] * torch.linspace(0.2, 3.0, D_SAE)[:, None]
    cfg = {"architecture": "topk", "k": K, "rescale_acts_by_decoder_norm": True, "metadata": SAE_LENS_6}
    folder = _sae_lens_folder(tmp_path / "d", cfg, w)
    norms = w["W_dec"].norm(dim=-1)
    codes = _topk(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms, K)
    _assert_runs_as(folder, codes, (codes / norms) @ w["W_dec"] + w["b_dec"], x)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_sae_lens_normalize_activations(norm: str, tmp_path: Path) -> None:
    """SAE._setup_activation_normalization: the SAE encodes the normalised input (before the b_dec centring)
    and its output is returned to x's scale; the setting round-trips through save_dictionary."""
    w, x = _weights(4), _x()
    folder = _sae_lens_folder(
        tmp_path / "d", {"architecture": "standard", "normalize_activations": norm, "metadata": SAE_LENS_6}, w
    )
    if norm == "constant_norm_rescale":
        coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
        x_in, back = x * coeff, (lambda y: y / coeff)
    else:
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)  # Bessel-corrected, as torch.std
        x_in, back = (x - mu) / (std + 1e-5), (lambda y: y * std + mu)
    codes = ((x_in - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    recon = back(codes @ w["W_dec"] + w["b_dec"])
    _assert_runs_as(folder, codes, recon, x)

    model = load_dictionary(folder)
    resaved = save_dictionary(model, tmp_path / "ours")
    assert json.loads((resaved / "cfg.json").read_text())["normalize_activations"] == norm
    _assert_runs_as(resaved, codes, recon, x)
    with pytest.raises(AimriError, match="needs the input x"):
        model.decode(codes)
    with pytest.raises(AimriError, match="inference-only"):
        model.train()


def test_sae_lens_expected_average_only_in(tmp_path: Path) -> None:
    """A checkpoint trained on s * x (SAELens' ActivationScaler, s in activation_scaler.json) runs as
    SAE.fold_activation_norm_scaling_factor makes it; without the factor it is refused."""
    w, x, s = _weights(5), _x(), 2.5
    cfg = {"architecture": "standard", "normalize_activations": "expected_average_only_in", "metadata": SAE_LENS_6}
    folder = _sae_lens_folder(tmp_path / "d", cfg, w)
    message = _refusal(folder, "normalize_activations", "expected_average_only_in")
    assert "activation_scaler.json" in message
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    codes = ((s * x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    _assert_runs_as(folder, codes, (codes @ w["W_dec"] + w["b_dec"]) / s, x)


@pytest.mark.parametrize("form", ["negative-threshold", "log_threshold", "batchtopk-checkpoint"])
def test_sae_lens_jumprelu_thresholds(form: str, tmp_path: Path) -> None:
    """JumpReLUSAE.encode: relu(pre) * (pre > threshold), the threshold stored as it is (negative ones
    included), as log_threshold (older checkpoints), or as a BatchTopK checkpoint's one topk_threshold."""
    w, x = _weights(6), _x()
    w["b_enc"] = w["b_enc"] - 1.5  # pre-activations of both signs
    g = torch.Generator().manual_seed(8)
    threshold = torch.randn(D_SAE, generator=g) * 0.5  # negative and positive
    cfg: dict[str, Any] = {"architecture": "jumprelu", "apply_b_dec_to_input": False, "metadata": SAE_LENS_6}
    if form == "negative-threshold":
        stored = {"threshold": threshold}
    elif form == "log_threshold":
        threshold = threshold.exp()
        stored = {"log_threshold": threshold.log()}
    else:
        threshold = torch.full((D_SAE,), 0.4)
        cfg |= {"architecture": "batchtopk", "k": K}
        stored = {"topk_threshold": torch.tensor(0.4, dtype=torch.float64)}
    folder = _sae_lens_folder(tmp_path / "d", cfg, w | stored)
    pre = x @ w["W_enc"] + w["b_enc"]
    codes = pre.relu() * (pre > threshold)
    _assert_runs_as(folder, codes, codes @ w["W_dec"] + w["b_dec"], x)


def test_sae_lens_d_out_is_read_for_transcoders_only(tmp_path: Path) -> None:
    """SAELens' SAE configs have no d_out (filter_valid_dataclass_fields drops it): a standard SAE with one is
    still an SAE, its input centred by b_dec."""
    w, x = _weights(9), _x()
    folder = _sae_lens_folder(tmp_path / "d", {"architecture": "standard", "d_out": D_IN, "metadata": SAE_LENS_6}, w)
    codes = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    _assert_runs_as(folder, codes, codes @ w["W_dec"] + w["b_dec"], x)


REFUSED: list[tuple[str, dict[str, Any], dict[str, Tensor], str, Any]] = [
    ("tanh-relu", {"activation_fn_str": "tanh-relu"}, {}, "activation_fn_str", "tanh-relu"),
    ("topk-option", {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K, "postact_fn": "gelu"}}, {},
     "activation_fn_kwargs.postact_fn", "gelu"),
    ("hook_z", {"reshape_activations": "hook_z"}, {}, "reshape_activations", "hook_z"),
    ("head", {"metadata": SAE_LENS_6 | {"hook_head_index": 2}}, {}, "hook_head_index", 2),
    ("whitening", {"normalize_activations": "covariance_whitening"}, {}, "normalize_activations", "covariance_whitening"),
    ("transcoder-norm", {"architecture": "transcoder", "d_out": D_IN, "apply_b_dec_to_input": False,
                         "normalize_activations": "layer_norm"}, {}, "normalize_activations", "layer_norm"),
    ("scaling-unflagged", {"finetuning_scaling_factor": False}, {"scaling_factor": torch.full((D_SAE,), 2.0)},
     "finetuning_scaling_factor", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("cfg", "extra", "field", "value"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_sae_lens_refuses_what_it_does_not_compute(
    cfg: dict[str, Any], extra: dict[str, Tensor], field: str, value: Any, tmp_path: Path
) -> None:
    folder = _sae_lens_folder(tmp_path / "d", {"architecture": "standard"} | cfg, _weights() | extra)
    _refusal(folder, field, value)


def test_sae_lens_refuses_a_tensor_it_does_not_read(tmp_path: Path) -> None:
    """A Gated SAE's b_gate under a standard architecture: extra maths, not an ignorable extra."""
    folder = _sae_lens_folder(tmp_path / "d", {"architecture": "standard"}, _weights() | {"b_gate": torch.zeros(D_SAE)})
    with pytest.raises(AimriError, match="`b_gate`"):
        load_dictionary(folder)


def test_resaved_sae_lens_dictionary_keeps_its_metadata(tmp_path: Path) -> None:
    """A SAELens dictionary saved again keeps its hook name (not re-mangled as one of our Sites) and declares
    the SAELens 6 schema, so SAELens reads the metadata instead of treating the file as pre-6."""
    folder = _sae_lens_folder(tmp_path / "d", {"architecture": "standard", "metadata": SAE_LENS_6}, _weights())
    saved = json.loads((save_dictionary(load_dictionary(folder), tmp_path / "ours") / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == HOOK
    assert int(saved["metadata"]["sae_lens_version"].split(".")[0]) >= 6


def test_aimri_field_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    folder = _sae_lens_folder(tmp_path / "d", {"architecture": "standard", "metadata": SAE_LENS_6}, _weights())
    saved = save_dictionary(load_dictionary(folder), tmp_path / "ours")
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["aimri"]["input_whitening"] = "pca"
    (saved / "cfg.json").write_text(json.dumps(cfg))
    _refusal(saved, "aimri.input_whitening", "pca")


# -- EleutherAI sparsify ---------------------------------------------------------------------------------


def _sparsify_folder(folder: Path, cfg: dict[str, Any], skip: bool = True) -> tuple[Path, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(11)
    t = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "encoder.bias": torch.rand(D_SAE, generator=g) + 1.0,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
    }
    if skip:
        t["W_skip"] = torch.randn(D_IN, D_IN, generator=g) * 0.1
    folder.mkdir(parents=True)
    base = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
            "multi_topk": False, "skip_connection": skip, "transcode": False, "d_in": D_IN}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(base | cfg))
    save_file(t, str(folder / "sae.safetensors"))
    return folder, t


def test_sparsify_skip_sae(tmp_path: Path) -> None:
    """sparsify/sparse_coder.py: an autoencoder (transcode=False) with skip_connection centres the encoder's
    input by b_dec and adds x @ W_skip.T; the codes are the top k of relu(pre); multi_topk is a training loss."""
    folder, t = _sparsify_folder(tmp_path / "d", {"multi_topk": True})
    x = _x()
    codes = _topk(((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu(), K)
    recon = codes @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
    _assert_runs_as(folder, codes, recon, x, site="resid.2")
    with torch.no_grad():
        assert ((load_dictionary(folder, site="resid.2").encode(x) > 0).sum(-1) == K).all()


@pytest.mark.parametrize(
    ("cfg", "skip", "field", "value"),
    [
        ({"activation": "groupmax"}, False, "activation", "groupmax"),
        ({"signed": True}, False, "signed", True),
        ({"tied_decoder": True}, False, "tied_decoder", True),
        ({"skip_connection": True}, False, "skip_connection", True),
    ],
    ids=["groupmax", "signed", "branch-field", "skip-without-W_skip"],
)
def test_sparsify_refuses_what_it_does_not_compute(
    cfg: dict[str, Any], skip: bool, field: str, value: Any, tmp_path: Path
) -> None:
    folder, _ = _sparsify_folder(tmp_path / "d", cfg, skip=skip)
    _refusal(folder, field, value, site="resid.2")


# -- Gemma Scope ---------------------------------------------------------------------------------------


def _gemma_scope(path: Path, extra: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    g = np.random.default_rng(12)
    params: dict[str, Any] = {
        "W_enc": g.normal(size=(D_IN, D_SAE)).astype(np.float32) * 0.3,
        "b_enc": g.normal(size=D_SAE).astype(np.float32) * 0.5,
        "W_dec": g.normal(size=(D_SAE, D_IN)).astype(np.float32) * 0.3,
        "b_dec": g.normal(size=D_IN).astype(np.float32),
        "threshold": g.normal(size=D_SAE).astype(np.float32) * 0.5,  # some negative
    }
    arrays: dict[str, Any] = params | (extra or {})
    np.savez(path, **arrays)
    return params


def test_gemma_scope_jumprelu(tmp_path: Path) -> None:
    """The Gemma Scope tutorial's JumpReLU: pre = x @ W_enc + b_enc (no b_dec centring);
    codes = relu(pre) * (pre > threshold); recon = codes @ W_dec + b_dec."""
    p = {k: torch.from_numpy(v) for k, v in _gemma_scope(tmp_path / "params.npz").items()}
    x = _x()
    pre = x @ p["W_enc"] + p["b_enc"]
    codes = pre.relu() * (pre > p["threshold"])
    _assert_runs_as(tmp_path, codes, codes @ p["W_dec"] + p["b_dec"], x, site="resid.12")


def test_gemma_scope_refuses_a_tensor_it_does_not_read(tmp_path: Path) -> None:
    _gemma_scope(tmp_path / "params.npz", {"W_skip": np.zeros((D_IN, D_IN), np.float32)})
    with pytest.raises(AimriError, match="`W_skip`"):
        load_dictionary(tmp_path, site="resid.12")
