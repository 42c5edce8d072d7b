"""The default feature set of a subject: a TopK SAE at a middle residual Site, its atlas and its statistical
labels, built once per model revision and cached under $AIMRI_HOME/features/ (`mri features`, and `mri scan`
unless --no-features). What a user of the product sees first: superposition untangled into named features.

The build, each part resumable and each finished part kept:
  harvest   `budget` tokens of the default corpus through the model into a temporary store (resumes by shard);
  train     `epochs` passes over its rows (resumes from checkpoints), its last `heldout_shards` shards held out;
  evaluate  CE loss recovered on windows after the harvested ones;
  atlas     mined from the same rows (no second pass through the model);
  labels    the statistical explainer on every live feature; `scored` of them scored against a control label;
then features.json, written last: its presence marks a finished set, and the temporary store is deleted.
The set's folder is keyed by the model's revision (a content hash of its weights), so another revision never
reuses it. Sources: TopK SAEs (Gao et al. 2024), autointerp scoring beside a control (Bills et al. 2023, delphi).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aimri.errors import AimriError
from aimri.paths import aimri_home, atomic_write_text, fsync_dir
from aimri.run import Run, slug

SUMMARY = "features.json"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class FeaturesConfig:
    """The default feature set's size and budget (`mri features`' options). The defaults build in about three
    minutes on a 2-core CPU (150-190 s measured on SmolLM2-135M; the harvest is the largest part)."""

    site: str | None = field(default=None, metadata=_help("residual Site (default: resid.L at the middle layer)"))
    budget: int = field(
        default=40_960,
        metadata=_help("model tokens harvested and trained on (2-core CPU: ~ budget / 650 + 100 s in all)"),
    )
    width: int = field(default=4096, metadata=_help("features in the SAE (d_sae)"))
    k: int = field(default=32, metadata=_help("active features per token (TopK)"))
    epochs: int = field(default=5, metadata=_help("passes of training over the harvested rows not held out"))
    batch_size: int = field(default=1024, metadata=_help("training batch (rows)"))
    context: int = field(default=128, metadata=_help("tokens per window, BOS included"))
    heldout_shards: int = field(default=2, metadata=_help("shards of 32 windows held out for the held-out FVU"))
    scored: int = field(default=50, metadata=_help("live features whose labels are scored against a control"))
    ce_windows: int = field(default=4, metadata=_help("windows for the CE loss recovered (0: skip)"))
    seed: int = field(default=0, metadata=_help("seed of training and label scoring"))

    def site_for(self, subject: Any) -> str:
        return self.site or f"resid.{subject.n_layers // 2}"

    def name_for(self, subject: Any) -> str:
        """The set's name: its dictionary's folder under runs/<model>/dictionaries/ too."""
        return f"default-topk-{self.site_for(subject)}-w{self.width}-k{self.k}-t{self.budget}"


@dataclass
class FeatureSet:
    """A finished default feature set: `dictionary` (SAELens layout, with training.json), `atlas` (its
    atlas.sqlite, labelled) and `summary` (features.json: the figures, and the seconds of each part the finishing
    run did: after a resume, the parts finished earlier are not timed)."""

    path: Path
    summary: dict[str, Any]

    @property
    def dictionary(self) -> Path:
        return self.path / "dictionary"

    @property
    def atlas(self) -> Path:
        return Run.atlas_of(self.dictionary)

    @property
    def name(self) -> str:
        return str(self.summary["name"])


def _settings(subject: Any, c: FeaturesConfig) -> dict[str, Any]:
    return {**asdict(c), "site": c.site_for(subject)}


def feature_set_dir(subject: Any, config: FeaturesConfig | None = None) -> Path:
    """$AIMRI_HOME/features/<model>/<revision>/<name>-<settings hash>: one folder per model revision and settings
    (every FeaturesConfig field: a set built with other epochs or seed is another set)."""
    c = config or FeaturesConfig()
    digest = hashlib.sha256(json.dumps(_settings(subject, c), sort_keys=True).encode()).hexdigest()[:8]
    return aimri_home() / "features" / slug(subject.name) / subject.cache_folder / f"{c.name_for(subject)}-{digest}"


def cached_features(subject: Any, config: FeaturesConfig | None = None) -> FeatureSet | None:
    """The finished set for this model revision and these settings, or None (never another revision's)."""
    path = feature_set_dir(subject, config)
    try:
        summary = json.loads((path / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("model_revision") != subject.revision or not Run.atlas_of(path / "dictionary").is_file():
        return None
    if summary.get("config") != _settings(subject, config or FeaturesConfig()):
        return None
    return FeatureSet(path, summary)


@contextmanager
def _disk_guard(path: Path, part: str) -> Iterator[None]:
    """A full disk ends the build with one line; the finished parts stay for the rerun."""
    try:
        yield
    except (OSError, RuntimeError, sqlite3.Error) as err:  # torch.save and SQLite say it in their own words
        said = str(err).lower()
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
            w in said for w in ("no space left", "disk is full", "disk quota"))  # fmt: skip
        if not full:
            raise
        raise AimriError(
            f"the disk filled while building features ({part}) in {path}; the finished parts are kept: free some "
            "space and rerun the same command to resume"
        ) from err


def build_features(
    subject: Any,
    config: FeaturesConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> FeatureSet:
    """Build (or resume, or reuse) `subject`'s default feature set; see the module docstring for the parts.

    Returns the FeatureSet. Raises AimriError for settings that cannot work (a Site that is not a residual
    Site of this model, k > width, too few tokens for the held-out shards) before any work, and for a disk
    that fills (the finished parts kept)."""
    from aimri.atlas.build import build_atlas
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.data.harvest import harvest
    from aimri.dictionaries.config import DictionarySettings
    from aimri.dictionaries.evaluate import downstream_metrics
    from aimri.dictionaries.formats import load_dictionary
    from aimri.dictionaries.train import train_from_store

    c = config or FeaturesConfig()
    if (done := cached_features(subject, c)) is not None:
        log(f"features: {done.name} built earlier for this model revision (reused)")
        _tidy(done.path)  # a build stopped between its summary and its tidying
        return done
    site = c.site_for(subject)
    _check(subject, c, site)
    path = feature_set_dir(subject, c)
    path.mkdir(parents=True, exist_ok=True)
    store, dictionary = path / "store", path / "dictionary"
    corpus = Corpus.from_paths([default_corpus_path(log=log)])
    seconds: dict[str, float] = {}
    per_shard = 32
    minutes = (c.budget / 650 + 100) / 60
    log(f"features: building {c.name_for(subject)} for {subject.name} (about {minutes:.0f} min on a 2-core CPU; "
        f"interrupt and rerun to resume)")  # fmt: skip

    def part(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        with _disk_guard(path, name):
            result = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return result

    if not (dictionary / "training.json").is_file():
        part("harvest", lambda: harvest(
            subject, corpus, [site], store, context=c.context, windows_per_shard=per_shard, max_tokens=c.budget,
            progress=progress,
        ))  # fmt: skip
        from aimri.data.store import ActivationStore

        held = ActivationStore(store)
        rows = sum(s["rows"] for s in held.shards[: len(held.shards) - c.heldout_shards])  # the rows trained on
        settings = DictionarySettings(
            architecture="topk", width=c.width, k=c.k, tokens=c.epochs * rows, batch_size=c.batch_size, seed=c.seed,
            context=c.context, heldout_shards=c.heldout_shards,
        )  # fmt: skip
        part(
            "train",
            lambda: train_from_store(store, site, dictionary, settings, progress=progress, device=subject.device),
        )
    sae = load_dictionary(dictionary)
    trained = json.loads((dictionary / "training.json").read_text())
    quality: dict[str, Any] = {k: trained.get("heldout_saved", {}).get(k) for k in ("fvu", "l0", "dead_frac", "rows")}
    if c.ce_windows:
        skip = -(-c.budget // c.context)  # past the harvested windows: text the SAE never saw
        ce = part("evaluate", lambda: downstream_metrics(sae, subject, corpus, context=c.context,
                                                         n_windows=c.ce_windows, skip_windows=skip))  # fmt: skip
        quality |= {k: ce[k] for k in ("ce_loss_recovered", "ce_clean", "ce_spliced", "ce_zero_ablation")}
    atlas_path = Run.atlas_of(dictionary)
    if not atlas_path.is_file():
        if not store.is_dir():
            raise AimriError(f"{path}: the store the atlas is mined from is gone; delete {path} and rerun")
        part("atlas", lambda: build_atlas(
            sae, subject, corpus, atlas_path, tokens=c.budget, store=store, top_n=10, reservoir=16, negatives=5,
            dictionary_name=c.name_for(subject), seed=c.seed, progress=progress,
        ))  # fmt: skip
    labels = part("labels", lambda: _label(atlas_path, c, progress))
    quality |= labels
    summary = {
        "format": "aimri.features", "version": 1, "name": c.name_for(subject), "model": subject.name,
        "model_revision": subject.revision, "site": site, "config": _settings(subject, c), "quality": quality,
        "seconds": seconds, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    with _disk_guard(path, "summary"):
        atomic_write_text(path / SUMMARY, json.dumps(summary, indent=1))
    _tidy(path)
    log(f"features: {describe(summary)}")
    return FeatureSet(path, summary)


def _tidy(path: Path) -> None:
    """The rows live on in the atlas' examples; the store and the training checkpoints were for resuming only."""
    shutil.rmtree(path / "store", ignore_errors=True)
    shutil.rmtree(path / "dictionary.checkpoints", ignore_errors=True)


def _check(subject: Any, c: FeaturesConfig, site: str) -> None:
    if subject.revision in ("", "unknown"):
        raise AimriError(
            f"{subject.name} has no revision (a content hash of its weights), so its feature set could not be told "
            "from another model's; load it with aimri.load(...) or give the Subject a revision"
        )
    parsed = subject.site(site)
    if not parsed.name.startswith("resid."):
        raise AimriError(f"`site` {site!r}: the default feature set reads a residual Site (resid.L)")
    for name in ("width", "k", "epochs", "batch_size", "context"):
        if getattr(c, name) < 1:
            raise AimriError(f"`{name}` must be at least 1, got {getattr(c, name)}")
    if c.k > c.width:
        raise AimriError(f"`k` {c.k} is larger than `width` {c.width}; choose k <= width")
    shards = -(-c.budget // (c.context * 32))
    if shards <= c.heldout_shards:
        raise AimriError(
            f"`budget` {c.budget:,} tokens fill {shards} shard(s) of 32 windows; with {c.heldout_shards} held out none is left "
            f"to train on: give at least {(c.heldout_shards + 1) * 32 * c.context:,} tokens"
        )


def _label(atlas_path: Path, c: FeaturesConfig, progress: bool) -> dict[str, Any]:
    """Statistical labels on every live feature; a sample's labels scored (embedding AUROC) beside a random
    other feature's label as the control. Resumable: labelled features are skipped."""
    import random

    from aimri.atlas.db import Atlas
    from aimri.autointerp.explainers import StatisticalExplainer
    from aimri.autointerp.label import label_features
    from aimri.autointerp.scorers import EmbeddingScorer

    atlas = Atlas(atlas_path)
    live = atlas.live_features()
    sample = sorted(random.Random(c.seed).sample(live, min(c.scored, len(live))))
    explainer = StatisticalExplainer()
    scored = label_features(atlas, sample, explainer, [EmbeddingScorer()], seed=c.seed, progress=progress)
    label_features(atlas, live, explainer, [], seed=c.seed, progress=progress)
    scores = [s for f in sample if (s := atlas.card(f, n_top=0)["labels"])]
    emb = [x["scores"].get("embedding") for s in scores for x in s if x["explainer"] == explainer.name]
    ctl = [x["scores"].get("embedding_control") for s in scores for x in s if x["explainer"] == explainer.name]
    # a score is NaN where a feature has no held-out active or inactive example to tell apart
    emb, ctl = ([v for v in vals if v is not None and not math.isnan(v)] for vals in (emb, ctl))
    return {
        "features": atlas.n_features, "live": len(live), "live_frac": len(live) / max(atlas.n_features, 1),
        "labelled": len(atlas.labelled(explainer.name)), "label_scored": len(emb),
        "label_score": sum(emb) / len(emb) if emb else None,
        "label_score_control": sum(ctl) / len(ctl) if ctl else None,
        "label_failures": len(scored.get("failed", {})),
    }  # fmt: skip


def describe(summary: dict[str, Any]) -> str:
    """One line of a set's quality: held-out FVU, CE loss recovered, live share, label score vs control."""
    q = summary.get("quality", {})

    def num(key: str, fmt: str = ".3f") -> str:
        return "n/a" if q.get(key) is None else format(q[key], fmt)

    return (
        f"{summary.get('name')}: held-out FVU {num('fvu')} (L0 {num('l0', '.1f')}), CE loss recovered "
        f"{num('ce_loss_recovered')}, live {num('live_frac', '.0%')} of {q.get('features', '?')} features, label "
        f"score {num('label_score', '.2f')} vs control {num('label_score_control', '.2f')} (embedding AUROC, "
        f"{q.get('label_scored', 0)} scored)"
    )


def install(features: FeatureSet, run: Run, name: str | None = None) -> Path:
    """Put the set's dictionary (with its atlas) into `run`'s dictionaries/NAME (default: the set's name), where
    `mri serve` and the other commands look, unless the same set is already there. Copied aside, then renamed:
    a crash leaves the old copy or the new one, never a half-written one."""
    target = run.dictionary(name or features.name)
    stamp = target / SUMMARY
    if stamp.is_file() and stamp.read_bytes() == (features.path / SUMMARY).read_bytes():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(features.dictionary, tmp, ignore=shutil.ignore_patterns("*.checkpoints", ".*"))
    shutil.copy2(features.path / SUMMARY, tmp / SUMMARY)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by an install that stopped before its last step
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)
    return target


def default_features(
    subject: Any,
    run: Run | None = None,
    config: FeaturesConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> FeatureSet:
    """Build or reuse `subject`'s default feature set and install it in `run` (default: runs/<model>)."""
    features = build_features(subject, config, log, progress)
    install(features, run or Run.for_model(subject.name))
    return features
