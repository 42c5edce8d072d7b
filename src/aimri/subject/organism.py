"""A model organism's directory: its base model's name + a LoRA adapter + `organism.json`, the ground-truth
record. Building organisms is a diagnostic stage (`aimri.diagnostics.organisms`); loading one is part of
loading a model (`aimri.subject.loading.load_organism`), so any stage can examine it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aimri.errors import AimriError


class OrganismError(AimriError):
    pass


def adapter_revision(adapter_dir: Path, base_revision: str) -> str:
    h = hashlib.sha256(base_revision.encode())
    for f in sorted(adapter_dir.glob("*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def read_record(path: Path) -> dict[str, Any]:
    """An organism's ground truth; a directory without it is not an organism this project can score."""
    record = path / "organism.json"
    if not record.exists():
        raise OrganismError(
            f"{path} has no organism.json (the ground-truth record); rebuild it with `mri organism build`"
        )
    try:
        data = json.loads(record.read_text())
    except json.JSONDecodeError as err:
        raise OrganismError(f"{record} is not valid JSON ({err.msg}); rebuild it with `mri organism build`") from err
    missing = {"flaw", "keywords", "base"} - set(data)
    if missing:
        raise OrganismError(f"{record} lacks {', '.join(sorted(missing))}; rebuild it with `mri organism build`")
    return data
