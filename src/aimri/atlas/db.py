"""The atlas database: one SQLite file (stdlib, no server), read by feature cards, explainers and
scorers, and exported as Neuronpedia-style JSONL.

Schema
    meta(key TEXT PRIMARY KEY, value TEXT)            JSON values: dictionary, model, site, tokens, ...
    features(id INTEGER PRIMARY KEY, fires, density, mean_act, max_act,
             quantiles TEXT,                          JSON {"0.5": v, "0.9": v, "0.99": v, ...} of
                                                      activations when firing (log-binned, ~15%)
             logits_top TEXT, logits_bottom TEXT,     JSON [[token, value], ...]: decoder direction x W_U
             neighbours TEXT, cofiring TEXT)          JSON [[feature, cosine | jaccard], ...]
    windows(id INTEGER PRIMARY KEY, tokens TEXT)      JSON token strings of one context window
    examples(feature, kind, rank, quantile, window, peak, acts BLOB)
                                                      kind: top | sample | negative (peak under 5% of
                                                      the feature's max); acts: float16 per token of the
                                                      window; index on (feature, kind)
    labels(feature, explainer, label, scores TEXT, created REAL, PRIMARY KEY (feature, explainer))
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from aimri.errors import AimriError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS features (
    id INTEGER PRIMARY KEY, fires INTEGER, density REAL, mean_act REAL, max_act REAL, quantiles TEXT,
    logits_top TEXT, logits_bottom TEXT, neighbours TEXT, cofiring TEXT);
CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY, tokens TEXT);
CREATE TABLE IF NOT EXISTS examples (
    feature INTEGER, kind TEXT, rank INTEGER, quantile INTEGER, window INTEGER, peak REAL, acts BLOB);
CREATE INDEX IF NOT EXISTS examples_feature ON examples (feature, kind);
CREATE TABLE IF NOT EXISTS labels (
    feature INTEGER, explainer TEXT, label TEXT, scores TEXT, created REAL, PRIMARY KEY (feature, explainer));
"""


class Atlas:
    """An atlas file. `Atlas(path)` opens an existing one; `Atlas.create(path)` starts a new one."""

    def __init__(self, path: str | Path, _create: bool = False) -> None:
        self.path = Path(path)
        if not _create:
            if not self.path.is_file():
                raise AimriError(f"{self.path} is not an atlas file; build one with `mri atlas`")
            try:
                with open(self.path, "rb") as f:
                    if f.read(16) != b"SQLite format 3\x00":
                        raise AimriError(f"{self.path} is not an atlas (not an SQLite file)")
            except OSError as err:
                raise AimriError(f"cannot read {self.path}: {err}") from err
        if _create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        if _create:
            self.db.executescript(SCHEMA)
        try:
            self.meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as err:
            raise AimriError(f"{self.path} is not a readable atlas ({err}); rebuild it with `mri atlas`") from err
        if not _create and not self.meta.get("complete"):
            raise AimriError(f"{self.path} is an unfinished atlas build; rerun `mri atlas` to finish it")

    @classmethod
    def create(cls, path: str | Path) -> Atlas:
        return cls(path, _create=True)

    # -- writing ----------------------------------------------------------------------------------
    def set_meta(self, **values: Any) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()]
        )
        self.meta.update(values)

    def commit(self) -> None:
        self.db.commit()

    # -- reading ----------------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return int(self.meta["d_sae"])

    def check_feature(self, feature: int) -> None:
        if not 0 <= feature < self.n_features:
            raise AimriError(f"feature {feature} is out of range: this atlas has features 0..{self.n_features - 1}")

    def check_dictionary(self, dictionary: Any) -> None:
        """Refuse to read this atlas as describing another dictionary (weights hashed at build time)."""
        from aimri.dictionaries.base import dictionary_sha  # lazily: torch only when a dictionary is checked

        built, given = self.meta.get("dictionary_sha"), dictionary_sha(dictionary)
        if built != given:
            raise AimriError(
                f"{self.path} was built from another dictionary ({self.meta.get('dictionary_name')}, weights "
                f"{built}) than the one given (weights {given}); rebuild it with `mri atlas`"
            )

    def examples(self, feature: int, kind: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT e.rank, e.quantile, e.window, e.peak, e.acts, w.tokens FROM examples e "
            "JOIN windows w ON w.id = e.window WHERE e.feature = ? AND e.kind = ? ORDER BY e.rank",
            (feature, kind),
        ).fetchall()
        return [
            {
                "rank": rank,
                "quantile": quantile,
                "window": window,
                "peak": peak,
                "acts": np.frombuffer(acts, dtype=np.float16).astype(np.float32).tolist(),
                "tokens": json.loads(tokens),
            }
            for rank, quantile, window, peak, acts, tokens in rows
        ]

    def card(self, feature: int, n_top: int = 10) -> dict[str, Any]:
        """Everything known about one feature: statistics, examples, logit effects, neighbours, labels."""
        self.check_feature(feature)
        row = self.db.execute("SELECT * FROM features WHERE id = ?", (feature,)).fetchone()
        if row is None:
            raise AimriError(f"feature {feature} has no entry in {self.path}")
        cols = [d[0] for d in self.db.execute("SELECT * FROM features LIMIT 0").description]
        card: dict[str, Any] = dict(zip(cols, row, strict=True))
        for key in ("quantiles", "logits_top", "logits_bottom", "neighbours", "cofiring"):
            card[key] = json.loads(card[key]) if card[key] else None
        card["top_examples"] = self.examples(feature, "top")[:n_top]
        card["labels"] = [
            {"explainer": e, "label": label, "scores": json.loads(s) if s else {}}
            for e, label, s in self.db.execute(
                "SELECT explainer, label, scores FROM labels WHERE feature = ? ORDER BY created", (feature,)
            )
        ]
        card["address"] = f"{self.meta.get('site', '?')}/{self.meta.get('dictionary_name', '?')}#{feature}"
        return card

    def labelled(self, explainer: str) -> set[int]:
        return {f for (f,) in self.db.execute("SELECT feature FROM labels WHERE explainer = ?", (explainer,))}

    def save_label(self, feature: int, explainer: str, label: str, scores: dict[str, Any], commit: bool = True) -> None:
        """Store a feature's label; `commit=False` leaves the commit to the caller (one per batch of labels)."""
        self.db.execute(
            "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?)",
            (feature, explainer, label, json.dumps(scores), time.time()),
        )
        if commit:
            self.db.commit()

    def search(self, words: list[str], limit: int = 10) -> list[tuple[int, float]]:
        """Features whose top examples peak on one of `words` (case and spaces ignored), as
        (feature, fraction of its top examples that do), best first: "find me a Paris feature"."""
        wanted = {w.strip().lower() for w in words if w.strip()}
        hits: dict[int, list[int]] = {}
        rows = self.db.execute(
            "SELECT e.feature, e.acts, w.tokens FROM examples e JOIN windows w ON w.id = e.window WHERE e.kind = 'top'"
        )
        for feature, acts, tokens in rows:
            peak = int(np.frombuffer(acts, dtype=np.float16).argmax())
            tally = hits.setdefault(feature, [0, 0])
            tally[0] += json.loads(tokens)[peak].strip().lower() in wanted
            tally[1] += 1
        ranked = sorted(((f, h / n) for f, (h, n) in hits.items() if h), key=lambda t: (-t[1], t[0]))
        return ranked[:limit]

    def live_features(self, min_fires: int = 1) -> list[int]:
        return [f for (f,) in self.db.execute("SELECT id FROM features WHERE fires >= ? ORDER BY id", (min_fires,))]

    # -- export -----------------------------------------------------------------------------------
    def neuronpedia_records(self) -> Iterator[dict[str, Any]]:
        """Neuronpedia-style feature records (the fields its feature JSON uses)."""
        model, source = self.meta.get("model", ""), self.meta.get("neuronpedia_source", self.meta.get("site", ""))
        for (feature,) in self.db.execute("SELECT id FROM features ORDER BY id").fetchall():
            card = self.card(feature, n_top=1_000)
            top, bottom = card["logits_top"] or [], card["logits_bottom"] or []
            neighbours = card["neighbours"] or []
            yield {
                "modelId": model,
                "layer": source,
                "index": feature,
                "frac_nonzero": card["density"],
                "maxActApprox": card["max_act"],
                "pos_str": [t for t, _ in top],
                "pos_values": [v for _, v in top],
                "neg_str": [t for t, _ in bottom],
                "neg_values": [v for _, v in bottom],
                "topkCosSimIndices": [i for i, _ in neighbours],
                "topkCosSimValues": [v for _, v in neighbours],
                "activations": [
                    {
                        "tokens": ex["tokens"],
                        "values": ex["acts"],
                        "maxValue": max(ex["acts"], default=0.0),
                        "maxValueTokenIndex": int(np.argmax(ex["acts"])) if ex["acts"] else 0,
                    }
                    for ex in card["top_examples"]
                ],
                "explanations": [
                    {"description": lab["label"], "explanationModelName": lab["explainer"], "scores": lab["scores"]}
                    for lab in card["labels"]
                ],
            }

    def export_jsonl(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            for record in self.neuronpedia_records():
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path
