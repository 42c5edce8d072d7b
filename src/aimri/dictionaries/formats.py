"""Dictionaries on disk in the SAELens layout: a folder with cfg.json + sae_weights.safetensors.

Weights: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], plus `threshold`
(JumpReLU; an architecture may save an inference form instead of itself, as BatchTopK is saved as JumpReLU
with its learned thresholds: `Dictionary.saved_architecture` and `saved_tensors`) and `W_skip` (skip transcoders).
cfg.json carries SAELens' keys (architecture, d_in, d_sae, k, apply_b_dec_to_input, metadata.hook_name, ...)
and ours under `aimri`, so both libraries can read it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aimri.dictionaries.base import Dictionary, DictionaryConfig, build
from aimri.errors import AimriError
from aimri.paths import atomic_write_text, fsync_dir

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"
# (SAE, transcoder, skip transcoder). SAELens 6 has no TopK transcoder: ours are saved as
# "topk_transcoder", which SAELens refuses instead of silently running them as ReLU transcoders.
_SAELENS = {
    "topk": ("topk", "topk_transcoder", "topk_skip_transcoder"),
    "jumprelu": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "relu": ("standard", "transcoder", "skip_transcoder"),
    "crosscoder": ("crosscoder", "crosscoder", "crosscoder"),  # none in SAELens 6: it refuses them
}
_FROM_SAELENS = {name: ours for ours, names in _SAELENS.items() for name in names} | {"batchtopk": "jumprelu"}


def hook_name(site: str) -> str:
    """Our Site name -> the TransformerLens hook name SAELens metadata uses."""
    parts = site.split(".")
    kind, layer = ".".join(parts[:-1]), parts[-1]
    names = {
        "resid": "hook_resid_post",
        "mlp.in": "ln2.hook_normalized",
        "mlp.out": "hook_mlp_out",
        "attn.out": "hook_attn_out",
    }
    if kind == "resid" and layer == "-1":
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer}.{names.get(kind, kind)}"


def save_dictionary(model: Dictionary, path: str | Path) -> Path:
    """Write atomically: a temp folder renamed into place, so a crash never leaves half a dictionary."""
    path = Path(path)
    cfg = model.cfg
    architecture = model.saved_architecture or cfg.architecture  # the inference form, e.g. BatchTopK -> JumpReLU
    tensors = model.saved_tensors()
    sae_lens_arch = _SAELENS[architecture][(2 if cfg.skip else 1) if cfg.is_transcoder else 0]
    if "W_skip" in tensors:  # SAELens stores the skip as [d_out, d_in]
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    config = {
        "architecture": sae_lens_arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": cfg.centres_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": hook_name(cfg.site) if cfg.site else "",
            "hook_head_index": None,
            "prepend_bos": True,
        },
        "aimri": {**cfg.to_dict(), "architecture": architecture},
    }
    if cfg.k is not None and architecture == "topk":
        config["k"] = cfg.k
    if cfg.is_transcoder:
        config["d_out"] = cfg.out_dim
        config["metadata"]["hook_name_out"] = hook_name(cfg.site_out)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS))
    atomic_write_text(tmp / CONFIG, json.dumps(config, indent=1))
    with open(tmp / WEIGHTS, "rb") as f:
        os.fsync(f.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)
    fsync_dir(path.parent)
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise AimriError(f"{path} is truncated or corrupted ({err}); re-download or retrain it") from err


def _checked(cfg: DictionaryConfig, tensors: dict[str, torch.Tensor], source: Path) -> Dictionary:
    model = build(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items() if k in expected}
    if got != expected:
        raise AimriError(f"{source}: tensors {got} do not match its configuration (expects {expected})")
    model.load_state_dict({k: tensors[k].float() for k in expected})
    return model.eval()


def load_sparsify(path: Path, site: str = "") -> Dictionary:
    """An EleutherAI sparsify checkpoint folder (cfg.json + sae.safetensors; encoder.weight [d_sae, d_in])."""
    raw = json.loads((path / CONFIG).read_text())
    t = _read_safetensors(path / "sae.safetensors")
    d_in, d_sae = int(raw["d_in"]), int(t["encoder.weight"].shape[0])
    transcode = bool(raw.get("transcode", False))
    cfg = DictionaryConfig(
        "topk", d_in, d_sae, d_out=d_in if transcode else None, k=int(raw["k"]), skip="W_skip" in t,
        site=site, site_out=f"{site}.out" if transcode else "",
    )  # fmt: skip
    tensors = {
        "W_enc": t["encoder.weight"].T.contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"].T.contiguous()
    return _checked(cfg, tensors, path)


def load_gemma_scope(path: Path, site: str = "") -> Dictionary:
    """A Gemma Scope params.npz (JumpReLU: W_enc [d_in, d_sae], b_enc, W_dec, b_dec, threshold; the input
    is not centred by b_dec)."""
    import numpy as np

    try:
        with np.load(path) as npz:
            t = {
                k: torch.from_numpy(npz[k].astype("float32")) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
            }
    except (KeyError, ValueError, OSError) as err:
        raise AimriError(f"{path} is not a readable Gemma Scope params.npz ({err})") from err
    d_in, d_sae = t["W_enc"].shape
    cfg = DictionaryConfig("jumprelu", int(d_in), int(d_sae), site=site, apply_b_dec_to_input=False)
    return _checked(cfg, t, path)


def load_dictionary(path: str | Path, site: str = "") -> Dictionary:
    """Load a dictionary saved by AI MRI or SAELens (cfg.json + sae_weights.safetensors), an EleutherAI
    sparsify checkpoint (cfg.json + sae.safetensors) or a Gemma Scope params.npz (file or folder).
    `site` names the Site for formats that do not record one."""
    path = Path(path)
    if path.suffix == ".npz" or (path / "params.npz").exists():
        return load_gemma_scope(path if path.suffix == ".npz" else path / "params.npz", site)
    if (path / CONFIG).exists() and (path / "sae.safetensors").exists():
        return load_sparsify(path, site)
    cfg_file, weights_file = path / CONFIG, path / WEIGHTS
    if not cfg_file.exists() or not weights_file.exists():
        raise AimriError(
            f"{path} is not a dictionary: expected {CONFIG} + {WEIGHTS} (SAELens / AI MRI), "
            f"{CONFIG} + sae.safetensors (sparsify) or params.npz (Gemma Scope)"
        )
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise AimriError(f"{cfg_file} is corrupted ({err.msg})") from err
    tensors = _read_safetensors(weights_file)
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    if "aimri" in raw:
        fields = {k: v for k, v in raw["aimri"].items() if k in DictionaryConfig.__dataclass_fields__}
        cfg = DictionaryConfig(**fields)
    else:
        name = raw.get("architecture", "standard")
        if name not in _FROM_SAELENS:
            raise AimriError(
                f"{cfg_file}: unknown architecture {name!r}; AI MRI reads {', '.join(sorted(_FROM_SAELENS))}"
            )
        meta = raw.get("metadata", {})
        d_out = int(raw["d_out"]) if "d_out" in raw else None
        cfg = DictionaryConfig(
            architecture=_FROM_SAELENS[name], d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), d_out=d_out,
            k=raw.get("k"), skip="W_skip" in tensors, site=meta.get("hook_name", ""),
            site_out=meta.get("hook_name_out", meta.get("hook_name", "") + ".out" if d_out else ""),
            model_name=meta.get("model_name", ""), apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        )  # fmt: skip
    return _checked(cfg, tensors, weights_file)
