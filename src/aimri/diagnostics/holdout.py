"""A sealed holdout: checkup results kept like a hidden test set (Dwork et al., "The reusable holdout",
Science 2015). Queries are answered by Thresholdout: from the open split unless it differs from the sealed
split by more than a noisy threshold; then the sealed value plus noise is answered and one unit of budget is
spent; once the budget is gone every query is refused. Every query is recorded in an append-only ledger whose
entries are hash-chained, so an edited, reordered or deleted entry is detected.

Parameters and what they buy (Dwork et al., Thm. 9 and §3): with threshold T, Laplace noise of scale sigma on
a statistic of sensitivity 1/n (a mean of per-example values in [0, 1]), and budget B, Thresholdout answers
m adaptively chosen queries each within tau of its true value with probability 1 - beta when
n >= C * ln(m / beta) * sqrt(B * ln(m / beta)) / tau^2 (T and sigma of order tau). The defaults, T = 0.04 and
sigma = 0.01, are the paper's for n = 10,000; for an AUROC (sensitivity 1/min(n_pos, n_neg)) the noise is
scaled up by n / min(n_pos, n_neg).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimri.errors import AimriError
from aimri.paths import atomic_write_text, fsync_dir

STATISTICS = ("mean", "auroc")  # the statistics whose sensitivity is known


class HoldoutError(AimriError):
    pass


class BudgetSpent(HoldoutError):
    pass


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return _digest(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


@dataclass
class Params:
    threshold: float = 0.04
    noise: float = 0.01
    budget: int = 20
    seed: int | None = None  # fixed only in tests; otherwise the noise is unpredictable


def seal(items: Sequence[dict[str, Any]], out: Path, params: Params | None = None, open_frac: float = 0.5,
         config: dict[str, Any] | None = None, seed: int = 0,
         open_items: Sequence[dict[str, Any]] | None = None) -> Path:  # fmt: skip
    """Split labelled items into an open and a sealed part (or seal all of `items` with `open_items` as the
    open split) and store them with a content hash and the ledger's first entry. Items are dicts with a
    "label" (0/1) and whatever the queries read."""
    params = params or Params()
    if not items:
        raise HoldoutError("nothing to seal: the diagnostic set is empty")
    if any(it.get("label") not in (0, 1) for it in [*items, *(open_items or [])]):
        raise HoldoutError("every item needs a 0/1 'label'")
    if out.exists() and any(out.iterdir()):
        raise HoldoutError(f"{out} exists and is not empty; a sealed set is never overwritten")
    if open_items is None:
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        n_open = round(open_frac * len(items))
        open_items = [items[i] for i in order[:n_open]]
        sealed_items = [items[i] for i in order[n_open:]]
    else:
        sealed_items = list(items)
    if not open_items:
        raise HoldoutError("the open split is empty; Thresholdout answers from it")
    if len(sealed_items) < 2:
        raise HoldoutError("the sealed split would hold fewer than 2 items; give more items or a smaller open fraction")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sealed").mkdir()
    sealed_bytes = "".join(json.dumps(it, sort_keys=True) + "\n" for it in sealed_items).encode()
    open_bytes = "".join(json.dumps(it, sort_keys=True) + "\n" for it in open_items).encode()
    atomic_write_text(out / "sealed" / "items.jsonl", sealed_bytes.decode())
    atomic_write_text(out / "open.jsonl", open_bytes.decode())
    manifest = {
        "sealed_sha256": _digest(sealed_bytes), "open_sha256": _digest(open_bytes),
        "n_sealed": len(sealed_items), "n_open": len(open_items), "params": vars(params), "config": config or {},
        "created": time.time(),
    }  # fmt: skip
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    h = Holdout(out)
    with h._locked():
        h._append({"kind": "seal", "sealed_sha256": manifest["sealed_sha256"], "budget_left": params.budget})
    return out


class Holdout:
    """A sealed set on disk. Only aggregate, noise-protected answers leave it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").exists():
            raise HoldoutError(
                f"{self.path} is not a sealed holdout (no manifest.json); make one with `mri holdout seal`"
            )
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.params = Params(**self.manifest["params"])
        self.ledger = self.path / "ledger.jsonl"
        self.head = self.path / "ledger.head"
        self._rng = random.Random(self.params.seed) if self.params.seed is not None else random.SystemRandom()

    # -- storage -----------------------------------------------------------------------------------------------

    def _read(self, name: str, expected: str) -> list[dict[str, Any]]:
        data = (self.path / name).read_bytes()
        if _digest(data) != expected:
            raise HoldoutError(
                f"{self.path / name} was modified on disk (content hash differs from the seal); the holdout is void"
            )
        return [json.loads(line) for line in data.decode().splitlines() if line]

    def open_items(self) -> list[dict[str, Any]]:
        return self._read("open.jsonl", self.manifest["open_sha256"])

    def _sealed_items(self) -> list[dict[str, Any]]:
        return self._read("sealed/items.jsonl", self.manifest["sealed_sha256"])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time reads the ledger, decides and appends: no budget is spent twice."""
        with open(self.path / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self._recover()
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def entries(self) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        return [json.loads(line) for line in self.ledger.read_text().splitlines() if line]

    def _recover(self) -> None:
        """After a crash: a half-written last line never produced an answer, so it is dropped; a whole entry
        written before the head was updated was answered, so the head moves to it."""
        if not self.ledger.exists():
            return
        raw = self.ledger.read_bytes()
        if raw and not raw.endswith(b"\n"):
            with open(self.ledger, "r+b") as f:
                f.truncate(raw.rfind(b"\n") + 1)
                os.fsync(f.fileno())
        head = json.loads(self.head.read_text()) if self.head.exists() else None
        entries = self.entries()
        if entries and (head is None or head["seq"] == entries[-1]["seq"] - 1):
            atomic_write_text(self.head, json.dumps({"seq": entries[-1]["seq"], "hash": entries[-1]["hash"]}))

    def _append(self, entry: dict[str, Any]) -> dict[str, Any]:
        entries = self.entries()
        prev = entries[-1] if entries else None
        entry = {
            "seq": prev["seq"] + 1 if prev else 0,
            "time": time.time(),
            "prev": prev["hash"] if prev else "",
            **entry,
        }
        entry["hash"] = _entry_hash(entry)
        with open(self.ledger, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path)
        atomic_write_text(self.head, json.dumps({"seq": entry["seq"], "hash": entry["hash"]}))
        return entry

    def budget_left(self) -> int:
        entries = self.entries()
        return int(entries[-1]["budget_left"]) if entries else self.params.budget

    # -- queries -----------------------------------------------------------------------------------------------

    def _laplace(self, scale: float) -> float:
        u = self._rng.random() - 0.5
        return -scale * (1 if u >= 0 else -1) * math.log(max(1e-300, 1 - 2 * abs(u)))

    def query(
        self,
        statistic: str,
        score: Callable[[list[dict[str, Any]]], Sequence[float]],
        name: str = "",
        by: str | None = None,
    ) -> float:
        """Answer `statistic` ("mean" of per-item values in [0, 1], or "auroc" of per-item scores against the
        items' labels) through Thresholdout; `score` maps items to per-item values and is run on both splits."""
        if statistic not in STATISTICS:
            raise HoldoutError(
                f"unknown statistic {statistic!r}: the holdout answers {', '.join(STATISTICS)} (known sensitivity)"
            )
        sealed, open_ = self._sealed_items(), self.open_items()
        with self._locked():
            left = self.budget_left()
            if left <= 0:
                raise BudgetSpent(
                    f"{self.path}: the holdout's budget is spent; no more answers (see `mri holdout log`)"
                )
            a_open, _ = _statistic(statistic, open_, score)
            a_sealed, sensitivity = _statistic(statistic, sealed, score)
            scale = self.params.noise * sensitivity * len(sealed)  # the paper's sigma is for sensitivity 1/n
            if abs(a_sealed - a_open) > self.params.threshold + self._laplace(2 * scale):
                answer, source, left = min(1.0, max(0.0, a_sealed + self._laplace(scale))), "sealed", left - 1
            else:
                answer, source = a_open, "open"
            self._append({"kind": "query", "by": by or getpass.getuser(), "name": name, "statistic": statistic,
                          "answer": round(answer, 6), "source": source, "budget_left": left})  # fmt: skip
        return answer

    # -- audit -------------------------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Problems with the ledger and the sealed files (empty when intact): edited, reordered, deleted or
        truncated entries, and any change to the sealed or open items."""
        problems = []
        for name, key in (("sealed/items.jsonl", "sealed_sha256"), ("open.jsonl", "open_sha256")):
            if not (self.path / name).exists() or _digest((self.path / name).read_bytes()) != self.manifest[key]:
                problems.append(f"{name} differs from its sealed content hash")
        raw = self.ledger.read_bytes() if self.ledger.exists() else b""
        if raw and not raw.endswith(b"\n"):
            problems.append("the ledger's last line is incomplete (truncated)")
        prev_hash, expected_seq = "", 0
        budget = self.params.budget
        for n, line in enumerate(raw.decode(errors="replace").splitlines(), 1):
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"ledger line {n} is not JSON")
                continue
            if e.get("hash") != _entry_hash(e):
                problems.append(f"ledger entry {e.get('seq', n)} was edited (its hash does not match its content)")
            if e.get("seq") != expected_seq:
                problems.append(
                    f"ledger line {n}: entry {e.get('seq')} where {expected_seq} was expected (deleted or reordered)"
                )
            if e.get("prev") != prev_hash:
                problems.append(
                    f"ledger entry {e.get('seq', n)} does not chain to the one before it (deleted, inserted or reordered)"
                )
            if e.get("kind") == "query":
                budget -= e.get("source") == "sealed"
                if e.get("budget_left") != budget:
                    problems.append(
                        f"ledger entry {e.get('seq')} records budget {e.get('budget_left')} where {budget} is left"
                    )
            prev_hash, expected_seq = (
                e.get("hash", ""),
                (e.get("seq") if isinstance(e.get("seq"), int) else expected_seq) + 1,
            )
        head = json.loads(self.head.read_text()) if self.head.exists() else None
        if head is None or head.get("hash") != prev_hash:
            problems.append(
                "the ledger ends before its recorded head (entries deleted from the end, or the file truncated)"
            )
        return problems


def _statistic(
    statistic: str, items: list[dict[str, Any]], score: Callable[[list[dict[str, Any]]], Sequence[float]]
) -> tuple[float, float]:
    """(value, sensitivity) of a statistic on items."""
    values = [float(v) for v in score(items)]
    if len(values) != len(items):
        raise HoldoutError(f"the query returned {len(values)} values for {len(items)} items")
    if statistic == "mean":
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise HoldoutError("a 'mean' query needs per-item values in [0, 1] (its sensitivity is then 1/n)")
        return sum(values) / len(values), 1.0 / len(values)
    pos = [v for v, it in zip(values, items, strict=True) if it["label"] == 1]
    neg = [v for v, it in zip(values, items, strict=True) if it["label"] == 0]
    if not pos or not neg:
        raise HoldoutError("an 'auroc' query needs both labels among the items")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg)), 1.0 / min(len(pos), len(neg))


def items_from_file(name_or_path: str) -> list[dict[str, Any]]:
    """Labelled items: a JSONL file ({"messages" or "text", "label"}) or a shipped trait, whose test pairs
    become items (positive = 1, negative = 0)."""
    from aimri.diagnostics.datasets import TRAITS, load_dataset

    if name_or_path in TRAITS:
        pairs = load_dataset(name_or_path).split("test")
        return [{"messages": m, "label": y} for p in pairs for m, y in ((p.positive, 1), (p.negative, 0))]
    path = Path(name_or_path)
    if not path.exists():
        raise HoldoutError(
            f"no diagnostic set {name_or_path!r}: give a JSONL file of labelled items or one of {', '.join(TRAITS)}"
        )
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise HoldoutError(f"{path}:{n}: not JSON ({err.msg})") from err
    return items


def probe_scorer(subject: Any, trait: str, statistic: str) -> Callable[[list[dict[str, Any]]], list[float]]:
    """Per-item values from one of the checkup's trait probes on `subject` (trained once per model revision):
    the probe's score for an AUROC, or whether its sign matches the label for a mean (detection accuracy)."""
    from aimri.diagnostics.checkup import model_cache, probe_from, probes_stage
    from aimri.diagnostics.probes import read_layers

    data, directions = model_cache(subject).stage("probes", lambda: probes_stage(subject))
    if trait not in data:
        raise HoldoutError(f"no probe {trait!r}; the checkup has {', '.join(data)}")
    probe = probe_from(data[trait], directions[trait])

    def score(items: list[dict[str, Any]]) -> list[float]:
        convs = [it.get("messages") or [{"role": "user", "content": it["text"]}] for it in items]
        s = probe.score(read_layers(subject, convs, [probe.layer], label="holdout items")[:, 0])
        if statistic == "auroc":
            return s.tolist()
        return [float((v > 0) == bool(it["label"])) for v, it in zip(s.tolist(), items, strict=True)]

    return score


def scan_scorer(
    scan_root: Path | None = None, on_scan: Callable[[Path], Any] | None = None
) -> Callable[[list[dict[str, Any]]], list[float]]:
    """Per-item suspicion from the checkup, for items that name an organism ({"organism": DIR, "label"}):
    each is scanned against the base model its ground truth records. Finished scans under `scan_root` are
    reused (and re-scored there: `on_scan(scan_dir)` runs after each, e.g. the report writer, so the folder
    stays consistent); without it the scans run in a temporary folder that is deleted, so nothing item-level
    stays."""
    import tempfile

    import aimri
    from aimri.diagnostics.checkup import run_checkup
    from aimri.diagnostics.organisms import read_record

    def score(items: list[dict[str, Any]]) -> list[float]:
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            root = scan_root or Path(tmp)
            for it in items:
                if "organism" not in it:
                    raise HoldoutError("a scan query needs items that name an organism directory ('organism')")
                org = Path(it["organism"]).expanduser()
                record = read_record(org)
                result = run_checkup(
                    aimri.load(org), root / org.name, baseline=aimri.load(record["base"]), log=lambda m: None
                )
                if scan_root is not None and on_scan is not None:
                    on_scan(root / org.name)
                out.append(float(result["suspicion"]))
        return out

    return score
