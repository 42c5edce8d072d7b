"""Comparing label scores across atlases: are dictionary features more interpretable than neurons?"""

from __future__ import annotations

import json
import math
import random
from typing import Any

from aimri.atlas.db import Atlas
from aimri.errors import AimriError


def _bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def compare_atlases(atlases: list[Atlas], explainer: str, scorer: str) -> list[dict[str, Any]]:
    """Per atlas: mean score of its labels, mean score of the random-label control on the same examples,
    and the paired gap with a bootstrap 95% interval (only features with both numbers count). `labelled`
    beside `n` shows how many could not be scored at all: a feature that never goes quiet has no silent
    examples to tell its label from (most MLP neurons of a gated MLP fire on half of all tokens)."""
    rows = []
    for atlas in atlases:
        pairs, densities = [], []
        query = "SELECT l.scores, f.density FROM labels l JOIN features f ON f.id = l.feature WHERE l.explainer = ?"
        for text, density in atlas.db.execute(query, (explainer,)):
            densities.append(float(density or 0.0))
            scores = json.loads(text)
            s, c = scores.get(scorer), scores.get(f"{scorer}_control")
            if isinstance(s, float) and isinstance(c, float) and not (math.isnan(s) or math.isnan(c)):
                pairs.append((s, c))
        if not pairs:
            raise AimriError(f"{atlas.path} has no {explainer!r} labels scored by {scorer!r}; run `mri label` first")
        gaps = [s - c for s, c in pairs]
        rows.append({
            "atlas": f"{atlas.meta.get('dictionary_name', atlas.path.name)} @ {atlas.meta.get('site', '?')}",
            "labelled": len(densities),
            "n": len(pairs),
            "median_density": sorted(densities)[len(densities) // 2],
            "score": sum(s for s, _ in pairs) / len(pairs),
            "control": sum(c for _, c in pairs) / len(pairs),
            "gap": sum(gaps) / len(gaps),
            "gap_ci": _bootstrap_ci(gaps),
        })  # fmt: skip
    return rows
