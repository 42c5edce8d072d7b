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
    and the paired gap with a bootstrap 95% interval (only features with both numbers count)."""
    rows = []
    for atlas in atlases:
        pairs = []
        for (text,) in atlas.db.execute("SELECT scores FROM labels WHERE explainer = ?", (explainer,)):
            scores = json.loads(text)
            s, c = scores.get(scorer), scores.get(f"{scorer}_control")
            if isinstance(s, float) and isinstance(c, float) and not (math.isnan(s) or math.isnan(c)):
                pairs.append((s, c))
        if not pairs:
            raise AimriError(f"{atlas.path} has no {explainer!r} labels scored by {scorer!r}; run `mri label` first")
        gaps = [s - c for s, c in pairs]
        rows.append({
            "atlas": f"{atlas.meta.get('dictionary_name', atlas.path.name)} @ {atlas.meta.get('site', '?')}",
            "n": len(pairs),
            "score": sum(s for s, _ in pairs) / len(pairs),
            "control": sum(c for _, c in pairs) / len(pairs),
            "gap": sum(gaps) / len(gaps),
            "gap_ci": _bootstrap_ci(gaps),
        })  # fmt: skip
    return rows
