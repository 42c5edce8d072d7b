"""`label_features`: explain and score a set of an atlas' features, resumably (labelled ones are skipped)."""

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
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Label each feature, score the label on held-out examples, and score a random other feature's label
    on the same examples as the control. Returns the run's mean scores and controls."""
    for f in features:
        atlas.check_feature(f)
    done = atlas.labelled(explainer.name)
    todo = [f for f in features if f not in done]
    rng = random.Random(seed)
    live = atlas.live_features()
    fallback = StatisticalExplainer()
    totals: dict[str, list[float]] = {}
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"label ({explainer.name})", total=len(todo), rate="")
        for f in todo:
            examples = split_examples(atlas, f)
            label = explainer.explain(examples.explain)
            other = rng.choice([g for g in live if g != f] or [f])
            control = fallback.explain(split_examples(atlas, other).explain)
            scores: dict[str, Any] = {"control_feature": other}
            for scorer in scorers:
                scores[scorer.name] = scorer.score(label, examples)
                scores[f"{scorer.name}_control"] = scorer.score(control, examples)
                for key in (scorer.name, f"{scorer.name}_control"):
                    if not math.isnan(scores[key]):
                        totals.setdefault(key, []).append(scores[key])
            atlas.save_label(f, explainer.name, label, scores)
            bar.update(task, advance=1, rate=label[:40])
    return {
        "labelled": len(todo),
        "skipped": len(features) - len(todo),
        **{f"mean_{k}": sum(v) / len(v) for k, v in totals.items()},
    }
