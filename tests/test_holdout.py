"""The sealed holdout: Thresholdout against an adaptive analyst, a tamper-evident ledger, budget under
concurrency and kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers import spender

from aimri.diagnostics.holdout import BudgetSpent, Holdout, HoldoutError, Params, seal


def _items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": i, "label": int(rng.integers(0, 2))} for i in range(n)]


def _attack(
    reuse: bool, tmp_path: Path, n: int = 1000, d: int = 1000, k: int = 60, seed: int = 1
) -> tuple[float, float]:
    """Dwork et al.'s attack on random data (no feature predicts the label): keep the features whose
    correlation with the label agrees in sign on the training set and the holdout, build a vote classifier,
    report its holdout accuracy. Returns (reported holdout accuracy, accuracy on fresh data ~ 0.5)."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-1, 1], size=(3 * n, d))
    y = rng.choice([-1, 1], size=3 * n)
    train, hold, fresh = slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)
    items = [{"id": i, "label": int(y[i] > 0)} for i in range(n, 2 * n)]
    holdout = None
    if reuse:  # as in the paper, the open split is the analyst's training set
        train_items = [{"id": i, "label": int(y[i] > 0)} for i in range(n)]
        holdout = Holdout(seal(items, tmp_path / "sealed", Params(budget=10_000, seed=seed), open_items=train_items))

    def corr_query(i: int, rows: list[dict]) -> list[float]:
        return [(x[r["id"], i] * (1 if r["label"] else -1) + 1) / 2 for r in rows]

    c_train = (x[train] * y[train, None]).mean(0)
    if reuse:
        assert holdout is not None
        c_hold = np.array([2 * holdout.query("mean", lambda rows, i=i: corr_query(i, rows)) - 1 for i in range(d)])
    else:
        c_hold = (x[hold] * y[hold, None]).mean(0)
    agree = np.sign(c_train) == np.sign(c_hold)
    strength = np.where(agree, np.abs(c_train), 0)
    chosen = np.argsort(-strength)[:k]
    w = np.zeros(d)
    w[chosen] = np.sign(c_train[chosen])

    def correct(rows: list[dict]) -> list[float]:
        return [float(np.sign(x[r["id"]] @ w + 1e-9) == (1 if r["label"] else -1)) for r in rows]

    reported = holdout.query("mean", correct) if holdout else float(np.mean(correct(items)))
    fresh_acc = float(np.mean(np.sign(x[fresh] @ w + 1e-9) == y[fresh]))
    return reported, fresh_acc


def test_thresholdout_resists_the_adaptive_feature_selection_attack(tmp_path: Path) -> None:
    plain, fresh_plain = _attack(False, tmp_path / "a")
    sealed, fresh_sealed = _attack(True, tmp_path / "b")
    assert abs(fresh_plain - 0.5) < 0.05 and abs(fresh_sealed - 0.5) < 0.05  # nothing real to find
    gap_plain, gap_sealed = plain - fresh_plain, sealed - fresh_sealed
    assert gap_plain > 0.05, gap_plain  # the plain holdout is overfit by the analyst
    assert gap_sealed < gap_plain / 2, (gap_sealed, gap_plain)


# -- ledger --------------------------------------------------------------------------------------------------


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    return seal(_items(40), tmp_path / "h", Params(budget=5, seed=0))


def test_budget_is_spent_then_queries_are_refused(sealed: Path) -> None:
    h = Holdout(sealed)
    cheap = h.query("mean", lambda rows: [0.5] * len(rows), name="same on both")  # answered from the open split
    assert cheap == 0.5 and h.budget_left() == 5
    for _ in range(5):
        spender(sealed, by="alice")
    with pytest.raises(BudgetSpent, match="budget is spent"):
        spender(sealed)
    entries = Holdout(sealed).entries()
    assert [e["kind"] for e in entries] == ["seal"] + ["query"] * 6
    assert entries[-1]["by"] == "alice" and entries[-1]["budget_left"] == 0
    assert Holdout(sealed).verify() == []


@pytest.mark.parametrize("edit", ["answer", "reorder", "delete_middle", "delete_last", "truncate", "insert"])
def test_every_kind_of_ledger_edit_is_detected(sealed: Path, edit: str) -> None:
    for _ in range(3):
        spender(sealed)
    ledger = sealed / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    if edit == "answer":
        e = json.loads(lines[2])
        e["answer"] = 0.99
        lines[2] = json.dumps(e, sort_keys=True) + "\n"
    elif edit == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif edit == "delete_middle":
        del lines[2]
    elif edit == "delete_last":
        del lines[-1]
    elif edit == "truncate":
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    elif edit == "insert":
        lines.insert(2, lines[2])
    ledger.write_text("".join(lines))
    assert Holdout(sealed).verify(), f"{edit} went unnoticed"


def test_modified_sealed_items_void_the_holdout(sealed: Path) -> None:
    path = sealed / "sealed" / "items.jsonl"
    rows = path.read_text().splitlines()
    rows[0] = rows[0].replace('"label": 0', '"label": 1').replace('"label": 1', '"label": 0', 0)
    path.write_text("\n".join([*rows[1:], rows[0]]) + "\n")  # reordered: same items, other bytes
    with pytest.raises(HoldoutError, match="modified on disk"):
        spender(sealed)
    assert any("sealed content hash" in p for p in Holdout(sealed).verify())


def test_bad_queries_and_sets(sealed: Path, tmp_path: Path) -> None:
    h = Holdout(sealed)
    with pytest.raises(HoldoutError, match="unknown statistic"):
        h.query("median", lambda rows: [0.0] * len(rows))
    with pytest.raises(HoldoutError, match=r"values in \[0, 1\]"):
        h.query("mean", lambda rows: [2.0] * len(rows))
    with pytest.raises(HoldoutError, match="empty"):
        seal([], tmp_path / "e")
    with pytest.raises(HoldoutError, match="not empty"):
        seal(_items(10), sealed)
    with pytest.raises(HoldoutError, match="not a sealed holdout"):
        Holdout(tmp_path)
    assert h.budget_left() == 5  # refused queries spend nothing


# -- processes -------------------------------------------------------------------------------------------------

SPEND = """
import sys, time
sys.path.insert(0, {root!r})
from tests.helpers import spender
from aimri.diagnostics.holdout import BudgetSpent
n = 0
try:
    while True:
        spender(__import__("pathlib").Path({path!r}), by=sys.argv[1])
        n += 1
        time.sleep(float(sys.argv[2]))
except BudgetSpent:
    pass
print(n)
"""


def _spawn(path: Path, who: str, pause: float) -> subprocess.Popen[str]:
    code = SPEND.format(root=str(Path(__file__).resolve().parents[1]), path=str(path))
    return subprocess.Popen([sys.executable, "-c", code, who, str(pause)], stdout=subprocess.PIPE, text=True)


def test_concurrent_processes_never_overspend(tmp_path: Path) -> None:
    path = seal(_items(40), tmp_path / "h", Params(budget=30, seed=None))
    procs = [_spawn(path, f"p{i}", 0.0) for i in range(4)]
    answered = sum(int(p.communicate(timeout=120)[0]) for p in procs)
    assert answered == 30  # every unit of budget spent exactly once across the four
    h = Holdout(path)
    assert h.budget_left() == 0 and h.verify() == []
    assert {e["by"] for e in h.entries() if e["kind"] == "query"} <= {"p0", "p1", "p2", "p3"}


def test_kill_9_loses_and_double_spends_nothing(tmp_path: Path) -> None:
    path = seal(_items(40), tmp_path / "h", Params(budget=1000, seed=None))
    proc = _spawn(path, "victim", 0.0)
    ledger, deadline = path / "ledger.jsonl", time.time() + 120
    while time.time() < deadline and ledger.read_text().count('"by": "victim"') < 2:  # spending, not starting up
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    h = Holdout(path)
    spender(path, by="after")  # the next query recovers whatever the kill left
    assert h.verify() == []
    spent = sum(e["source"] == "sealed" for e in h.entries() if e["kind"] == "query")
    assert spent >= 2 and h.budget_left() == 1000 - spent


def test_cli_seal_log_verify(tmp_path: Path) -> None:
    mri = str(Path(sys.executable).with_name("mri"))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": i, "text": f"item {i}", "label": i % 2}) + "\n" for i in range(20)))
    out = tmp_path / "h"
    done = subprocess.run(
        [mri, "holdout", "seal", str(items), "--out", str(out), "--budget", "4"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["n_sealed"] == 10
    spender(out, by="cli-test")
    log = subprocess.run([mri, "holdout", "log", str(out)], capture_output=True, text=True)
    assert log.returncode == 0 and "cli-test" in log.stdout and "sealed" in log.stdout
    assert subprocess.run([mri, "holdout", "verify", str(out)], capture_output=True, text=True).returncode == 0
    ledger = out / "ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"budget_left": 3', '"budget_left": 4'))
    bad = subprocess.run([mri, "holdout", "verify", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "edited" in bad.stderr
    again = subprocess.run([mri, "holdout", "seal", str(items), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "never overwritten" in again.stderr


def test_scan_scorer_rescoring_a_kept_scan_runs_the_report_writer_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a scan root the finished scans there are re-scored, and on_scan (the CLI passes the report
    writer) runs on each one's folder, so findings.json and report.html never disagree; without a root the
    scans are temporary and on_scan is not called."""
    import aimri
    from aimri.diagnostics import checkup, organisms
    from aimri.diagnostics.holdout import scan_scorer

    monkeypatch.setattr(aimri, "load", lambda name, **k: name)
    monkeypatch.setattr(organisms, "read_record", lambda org: {"base": "base-model"})
    seen: list[tuple[Any, Path, Any]] = []

    def fake_checkup(subject: Any, out: Path, baseline: Any = None, log: Any = None) -> dict[str, float]:
        seen.append((subject, out, baseline))
        return {"suspicion": 0.75}

    monkeypatch.setattr(checkup, "run_checkup", fake_checkup)
    written: list[Path] = []
    items = [{"organism": str(tmp_path / "org-a"), "label": 1}]
    assert scan_scorer(tmp_path / "scans", on_scan=written.append)(items) == [0.75]
    assert written == [tmp_path / "scans" / "org-a"] and seen[0][2] == "base-model"
    assert scan_scorer(None, on_scan=written.append)(items) == [0.75] and len(written) == 1
