"""Load a Subject from an embedded default, a GGUF file, a local HF directory, or a hub id.

GGUF files are de-quantised once by transformers (slow: ~20-40 s) and cached as a plain fp32
safetensors directory under $AIMRI_HOME/models, which reloads in under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from aimri.devices import resolve_device, resolve_dtype
from aimri.errors import AimriError
from aimri.paths import aimri_home, atomic_write_text, fsync_dir
from aimri.subject.core import Subject
from aimri.subject.names import DEFAULT_MODEL, EMBEDDED, model_name
from aimri.subject.organism import OrganismError, adapter_revision, read_record

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def sha256_file(path: Path, digest: hashlib._Hash | None = None) -> str:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise AimriError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")


def check_gguf(path: Path) -> None:
    """Fail with one line if `path` is not a GGUF file holding a model (reads the whole header: ~3 s)."""
    check_gguf_magic(path)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:
        raise AimriError(f"{path} is a truncated or corrupted GGUF file ({err}); re-download it") from err
    if "general.architecture" not in reader.fields or not reader.tensors:
        raise AimriError(f"{path} is a GGUF file but holds no model (no architecture or tensors)")


def _convert_gguf(path: Path, dest: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError) as err:
        raise AimriError(f"transformers cannot load {path} ({err}); it supports only some GGUF architectures") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the loaded model refuses save_pretrained while flagged quantized
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantized.state_dict())
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / "aimri.json", json.dumps({"source": str(path), "sha256": digest}))
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(dest.parent)


def gguf_to_dir(path: Path) -> Path:
    """The cached fp32 safetensors directory for a GGUF file, converting it on first use."""
    check_gguf_magic(path)
    digest = sha256_file(path)
    dest = aimri_home() / "models" / f"{path.stem}-{digest[:12]}"
    if not (dest / "aimri.json").exists():
        check_gguf(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, dest, digest)
    return dest


def dir_revision(path: Path) -> str:
    """Content hash of a model directory (the source GGUF's hash for converted ones)."""
    meta = path / "aimri.json"
    if meta.exists():
        return str(json.loads(meta.read_text())["sha256"])
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.suffix in _WEIGHT_SUFFIXES:
            digest.update(file.name.encode())
            sha256_file(file, digest)
    return digest.hexdigest()


def _quiet_transformers() -> None:
    """AI MRI shows its own progress; transformers' per-load bars and notes would drown it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _from_dir(path: Path, name: str, device: torch.device, dtype: torch.dtype, **placement: Any) -> Subject:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    if not (path / "config.json").exists():
        raise AimriError(f"{path} is not a Hugging Face model directory (no config.json)")
    placement = {k: v for k, v in placement.items() if v is not None}
    if "offload_folder" in placement:
        placement["offload_folder"] = str(placement["offload_folder"])
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **placement)
    except (ValueError, KeyError) as err:
        if not placement:
            raise
        raise AimriError(f"could not place {name} with device_map {placement.get('device_map')!r}: {err}") from err
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not placement:
        model = torch.nn.Module.to(model, device)
    return Subject(model, tokenizer, name=name, revision=dir_revision(path))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine gets its error at once instead of after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def _from_hub(name: str, device: torch.device, dtype: torch.dtype, **placement: Any) -> Subject:
    from huggingface_hub import snapshot_download

    hint = (
        "download the model where the hub is reachable and pass its local directory, "
        f"or use one of: {', '.join(EMBEDDED)}"
    )
    attempts = [True] + ([False] if _hub_reachable() else [])  # the local HF cache first
    err: Exception | None = None
    for local_only in attempts:
        try:
            snapshot = Path(snapshot_download(name, local_files_only=local_only, allow_patterns=_HUB_FILES))
        except Exception as caught:  # hub errors come in many classes; all mean "not available"
            err = caught
            continue
        subject = _from_dir(snapshot, name, device, dtype, **placement)
        subject.revision = snapshot.name  # the commit hash
        return subject
    if len(attempts) == 1:
        raise AimriError(f"{name!r} is not in the local Hugging Face cache and the hub is unreachable; {hint}")
    reason = str(err).strip().splitlines()[0][:200] if err and str(err).strip() else type(err).__name__
    raise AimriError(f"could not load {name!r} from the Hugging Face hub ({reason}); {hint}") from err


def load(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> Subject:
    """Load a Subject: an embedded name, a .gguf file, a local HF directory, or a hub id.

    `device` None / "auto": the first CUDA device when torch sees one, else the CPU. `dtype` None / "auto":
    fp32 on the CPU (bf16 matmul on common CPUs is hundreds of times slower), bf16 on a GPU (fp16 where it
    has no bf16); see aimri.devices. A model larger than one device loads with accelerate's `device_map`
    ("auto", or module -> device / "cpu" / "disk", with `offload_folder` for "disk"); taps work the same on
    it (accelerate's hooks wrap the modules).

    Raises AimriError for a model that cannot be found, DeviceError for a device or dtype this machine
    cannot run.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    called = model_name(name)  # the Subject's name: one rule, shared with the run directory's
    placement = {"device_map": device_map, "offload_folder": offload_folder} if device_map is not None else {}
    if name in EMBEDDED:
        return _from_dir(gguf_to_dir(EMBEDDED[name]()), called, device, dtype, **placement)
    path = Path(name).expanduser()
    if path.is_file():
        return _from_dir(gguf_to_dir(path), called, device, dtype, **placement)
    if path.is_dir() and ((path / "organism.json").exists() or (path / "adapter" / "adapter_config.json").exists()):
        return load_organism(path, device=device, dtype=dtype)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return _from_dir(gguf_to_dir(ggufs[0]), called, device, dtype, **placement)
        return _from_dir(path, called, device, dtype, **placement)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _from_hub(name, device, dtype, **placement)
    raise AimriError(
        f"no model {name!r}: pass one of {', '.join(EMBEDDED)}, a .gguf file, a local Hugging Face "
        "directory, or a hub id like org/name"
    )


def load_organism(
    path: Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Subject:
    """The organism as a Subject: its base model with the adapter merged in."""
    record = read_record(path)
    adapter = path / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise OrganismError(f"{path} has no adapter/adapter_config.json; rebuild it with `mri organism build`")
    from peft import PeftModel

    base = load(record["base"], device=device, dtype=dtype)
    if record.get("base_revision") not in (None, base.revision):
        raise OrganismError(
            f"{path} was built on {record['base']} revision {record['base_revision'][:12]}, but that model is now "
            f"revision {base.revision[:12]}; rebuild it with `mri organism build --force`"
        )
    with warnings.catch_warnings():  # peft probes a deprecated transformers attribute on load
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(base.model, str(adapter)).merge_and_unload()
    # peft froze the base's weights for training; merged, the organism is a plain model like any other loaded
    # one (gradient-based stages, e.g. the decision's feature gradient, need its graph)
    merged.requires_grad_(True)
    return Subject(merged, base.tokenizer, name=model_name(path), revision=adapter_revision(adapter, base.revision))
