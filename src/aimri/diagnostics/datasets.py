"""The contrastive datasets shipped with AI MRI (see scripts/make_diagnostic_data.py) and user-supplied ones.

A dataset is JSONL, one pair per line: `positive` and `negative` are chat messages (a list of
{"role", "content"}), `split` is "train" or "test" (fixed, so every reported AUROC is on held-out pairs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from aimri.errors import AimriError

Messages = list[dict[str, str]]
TRAITS = ("deception", "harmful", "sycophancy", "power")


class DatasetError(AimriError):
    pass


@dataclass
class Pair:
    positive: Messages
    negative: Messages
    split: str


@dataclass
class ContrastDataset:
    name: str
    pairs: list[Pair]

    def split(self, which: str) -> list[Pair]:
        return [p for p in self.pairs if p.split == which]


def _data_file(name: str) -> Path:
    return Path(str(resources.files("aimri.diagnostics") / "data" / name))


def load_dataset(name_or_path: str) -> ContrastDataset:
    """A shipped trait (deception, harmful, sycophancy, power) or a JSONL file of pairs."""
    path = _data_file(f"{name_or_path}.jsonl") if name_or_path in TRAITS else Path(name_or_path)
    if not path.exists():
        raise DatasetError(f"no dataset {name_or_path!r}: use one of {', '.join(TRAITS)} or a JSONL file of pairs")
    pairs: list[Pair] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row: dict[str, Any] = json.loads(line)
            pairs.append(Pair(list(row["positive"]), list(row["negative"]), str(row.get("split", "train"))))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DatasetError(f"{path}:{n}: not a pair ({err}); each line needs 'positive' and 'negative'") from err
    name = path.stem
    if not pairs:
        raise DatasetError(f"{path} holds no pairs")
    for which in ("train", "test"):
        if not any(p.split == which for p in pairs):
            raise DatasetError(f'{path} has no {which!r} pairs; mark about a fifth of the pairs "split": "test"')
    one_class = [i for i, p in enumerate(pairs) if p.positive == p.negative]
    if len(one_class) == len(pairs):
        raise DatasetError(f"{path}: every positive equals its negative, so the dataset has one class only")
    return ContrastDataset(name, pairs)


@cache
def prompt_pools() -> dict[str, Any]:
    """Everyday questions, recommendation requests and false-belief opinions (organisms, behaviour battery)."""
    return json.loads(_data_file("prompts.json").read_text(encoding="utf-8"))
