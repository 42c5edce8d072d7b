"""`label_features`: explain and score a set of an atlas' features, resumably (labelled ones are skipped).
Failures (an endpoint that times out or keeps answering nonsense) are reported per feature and left
unlabelled, so a rerun retries exactly those."""

from __future__ import annotations

import math
import random
from typing import Any

from aimri.atlas.db import Atlas
from aimri.autointerp.examples import split_examples
from aimri.autointerp.explainers import Explainer, StatisticalExplainer
from aimri.autointerp.scorers import Scorer
from aimri.progress import progress_bar


def label_features(
    atlas: Atlas, features: list[int], explainer: Explainer, scorers: list[Scorer], seed: int = 0,
    chunk: int = 16, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Label each feature, score the label on held-out examples, and score a random other feature's
    (statistical) label on the same examples as the control. Returns counts, mean scores and failures."""
    for f in features:
        atlas.check_feature(f)
    done = atlas.labelled(explainer.name)
    todo = [f for f in features if f not in done]
    rng = random.Random(seed)
    live = atlas.live_features()
    control_explainer = StatisticalExplainer()
    totals: dict[str, list[float]] = {}
    failures: dict[int, str] = {}
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"label ({explainer.name})", total=len(todo), rate="")
        for start in range(0, len(todo), chunk):
            group = todo[start : start + chunk]
            examples = [split_examples(atlas, f) for f in group]
            labels = explainer.explain_many([ex.explain for ex in examples])
            others = [rng.choice([g for g in live if g != f] or [f]) for f in group]
            controls = [control_explainer.explain(split_examples(atlas, o).explain) for o in others]
            scores: list[dict[str, Any]] = [{"control_feature": o} for o in others]
            ok = [i for i, lab in enumerate(labels) if isinstance(lab, str)]
            for i, lab in enumerate(labels):
                if not isinstance(lab, str):
                    failures[group[i]] = f"explainer: {lab}"
            for scorer in scorers:
                items = [(labels[i], examples[i]) for i in ok] + [(controls[i], examples[i]) for i in ok]
                results = scorer.score_many(items)  # type: ignore[arg-type]
                for j, i in enumerate(ok):
                    for key, value in ((scorer.name, results[j]), (f"{scorer.name}_control", results[len(ok) + j])):
                        if isinstance(value, Exception):
                            scores[i][key] = None
                            scores[i].setdefault("errors", []).append(f"{key}: {value}")
                            failures.setdefault(group[i], f"{key}: {value}")
                        else:
                            scores[i][key] = value
                            if not math.isnan(value):
                                totals.setdefault(key, []).append(value)
            for i in ok:
                if group[i] not in failures:
                    atlas.save_label(group[i], explainer.name, labels[i], scores[i])  # type: ignore[arg-type]
            bar.update(task, advance=len(group), rate=str(labels[ok[-1]])[:40] if ok else "")
    return {
        "labelled": len(todo) - len(failures),
        "skipped": len(features) - len(todo),
        "failed": {str(f): why for f, why in failures.items()},
        **{f"mean_{k}": sum(v) / len(v) for k, v in totals.items()},
    }
