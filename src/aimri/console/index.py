"""A search index beside an atlas, so the console answers in milliseconds on atlases of 100k+ features.

The atlas stores examples as windows and per-token activations; searching by a feature's peak token or by
example text would otherwise scan every example (seconds on a large atlas). The index is one SQLite file
next to the atlas (ATLAS.console-index), built once, rebuilt when the atlas changes (size + mtime), never
written into the atlas itself:

    peaks(token, feature, hits, n)     the token each top example peaks on (lower-cased, stripped)
    window_features(window, feature, peak)
    window_text (FTS5: window, text)   each example window's text
    label_text (FTS5: feature, label)  each feature's latest label
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from aimri.paths import fsync_dir

VERSION = 1


def index_path(atlas: Path) -> Path:
    return atlas.with_name(atlas.name + ".console-index")


def _stamp(atlas: Path) -> str:
    st = atlas.stat()
    return f"{VERSION}:{st.st_size}:{st.st_mtime_ns}"


def ensure_index(atlas: Path) -> Path:
    """The index of `atlas`, built (to a temp file, then renamed) if missing or stale."""
    path = index_path(atlas)
    if path.exists():
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'stamp'").fetchone()
            if row and row[0] == _stamp(atlas):
                return path
        except sqlite3.DatabaseError:
            pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{atlas}?mode=ro", uri=True)
    db = sqlite3.connect(tmp)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE peaks (token TEXT, feature INTEGER, hits INTEGER, n INTEGER);
        CREATE TABLE window_features (window INTEGER, feature INTEGER, peak REAL);
        CREATE VIRTUAL TABLE window_text USING fts5(window UNINDEXED, text);
        CREATE VIRTUAL TABLE label_text USING fts5(feature UNINDEXED, label);
        """
    )
    counts: dict[tuple[str, int], int] = {}
    totals: dict[int, int] = {}
    windows: dict[int, str] = {}
    rows = src.execute(
        "SELECT e.feature, e.window, e.peak, e.acts, w.tokens FROM examples e JOIN windows w ON w.id = e.window "
        "WHERE e.kind = 'top'"
    )
    batch: list[tuple[int, int, float]] = []
    for feature, window, peak, acts, tokens_json in rows:
        tokens = json.loads(tokens_json)
        at = int(np.frombuffer(acts, dtype=np.float16).argmax()) if acts else 0
        token = tokens[at].strip().lower() if at < len(tokens) else ""
        counts[(token, feature)] = counts.get((token, feature), 0) + 1
        totals[feature] = totals.get(feature, 0) + 1
        if window not in windows:
            windows[window] = "".join(tokens)
        batch.append((window, feature, float(peak or 0.0)))
        if len(batch) >= 50_000:
            db.executemany("INSERT INTO window_features VALUES (?, ?, ?)", batch)
            batch.clear()
    db.executemany("INSERT INTO window_features VALUES (?, ?, ?)", batch)
    db.executemany("INSERT INTO peaks VALUES (?, ?, ?, ?)", ((t, f, c, totals[f]) for (t, f), c in counts.items()))
    db.executemany("INSERT INTO window_text VALUES (?, ?)", windows.items())
    labels = src.execute(
        "SELECT feature, label FROM labels l WHERE created = (SELECT MAX(created) FROM labels WHERE feature = l.feature)"
    )
    db.executemany("INSERT INTO label_text VALUES (?, ?)", ((f, label) for f, label in labels if label))
    db.executescript(
        "CREATE INDEX peaks_token ON peaks (token); CREATE INDEX window_features_window ON window_features (window);"
    )
    db.execute("INSERT INTO meta VALUES ('stamp', ?)", (_stamp(atlas),))
    db.commit()
    db.close()
    src.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def _fts_query(text: str) -> str:
    """Each word as a quoted FTS5 phrase (so user input is never FTS syntax), all required."""
    words = [w.replace('"', '""') for w in text.split() if w.strip()]
    return " AND ".join(f'"{w}"' for w in words)


def search(index: Path, query: str, by: str, limit: int) -> list[dict[str, Any]]:
    """Features matching `query`: by "label" (words in the latest label), "token" (the token top examples
    peak on) or "text" (words in a top example's window), best first."""
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        if by == "token":
            rows = db.execute(
                "SELECT feature, CAST(hits AS REAL) / n AS score FROM peaks WHERE token = ? "
                "ORDER BY score DESC, feature LIMIT ?",
                (query.strip().lower(), limit),
            ).fetchall()
        elif by == "label":
            rows = db.execute(
                "SELECT feature, -bm25(label_text) FROM label_text WHERE label_text MATCH ? ORDER BY bm25(label_text) LIMIT ?",
                (_fts_query(query), limit),
            ).fetchall()
        else:
            rows = db.execute(
                "SELECT wf.feature, MAX(wf.peak) AS best FROM (SELECT window FROM window_text WHERE window_text MATCH ? "
                "LIMIT 2000) AS hit JOIN window_features wf ON wf.window = hit.window GROUP BY wf.feature "
                "ORDER BY best DESC LIMIT ?",
                (_fts_query(query), limit),
            ).fetchall()
    finally:
        db.close()
    return [{"feature": int(f), "score": round(float(s), 4)} for f, s in rows]
