"""Cross-layer transcoders on disk: circuit-tracer's layout (ours adds clt.json beside it) and Gemma Scope 2's.

- circuit-tracer (`CrossLayerTranscoder.to_safetensors` / `load_clt`): a folder with, per layer i,
  W_enc_i.safetensors {W_enc_i [width, d_model], b_enc_i [width], b_dec_i [d_model], threshold_i [width]} and
  W_dec_i.safetensors {W_dec_i [width, n_layers - i, d_model]}. Our files are exactly these (so circuit-tracer
  loads ours, as a CLT with feature_input_hook "mlp.hook_in", feature_output_hook "hook_mlp_out"), plus
  W_skip_i [d_model, d_model] in W_enc_i for a skip CLT (circuit-tracer ignores it: clt.json says so) and
  clt.json: {"format": "aimri-clt", "format_version", "config" (CLTConfig), "circuit_tracer": whether
  circuit-tracer reads the folder as we do, and why not}.
- Gemma Scope 2 (circuit-tracer's `load_gemma_scope_2_clt`): per layer i a file layer_i.safetensors (or
  layer_i/params.safetensors) {w_enc [d_model, width], w_dec [width, n_layers, d_model] (targets >= i used),
  b_enc, b_dec, threshold, optional affine_skip_connection [d_model, d_model]}.

A folder without clt.json carries no model record: its layer count and width are checked against a model
(`check_clt`), its revision cannot be.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from aimri.dictionaries.clt import CLTConfig, CrossLayerTranscoder
from aimri.errors import AimriError
from aimri.paths import atomic_write_text, fsync_dir

FORMAT, FORMAT_VERSION, CONFIG = "aimri-clt", 1, "clt.json"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"  # circuit-tracer's nnsight names for our mlp.in / mlp.out


def is_clt(path: str | Path) -> bool:
    """Whether `path` is a folder holding a CLT in one of the layouts above."""
    p = Path(path)
    return p.is_dir() and (
        (p / CONFIG).exists() or (p / "W_enc_0.safetensors").exists() or bool(_gemma_scope_2_files(p))
    )


def save_clt(clt: CrossLayerTranscoder, path: str | Path) -> Path:
    """Write `clt` in circuit-tracer's layout + clt.json: files fsynced in a temp folder renamed into place; an
    existing folder at `path` is moved aside first and removed once the new one is in place."""
    path = Path(path)
    cfg = clt.cfg
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(cfg.n_layers):
        enc = {
            f"W_enc_{i}": clt.W_enc[i], f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i],
            f"threshold_{i}": clt.threshold(i),
        }  # fmt: skip
        if clt.W_skip is not None:
            enc[f"W_skip_{i}"] = clt.W_skip[i]
        for name, tensors in ((f"W_enc_{i}", enc), (f"W_dec_{i}", {f"W_dec_{i}": clt.W_dec[i]})):
            file = tmp / f"{name}.safetensors"
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(file))
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    why_not = []
    if len(set(cfg.widths)) > 1:
        why_not.append("its layers have different widths (circuit-tracer's CLT needs one width)")
    if cfg.skip:
        why_not.append("circuit-tracer's load_clt does not read the skip term W_skip_i")
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
        "feature_input_hook": INPUT_HOOK, "feature_output_hook": OUTPUT_HOOK,
        "circuit_tracer": {"reads_as_we_do": not why_not, "why_not": why_not},
    }  # fmt: skip
    atomic_write_text(tmp / CONFIG, json.dumps(record, indent=1))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.rename(path, old)  # the previous CLT stays whole until the new one is in place
    os.rename(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


class _Tensors(dict):
    """A layer file's tensors; a missing one is named with its file (not a bare KeyError)."""

    def __init__(self, file: Path, tensors: dict[str, Tensor]) -> None:
        super().__init__(tensors)
        self.file = file

    def __missing__(self, key: str) -> Tensor:
        raise AimriError(
            f"{self.file} has no tensor {key!r} (it holds {', '.join(sorted(self))}); it is not a whole CLT layer file"
        )


def _read(file: Path) -> _Tensors:
    try:
        return _Tensors(file, load_file(str(file)))
    except (SafetensorError, OSError) as err:
        raise AimriError(f"cannot read {file} ({err}); the CLT folder is damaged, copy it again") from None


def _gemma_scope_2_files(folder: Path) -> dict[int, Path]:
    """Layer files holding a multi-layer decoder `w_dec` (circuit-tracer's per-layer transcoders are also named
    layer_i.safetensors, but hold W_enc / W_dec of one layer: not a CLT)."""
    found: dict[int, Path] = {}
    for file in list(folder.glob("layer_*.safetensors")) + list(folder.glob("layer_*/params.safetensors")):
        match = re.fullmatch(r"layer_(\d+)", file.stem if file.name != "params.safetensors" else file.parent.name)
        if match:
            found[int(match.group(1))] = file
    if found:
        try:
            with safe_open(str(found[min(found)]), framework="pt") as f:
                if "w_dec" not in f.keys() or len(f.get_slice("w_dec").get_shape()) != 3:  # noqa: SIM118  (a safe_open has no __contains__)
                    return {}
        except (SafetensorError, OSError):
            return {}
    return found


def _numbered(folder: Path, what: str, files: dict[int, Path]) -> int:
    """The layer count of files numbered 0..n-1; raises AimriError naming the gap."""
    n = len(files)
    missing = sorted(set(range(max(files, default=-1) + 1)) - set(files))
    if not n or missing:
        raise AimriError(f"{folder} is not a whole {what} CLT: layer files {missing or [0]} are missing")
    return n


def load_clt(path: str | Path) -> CrossLayerTranscoder:
    """A CLT from `path` in any layout above, as fp32 on the CPU.

    Raises AimriError for a folder that holds none, a clt.json of another format or version (naming it), layer
    files missing, or tensors whose shapes disagree with each other (naming the first)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AimriError(f"{folder} is not a folder; a CLT is a folder (`mri train-clt` writes one)")
    if (folder / CONFIG).exists():
        try:
            record = json.loads((folder / CONFIG).read_text())
        except json.JSONDecodeError as err:
            raise AimriError(f"{folder / CONFIG} is not JSON ({err}); the CLT folder is damaged") from None
        if record.get("format") != FORMAT:
            raise AimriError(f"{folder / CONFIG} is a {record.get('format')!r} file, not an {FORMAT!r} CLT")
        version = record.get("format_version")
        if version != FORMAT_VERSION:
            raise AimriError(
                f"{folder} is an {FORMAT} folder of format version {version}; this AI MRI reads version "
                f"{FORMAT_VERSION}: use the AI MRI that wrote it, or retrain it with `mri train-clt`"
            )
        known = set(CLTConfig.__dataclass_fields__)
        cfg = CLTConfig(**{k: v for k, v in record["config"].items() if k in known})
        return _from_circuit_tracer(folder, cfg)
    if (folder / "W_enc_0.safetensors").exists():
        return _from_circuit_tracer(folder, None)
    files = _gemma_scope_2_files(folder)
    if files:
        return _from_gemma_scope_2(folder, files)
    raise AimriError(
        f"{folder} holds no CLT: expected clt.json, circuit-tracer's W_enc_0.safetensors ... or Gemma Scope 2's "
        "layer_0.safetensors ..."
    )


def _from_circuit_tracer(folder: Path, cfg: CLTConfig | None) -> CrossLayerTranscoder:
    enc_files = {int(m.group(1)): f for f in folder.glob("W_enc_*.safetensors")
                 if (m := re.fullmatch(r"W_enc_(\d+)", f.stem))}  # fmt: skip
    n = _numbered(folder, "circuit-tracer", enc_files)
    encs = [_read(enc_files[i]) for i in range(n)]
    widths, d_model = [int(e[f"W_enc_{i}"].shape[0]) for i, e in enumerate(encs)], int(encs[0]["W_enc_0"].shape[1])
    if cfg is None:
        has_threshold = "threshold_0" in encs[0]
        cfg = CLTConfig(n, d_model, widths, activation="jumprelu" if has_threshold else "relu",
                        skip="W_skip_0" in encs[0], prepend_bos=True)  # fmt: skip
    if (cfg.n_layers, cfg.d_model, list(cfg.widths)) != (n, d_model, widths):
        raise AimriError(
            f"{folder}: clt.json says {cfg.n_layers} layers of widths {sorted(set(cfg.widths))} on d_model "
            f"{cfg.d_model}, but its files hold {n} layers of widths {sorted(set(widths))} on {d_model}"
        )
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for i, enc in enumerate(encs):
            dec_file = folder / f"W_dec_{i}.safetensors"
            if not dec_file.exists():
                raise AimriError(f"{folder} is not a whole CLT: {dec_file.name} is missing")
            W_dec = _read(dec_file)[f"W_dec_{i}"]
            _assign(folder, clt.W_dec[i], W_dec, f"W_dec_{i}")
            _assign(folder, clt.W_enc[i], enc[f"W_enc_{i}"], f"W_enc_{i}")
            _assign(folder, clt.b_enc[i], enc[f"b_enc_{i}"], f"b_enc_{i}")
            _assign(folder, clt.b_dec[i], enc[f"b_dec_{i}"], f"b_dec_{i}")
            if f"threshold_{i}" in enc:
                _assign(folder, clt.threshold(i), enc[f"threshold_{i}"].reshape(-1), f"threshold_{i}")
            if clt.W_skip is not None:
                _assign(folder, clt.W_skip[i], enc[f"W_skip_{i}"], f"W_skip_{i}")
    return clt.eval()


def _assign(folder: Path, target: Tensor, value: Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise AimriError(
            f"{folder}: {name} is {tuple(value.shape)}, expected {tuple(target.shape)} from the other tensors"
        )
    target.copy_(value.float())


def _from_gemma_scope_2(folder: Path, files: dict[int, Path]) -> CrossLayerTranscoder:
    n = _numbered(folder, "Gemma Scope 2", files)
    params = [_read(files[i]) for i in range(n)]
    d_model, widths = int(params[0]["w_enc"].shape[0]), [int(p["w_enc"].shape[1]) for p in params]
    skip = "affine_skip_connection" in params[0]
    clt = CrossLayerTranscoder(CLTConfig(n, d_model, widths, skip=skip, extra={"source": "gemma-scope-2"}))
    with torch.no_grad():
        for i, p in enumerate(params):
            w_dec = p["w_dec"]
            if w_dec.ndim != 3 or w_dec.shape[1] != n:
                raise AimriError(
                    f"{files[i]}: w_dec is {tuple(w_dec.shape)}, expected [width, {n} layers, d_model] for {n} files"
                )
            _assign(folder, clt.W_enc[i], p["w_enc"].t(), f"layer {i} w_enc")
            _assign(folder, clt.W_dec[i], w_dec[:, i:], f"layer {i} w_dec")
            _assign(folder, clt.b_enc[i], p["b_enc"], f"layer {i} b_enc")
            _assign(folder, clt.b_dec[i], p["b_dec"], f"layer {i} b_dec")
            _assign(folder, clt.threshold(i), p["threshold"].reshape(-1), f"layer {i} threshold")
            if clt.W_skip is not None:
                _assign(folder, clt.W_skip[i], p["affine_skip_connection"], f"layer {i} affine_skip_connection")
    return clt.eval()


def check_clt(clt: CrossLayerTranscoder, subject: Any, allow_other_model: bool = False, source: object = "") -> None:
    """Refuse a CLT that does not fit `subject` (a Subject): its layer count and width must match always (naming
    the mismatch); its recorded model revision must equal the subject's unless `allow_other_model`."""
    from aimri.dictionaries.match import check_revision

    cfg = clt.cfg
    what = str(source) or "the CLT"
    n_layers, d_model, name = subject.n_layers, subject.d_model, subject.name
    if cfg.n_layers != n_layers:
        raise AimriError(f"{what} spans {cfg.n_layers} layers but {name} has {n_layers}: it belongs to another model")
    if cfg.d_model != d_model:
        raise AimriError(f"{what} reads {cfg.d_model}-wide activations but {name}'s d_model is {d_model}")
    check_revision(f"{what} was trained on", cfg.model_name, cfg.model_revision, name,
                   getattr(subject, "revision", "unknown"), allow_other_model)  # fmt: skip
