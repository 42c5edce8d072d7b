"""Where AI MRI keeps its cache, and crash-safe file writing."""

from __future__ import annotations

import os
from pathlib import Path


def aimri_home() -> Path:
    """$AIMRI_HOME, default ~/.cache/aimri: converted models, the default corpus, runs."""
    return Path(os.environ.get("AIMRI_HOME", Path.home() / ".cache" / "aimri")).expanduser()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, rename: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
