"""`label_features`: explain and score a set of an atlas' features, resumably (labelled ones are skipped).
Failures (an endpoint that times out or keeps answering nonsense) are reported per feature and left
unlabelled, so a rerun retries exactly those."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from aimri.atlas.db import Atlas
from aimri.autointerp.config import LabelConfig
from aimri.autointerp.examples import split_examples
from aimri.autointerp.explainers import Explainer, StatisticalExplainer
from aimri.autointerp.scorers import Scorer
from aimri.errors import AimriError
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
            # the control labels are only scored: with no scorers there is nothing to compute them for
            controls = [control_explainer.explain(split_examples(atlas, o).explain) for o in others] if scorers else []
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
                    atlas.save_label(group[i], explainer.name, labels[i], scores[i], commit=False)  # type: ignore[arg-type]
            atlas.commit()  # once per chunk: a rerun resumes after the last committed chunk
            bar.update(task, advance=len(group), rate=str(labels[ok[-1]])[:40] if ok else "")
    return {
        "labelled": len(todo) - len(failures),
        "skipped": len(features) - len(todo),
        "failed": {str(f): why for f, why in failures.items()},
        **{f"mean_{k}": sum(v) / len(v) for k, v in totals.items()},
    }


def select_features(atlas: Atlas, spec: str) -> list[int]:
    """'0-99,150' -> those ids; 'live:N' -> the first N features that fired. Raises AimriError otherwise."""
    if spec.startswith("live:"):
        try:
            return atlas.live_features()[: int(spec.split(":", 1)[1])]
        except ValueError:
            raise AimriError(f"`features` {spec!r}: use ids and ranges like 0-99,150 or live:100") from None
    ids: list[int] = []
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            ids += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError as err:
        raise AimriError(f"`features` {spec!r}: use ids and ranges like 0-99,150 or live:100") from err
    return ids


def endpoint_client(endpoint: str, llm_model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8) -> Any:
    """A ChatClient for an OpenAI-compatible endpoint, its key from `api_key_env`, replies cached in
    AIMRI_HOME/llm-cache.sqlite (shared by every labelling job)."""
    import os

    from aimri.autointerp.llm import ChatClient
    from aimri.paths import aimri_home

    return ChatClient(endpoint, llm_model, api_key=os.environ.get(api_key_env), concurrency=concurrency,
                      cache=aimri_home() / "llm-cache.sqlite")  # fmt: skip


def label_atlas(atlas_path: Path, config: LabelConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Label an atlas's features with the configured explainer and score each label with the configured
    scorers beside a random-label control (autointerp as in Bills et al. 2023 and EleutherAI's delphi);
    resumable. Returns `label_features`' summary, plus the LLM usage when an LLM was called.

    Raises AimriError for an unknown explainer or scorer, or an endpoint without `llm_model`."""
    from aimri.autointerp.explainers import LLMExplainer
    from aimri.autointerp.llm import ChatBackend, ChatClient, HFChat
    from aimri.autointerp.scorers import DetectionScorer, EmbeddingScorer, FuzzingScorer, SimulationScorer
    from aimri.subject.names import DEFAULT_MODEL

    c = config or LabelConfig()
    backend: ChatBackend | None = None
    if c.explainer == "openai" or {"detection", "fuzzing", "simulation"} & set(c.scorer):
        if c.endpoint:
            if not c.llm_model:
                raise AimriError("`endpoint` needs `llm_model` (the model name the server serves)")
            backend = endpoint_client(c.endpoint, c.llm_model, c.api_key_env, c.concurrency)
        elif c.explainer.startswith("hf") or c.explainer == "statistical":
            backend = HFChat(c.explainer.partition(":")[2] or DEFAULT_MODEL)
        else:
            raise AimriError("the openai explainer needs an `endpoint` URL and `llm_model` NAME")
    explainer: Explainer
    if c.explainer == "statistical":
        explainer = StatisticalExplainer()
    elif c.explainer == "openai" or c.explainer.startswith("hf"):
        explainer = LLMExplainer(backend or HFChat(c.explainer.partition(":")[2] or DEFAULT_MODEL))
    else:
        raise AimriError(f"unknown `explainer` {c.explainer!r}; choose statistical, openai or hf[:MODEL]")
    scorers: list[Scorer] = []
    for name in c.scorer:
        if name == "embedding":
            scorers.append(EmbeddingScorer())
        elif name in ("detection", "fuzzing") and backend is not None:
            scorers.append((DetectionScorer if name == "detection" else FuzzingScorer)(backend))
        elif name == "simulation":
            sim_backend = backend if isinstance(backend, HFChat | ChatClient) else HFChat(DEFAULT_MODEL)
            scorers.append(SimulationScorer(sim_backend))
        else:
            raise AimriError(f"unknown `scorer` {name!r}; choose from embedding, detection, fuzzing, simulation")
    atlas = Atlas(atlas_path)
    summary = label_features(atlas, select_features(atlas, c.features), explainer, scorers, seed=c.seed,
                             progress=progress)  # fmt: skip
    usage = getattr(backend, "usage", None)
    if usage is not None:
        summary["llm"] = {k: getattr(usage, k) for k in ("requests", "cached", "retries", "failures",
                                                          "prompt_tokens", "completion_tokens", "cost")}  # fmt: skip
    return summary
