"""Dictionaries on disk: the SAELens layout (a folder with cfg.json + sae_weights.safetensors, in SAELens 6's
schema or the pre-6 one), EleutherAI sparsify checkpoints (cfg.json + sae.safetensors) and Gemma Scope
params.npz.

Weights: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], plus `threshold`
(JumpReLU; an architecture may save an inference form instead of itself, as BatchTopK is saved as JumpReLU
with its one global threshold on every latent, as SAELens converts it: `Dictionary.saved_architecture` and
`saved_tensors`) and `W_skip` (skip transcoders).
cfg.json carries SAELens' keys (architecture, d_in, d_sae, k, apply_b_dec_to_input, normalize_activations,
metadata.hook_name, ...) and ours under `aimri`, so both libraries can read it.

A loader never drops a field it does not understand: every field of a format that changes the maths is
computed (`normalize_activations` by the Dictionary), folded exactly into the weights, or the file is refused
with an AimriError naming the field, its value and what to do. `load_dictionary` lists them per format.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from aimri.dictionaries.base import NORMALISATIONS, Dictionary, DictionaryConfig, build
from aimri.errors import AimriError
from aimri.paths import atomic_write_text, fsync_dir

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"
SPARSIFY_WEIGHTS, GEMMA_SCOPE = "sae.safetensors", "params.npz"
# the SAELens schema cfg.json follows: without a version SAELens reads a file as pre-6 and drops its metadata
SAE_LENS_SCHEMA = "6.0.0"
ACTIVATION_SCALER = "activation_scaler.json"  # SAELens' ActivationScaler, beside a training checkpoint
# (SAE, transcoder, skip transcoder). SAELens 6 has no TopK transcoder: ours are saved as
# "topk_transcoder", which SAELens refuses instead of silently running them as ReLU transcoders.
_SAELENS = {
    "topk": ("topk", "topk_transcoder", "topk_skip_transcoder"),
    "jumprelu": ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"),
    "relu": ("standard", "transcoder", "skip_transcoder"),
    "crosscoder": ("crosscoder", "crosscoder", "crosscoder"),  # none in SAELens 6: it refuses them
}
# SAELens' BatchTopK training checkpoints run as JumpReLU (BatchTopKTrainingSAE.get_inference_config_class)
_FROM_SAELENS = {name: ours for ours, names in _SAELENS.items() for name in names} | {
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}
_TRANSCODERS = {names[i] for ours, names in _SAELENS.items() if ours != "crosscoder" for i in (1, 2)}
_SKIP_TRANSCODERS = {names[2] for ours, names in _SAELENS.items() if ours != "crosscoder"}
# the SAELens configs with `rescale_acts_by_decoder_norm` (TopKSAEConfig and the training configs built on it)
_DECODER_NORM_RESCALED = {"topk", "batchtopk", "matryoshka_batchtopk"}
# sparsify's SparseCoderConfig fields, + d_in (sparsify/config.py, SparseCoder.save_to_disk)
_SPARSIFY_FIELDS = {
    "d_in", "k", "num_latents", "expansion_factor", "activation", "normalize_decoder", "multi_topk",
    "skip_connection", "transcode", "signed",
}  # fmt: skip
_GEMMA_SCOPE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


# our Site kind -> the TransformerLens hook (SAELens' metadata.hook_name) in block L, and back
_HOOKS = {"resid": "hook_resid_post", "mlp.in": "ln2.hook_normalized", "mlp.out": "hook_mlp_out",
          "attn.out": "hook_attn_out"}  # fmt: skip
_FROM_HOOK = {hook: kind for kind, hook in _HOOKS.items()} | {"hook_mlp_in": "mlp.in"}


def site_of_hook(hook: str, cfg_file: Path, key: str = "metadata.hook_name") -> str:
    """A TransformerLens hook name (SAELens' metadata.hook_name) -> our Site name: blocks.L.hook_resid_post ->
    resid.L, blocks.L.hook_resid_pre -> resid.(L-1) (resid.-1: the embeddings), hook_mlp_out -> mlp.out.L,
    hook_attn_out -> attn.out.L, ln2.hook_normalized / hook_mlp_in -> mlp.in.L. Our own names pass through.

    Raises AimriError naming the field for a hook AI MRI does not tap (hook_resid_mid, hook_z, ...)."""
    if not hook.startswith("blocks."):
        return hook  # ours already ("resid.15"), or none
    _, layer, rest = hook.split(".", 2)
    if not layer.isdigit():
        raise _refused(cfg_file, key, hook, "is not a TransformerLens hook name AI MRI reads (blocks.L.hook_...)")
    if rest == "hook_resid_pre":
        return f"resid.{int(layer) - 1}"
    if rest not in _FROM_HOOK:
        raise _refused(
            cfg_file, key, hook, f"is a hook AI MRI does not tap (it reads {', '.join(sorted(_FROM_HOOK))}, "
            "hook_resid_pre); load it with load_dictionary(path, site=...) naming the equivalent Site",
        )  # fmt: skip
    return f"{_FROM_HOOK[rest]}.{layer}"


def hook_name(site: str) -> str:
    """Our Site name -> the TransformerLens hook name SAELens metadata uses."""
    kind, _, layer = site.rpartition(".")
    if kind == "resid" and layer == "-1":
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer}.{_HOOKS.get(kind, kind)}"


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
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": hook_name(cfg.site) if cfg.site else "",
            "hook_head_index": None,
            "prepend_bos": cfg.prepend_bos,
            "sae_lens_version": SAE_LENS_SCHEMA,
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


# -- reading -------------------------------------------------------------------------------------------


def _refused(source: Path, field: str, value: Any, why: str) -> AimriError:
    """The one-line error for a field whose maths AI MRI does not compute: names the field and its value as
    the file spells them, says what it means and what to do."""
    return AimriError(f"{source}: `{field}`={json.dumps(value)} {why}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AimriError(f"{path} is corrupted ({err.msg})") from err
    if not isinstance(raw, dict):
        raise AimriError(f"{path} is not a dictionary configuration (a JSON object)")
    return raw


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors, in float32 whatever the file's dtype (SAELens' `dtype` field is a precision, not maths)."""
    try:
        return {name: t.float() for name, t in load_file(str(path)).items()}
    except (SafetensorError, OSError) as err:
        raise AimriError(f"{path} is truncated or corrupted ({err}); re-download or retrain it") from err


def _checked(cfg: DictionaryConfig, tensors: dict[str, Tensor], source: Path) -> Dictionary:
    """The dictionary `cfg` describes, holding `tensors`; refused when the file holds a tensor it does not
    read (the sign of maths it does not compute) or when the shapes do not match."""
    model = build(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unread = sorted(set(tensors) - set(expected))
    if unread:
        raise AimriError(
            f"{source}: holds tensor `{unread[0]}`, which a {cfg.architecture} dictionary of this configuration "
            f"does not read (it reads {', '.join(expected)}); AI MRI does not compute this variant"
        )
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise AimriError(f"{source}: tensors {got} do not match its configuration (expects {expected})")
    model.load_state_dict({k: tensors[k] for k in expected})
    return model.eval()


def _clamp_thresholds(tensors: dict[str, Tensor]) -> None:
    """SAELens (JumpReLUSAE.encode) and Gemma Scope compute relu(pre) * (pre > threshold), ours
    pre * (pre > threshold): the same for threshold >= 0, and for a negative one relu(pre) * (pre > threshold)
    = pre * (pre > 0). So the thresholds are read clamped at 0."""
    tensors["threshold"] = tensors["threshold"].clamp_min(0)


def load_sparsify(path: Path, site: str = "") -> Dictionary:
    """An EleutherAI sparsify checkpoint folder (cfg.json + sae.safetensors; encoder.weight [d_sae, d_in],
    W_dec [d_sae, d_in], W_skip [d_in, d_in] applied as x @ W_skip.T). sparsify/sparse_coder.py: codes are the
    k largest of relu((x - b_dec) @ encoder.weight.T + encoder.bias), the input not centred by b_dec when
    `transcode`; the output codes @ W_dec + b_dec (+ x @ W_skip.T, x not centred)."""
    cfg_file = path / CONFIG
    raw = _read_json(cfg_file)
    t = _read_safetensors(path / SPARSIFY_WEIGHTS)
    for key, value in raw.items():  # a feature of a sparsify branch: its default is off
        if key not in _SPARSIFY_FIELDS and value not in (None, False, 0, "", "none", [], {}):
            raise _refused(cfg_file, key, value, "is not a sparsify setting AI MRI reads; convert the checkpoint")
    if raw.get("activation", "topk") != "topk":
        raise _refused(
            cfg_file, "activation", raw["activation"],
            "(groupmax: the max of each of k latent groups, or a branch's) is not topk; use a topk checkpoint",
        )  # fmt: skip
    if raw.get("signed", False):
        raise _refused(
            cfg_file, "signed", raw["signed"],
            "(legacy EleutherAI/sae: the k largest |pre-activations|, signed) is not an activation AI MRI computes",
        )  # fmt: skip
    if not isinstance(raw.get("k"), int) or not isinstance(raw.get("d_in"), int):
        raise _refused(cfg_file, "k", raw.get("k"), "and `d_in` must be integers in a sparsify cfg.json")
    skip = bool(raw.get("skip_connection", False))
    if skip != ("W_skip" in t):
        held = "holds no" if skip else "holds a"
        raise _refused(
            cfg_file, "skip_connection", skip, f"but {SPARSIFY_WEIGHTS} {held} W_skip; the checkpoint is damaged"
        )
    transcode = bool(raw.get("transcode", False))
    d_in = raw["d_in"]
    missing = [name for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if name not in t]
    if missing:
        raise AimriError(f"{path / SPARSIFY_WEIGHTS} holds no {', '.join(missing)}: not a sparsify checkpoint")
    W_enc = t.pop("encoder.weight").T.contiguous()
    tensors = {"W_enc": W_enc, "b_enc": t.pop("encoder.bias"), "W_dec": t.pop("W_dec"), "b_dec": t.pop("b_dec")}
    if skip:
        tensors["W_skip"] = t.pop("W_skip").T.contiguous()
        if not transcode:  # sparsify centres the encoder's input; our skip dictionaries read x as it is, so
            # the centring is folded into the bias: (x - b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc - b_dec @ W_enc)
            tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ W_enc
    cfg = DictionaryConfig(
        "topk", d_in, int(W_enc.shape[1]), d_out=d_in if transcode else None, k=raw["k"], skip=skip,
        site=site, site_out=f"{site}.out" if transcode else "",
    )  # fmt: skip
    return _checked(cfg, tensors | t, path / SPARSIFY_WEIGHTS)


def load_gemma_scope(path: Path, site: str = "") -> Dictionary:
    """A Gemma Scope params.npz: W_enc [d_in, d_sae], b_enc, W_dec, b_dec, threshold (keys spelled w_enc read
    as W_enc, as SAELens' gemma_2 loader does). Its JumpReLU (the Gemma Scope tutorial; SAELens' JumpReLUSAE):
    pre = x @ W_enc + b_enc, the input not centred by b_dec; codes = relu(pre) * (pre > threshold);
    output = codes @ W_dec + b_dec."""
    import numpy as np

    try:
        with np.load(path) as npz:
            t = {name: torch.from_numpy(npz[name].astype("float32")) for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise AimriError(f"{path} is not a readable Gemma Scope params.npz ({err})") from err
    t = {(f"W_{name[2:]}" if name.startswith("w_") else name): v for name, v in t.items()}
    missing = [name for name in _GEMMA_SCOPE_TENSORS if name not in t]
    if missing:
        raise AimriError(f"{path} is not a Gemma Scope params.npz: it holds no {', '.join(missing)}")
    _clamp_thresholds(t)
    d_in, d_sae = t["W_enc"].shape
    cfg = DictionaryConfig("jumprelu", int(d_in), int(d_sae), site=site, apply_b_dec_to_input=False)
    return _checked(cfg, t, path)


def _activation_scaler(folder: Path) -> float | None:
    """The norm scaling factor SAELens' trainer keeps beside a checkpoint (activation_scaler.json), if any."""
    file = folder / ACTIVATION_SCALER
    if not file.exists():
        return None
    factor = _read_json(file).get("scaling_factor")
    return float(factor) if isinstance(factor, int | float) and not isinstance(factor, bool) else None


def _sae_lens_config(folder: Path, raw: dict[str, Any], tensors: dict[str, Tensor], site: str = "") -> DictionaryConfig:
    """The configuration of a SAELens folder (6.x or pre-6 schema, as sae_lens/loading/pretrained_sae_loaders.py
    `handle_pre_6_0_config` reads the latter), with the fields whose maths is a fixed change of the weights
    folded into `tensors` (in place)."""
    cfg_file = folder / CONFIG
    meta = raw.get("metadata") or {}

    def field(*names: str, default: Any = None) -> Any:  # a key of either schema: top level (pre-6) or metadata
        for name in names:
            for where in (raw, meta):
                if where.get(name) is not None:
                    return where[name]
        return default

    for width in ("d_in", "d_sae"):
        if not isinstance(raw.get(width), int):
            raise _refused(cfg_file, width, raw.get(width), "must be an integer width")
    # the activation: SAELens 6's `architecture`, or pre-6's standard SAE with activation_fn_str="topk"
    name = raw.get("architecture", "standard")
    if name not in _FROM_SAELENS:
        raise AimriError(f"{cfg_file}: unknown architecture {name!r}; AI MRI reads {', '.join(sorted(_FROM_SAELENS))}")
    architecture, k = _FROM_SAELENS[name], raw.get("k")
    key = "activation_fn_str" if "activation_fn_str" in raw else "activation_fn"
    activation = raw.get(key) or "relu"
    if activation == "topk" and name in ("standard", "topk"):
        architecture = "topk"
        for option, value in (raw.get("activation_fn_kwargs") or {}).items():
            if option == "k":
                k = value
            elif not (option == "signed" and value is False):
                raise _refused(
                    cfg_file, f"activation_fn_kwargs.{option}", value,
                    "is not a TopK setting AI MRI computes (it reads k); convert the dictionary",
                )  # fmt: skip
    elif activation != "relu":
        raise _refused(
            cfg_file, key, activation,
            f"with architecture {name!r} is not an activation AI MRI computes (relu; topk on a standard SAE); "
            "convert the dictionary to a relu, topk or jumprelu one",
        )  # fmt: skip
    if architecture == "topk" and not isinstance(k, int):
        raise _refused(cfg_file, "k", k, "must be the number of active latents of a topk dictionary")

    # where it reads: a Site of the residual stream, an MLP or attention output, not one head's slice
    hook = field("hook_name", "hook_point", default="")
    reshape = raw.get("reshape_activations", "hook_z" if "hook_z" in hook else "none")
    if reshape != "none":
        raise _refused(
            cfg_file, "reshape_activations", reshape,
            "(an SAE over the attention heads' z, [heads, d_head] flattened) reads a Site AI MRI does not tap",
        )  # fmt: skip
    for head_key in ("hook_head_index", "hook_point_head_index", "hook_head_index_out"):
        if field(head_key) is not None:
            raise _refused(
                cfg_file, head_key, field(head_key),
                "(the SAE reads one attention head's slice) reads a Site AI MRI does not tap; use an attn.out SAE",
            )  # fmt: skip

    # transcoders: d_out, never centred (SAELens' TranscoderConfig refuses apply_b_dec_to_input), no rescale
    transcoder = name in _TRANSCODERS
    d_out = raw.get("d_out") if transcoder else None  # SAELens' SAE configs have no d_out: it ignores one
    if transcoder and not isinstance(d_out, int):
        raise _refused(cfg_file, "d_out", d_out, "must be the output width of a transcoder")
    if transcoder and raw.get("apply_b_dec_to_input") is True:
        why = "on a transcoder: b_dec is in the output space (SAELens refuses it too)"
        raise _refused(cfg_file, "apply_b_dec_to_input", True, why)

    # per-token input normalisation: computed (constant_norm_rescale, layer_norm) or a constant folded in
    norm = raw.get("normalize_activations")
    if norm is None or norm is False:  # pre-6 wrote booleans
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    scaling: float | None = None
    if norm != "none" and transcoder:
        raise _refused(
            cfg_file, "normalize_activations", norm,
            "on a transcoder (SAELens normalises its input but not its output): AI MRI does not read it",
        )  # fmt: skip
    if norm == "expected_average_only_in":
        scaling = _activation_scaler(folder)
        if scaling is None:
            raise _refused(
                cfg_file, "normalize_activations", norm,
                f"needs the training data's norm scaling factor, which the folder does not hold ({ACTIVATION_SCALER}); "
                "fold it in with SAELens' SAE.fold_activation_norm_scaling_factor and save again",
            )  # fmt: skip
        norm = "none"
    elif norm not in NORMALISATIONS:
        raise _refused(
            cfg_file, "normalize_activations", norm,
            f"is not a normalisation AI MRI computes ({', '.join(NORMALISATIONS)}, expected_average_only_in); "
            "fold it into the weights with SAELens and save again",
        )  # fmt: skip

    _fold_weights(cfg_file, raw, name, architecture, tensors, scaling)
    site_in = site or site_of_hook(hook, cfg_file)
    hook_out = field("hook_name_out", default="")
    if hook_out:
        site_out = site_of_hook(hook_out, cfg_file, "metadata.hook_name_out")
    else:  # a transcoder naming no output: the MLP's output beside its input
        site_out = site_in.replace("mlp.in.", "mlp.out.") if site_in.startswith("mlp.in.") else f"{site_in}.out"
    return DictionaryConfig(
        architecture=architecture, d_in=raw["d_in"], d_sae=raw["d_sae"], d_out=d_out,
        k=k if architecture == "topk" else None, skip=name in _SKIP_TRANSCODERS, site=site_in,
        site_out=site_out if transcoder else "",
        model_name=field("model_name", default=""), apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm, prepend_bos=bool(field("prepend_bos", default=True)),
    )  # fmt: skip


def _fold_weights(
    cfg_file: Path, raw: dict[str, Any], name: str, architecture: str, tensors: dict[str, Tensor], scaling: float | None
) -> None:
    """Fold into the weights, exactly, the SAELens fields and tensors that are a fixed change of them:

    - thresholds stored as `log_threshold` (exp'd: JumpReLUSAE.process_state_dict_for_loading) or as one
      BatchTopK `topk_threshold` (every latent's: BatchTopKTrainingSAE.process_state_dict_for_saving_inference);
    - pre-6 `finetuning_scaling_factor` (tensor `finetuning_scaling_factor` or `scaling_factor`, [d_sae]): the
      decoder reads codes * s, so W_dec rows are scaled by s (an all-ones one is dropped, as SAELens does);
    - `rescale_acts_by_decoder_norm` (TopKSAE: topk of pre * ||W_dec_i||, decoded as codes / ||W_dec_i||):
      W_enc, b_enc scaled by the norms and W_dec rows normalised, as SAELens' `_fold_norm_topk`;
    - expected_average_only_in's scaling factor s (the SAE saw s * x): W_enc * s, W_dec / s, b_dec / s, as
      `SAE.fold_activation_norm_scaling_factor`, after the decoder-norm fold (whose norms are the stored ones);
    - JumpReLU thresholds clamped at 0 (`_clamp_thresholds`)."""
    weights_file = cfg_file.with_name(WEIGHTS)
    if architecture == "jumprelu" and "threshold" not in tensors:
        if "log_threshold" in tensors:
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        elif "topk_threshold" in tensors:
            tensors["threshold"] = torch.full_like(tensors["b_enc"], float(tensors.pop("topk_threshold")))
    scale = tensors.pop("finetuning_scaling_factor", None)
    scale = tensors.pop("scaling_factor", None) if scale is None else scale
    flagged = raw.get("finetuning_scaling_factor", False)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        if not flagged:
            raise _refused(
                cfg_file, "finetuning_scaling_factor", flagged,
                f"but {weights_file.name} holds a scaling factor that is not all ones; the folder is inconsistent",
            )  # fmt: skip
        tensors["W_dec"] = tensors["W_dec"] * scale[:, None]
    elif scale is None and flagged:
        raise _refused(
            cfg_file, "finetuning_scaling_factor", flagged, f"but {weights_file.name} holds no scaling factor"
        )
    if raw.get("rescale_acts_by_decoder_norm") and name in _DECODER_NORM_RESCALED:
        norms = tensors["W_dec"].norm(dim=-1)
        tensors["W_enc"] = tensors["W_enc"] * norms
        tensors["b_enc"] = tensors["b_enc"] * norms
        # a latent with no decoder row stays as it is (it adds nothing either way)
        tensors["W_dec"] = tensors["W_dec"] / torch.where(norms > 0, norms, 1.0)[:, None]
    if scaling is not None:
        tensors["W_enc"] = tensors["W_enc"] * scaling
        tensors["W_dec"] = tensors["W_dec"] / scaling
        tensors["b_dec"] = tensors["b_dec"] / scaling
    if architecture == "jumprelu" and "threshold" in tensors:
        _clamp_thresholds(tensors)


def load_dictionary(path: str | Path, site: str = "") -> Dictionary:
    """Load a dictionary saved by AI MRI or SAELens (cfg.json + sae_weights.safetensors), an EleutherAI
    sparsify checkpoint (cfg.json + sae.safetensors) or a Gemma Scope params.npz (file or folder).
    `site` names the Site for formats that do not record one.

    What each format's fields do here (the rest name things, or steer training only):

    - AI MRI (cfg.json's `aimri`): every field is the DictionaryConfig's; one this version does not know is
      refused (a newer version wrote it).
    - SAELens, 6.x and pre-6 (sae_lens/saes/*.py, sae_lens/loading/pretrained_sae_loaders.py):
      honoured: `architecture` (standard, topk, jumprelu, their (skip) transcoders, BatchTopK checkpoints as
      JumpReLU), pre-6 `activation_fn_str`/`activation_fn_kwargs` (relu; topk with k), `k`,
      `apply_b_dec_to_input`, `normalize_activations` (constant_norm_rescale and layer_norm computed per token
      by the Dictionary; expected_average_only_in folded from activation_scaler.json), `d_out` (transcoders
      only, as SAELens), `rescale_acts_by_decoder_norm`, `finetuning_scaling_factor`, `log_threshold`,
      `topk_threshold`, `W_skip`, `dtype` (read as float32), metadata hook_name/hook_point, hook_name_out,
      model_name, prepend_bos. Refused: other architectures (gated, abstopk, temporal, matching_pursuit, ...),
      other activations (tanh-relu, topk on a jumprelu, TopK options but k), `reshape_activations`="hook_z",
      `hook_head_index`, normalisation on a transcoder or without its factor (expected_average_only_in,
      covariance_whitening), a transcoder with apply_b_dec_to_input, tensors the architecture does not read.
    - sparsify (sparsify/config.py, sparse_coder.py): honoured `k`, `transcode`, `skip_connection` (W_skip),
      activation="topk"; training-only `multi_topk`, `normalize_decoder`, `expansion_factor`/`num_latents`
      (the width is the tensors'). Refused: activation="groupmax", `signed`=true, any other field that is not
      off (a branch feature), unread tensors.
    - Gemma Scope params.npz: W_enc, b_enc, W_dec, b_dec, threshold (relu(pre) * (pre > threshold), no b_dec
      centring); other tensors refused."""
    path = Path(path)
    if path.suffix == ".npz" or (path / GEMMA_SCOPE).exists():
        return load_gemma_scope(path if path.suffix == ".npz" else path / GEMMA_SCOPE, site)
    if (path / CONFIG).exists() and (path / SPARSIFY_WEIGHTS).exists():
        return load_sparsify(path, site)
    cfg_file, weights_file = path / CONFIG, path / WEIGHTS
    if not cfg_file.exists() or not weights_file.exists():
        raise AimriError(
            f"{path} is not a dictionary: expected {CONFIG} + {WEIGHTS} (SAELens / AI MRI), "
            f"{CONFIG} + {SPARSIFY_WEIGHTS} (sparsify) or {GEMMA_SCOPE} (Gemma Scope)"
        )
    raw = _read_json(cfg_file)
    tensors = _read_safetensors(weights_file)
    if "W_skip" in tensors:  # SAELens stores the skip as [d_out, d_in]
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    if "aimri" in raw:
        ours = raw["aimri"]
        unknown = sorted(set(ours) - set(DictionaryConfig.__dataclass_fields__))
        if unknown:
            raise _refused(
                cfg_file, f"aimri.{unknown[0]}", ours[unknown[0]],
                "is not a field this version of AI MRI reads (a newer version wrote it?); upgrade AI MRI",
            )  # fmt: skip
        cfg = DictionaryConfig(**ours)
    else:
        cfg = _sae_lens_config(path, raw, tensors, site)
    return _checked(cfg, tensors, weights_file)
