"""Atlas throughput and feature-card latency.

    python bench/atlas.py --json [--dictionary DIR] [--tokens 100000]

1. `build_atlas` over the default corpus with a TopK SAE on SmolLM2 (trained here on the fly and cached
   when no --dictionary is given): tokens/s and the ratio to the FLOP roofline from the fp32 GEMM rate
   measured in this run (model layers up to the site plus the dictionary's encoder, per token).
2. Offline labelling (statistical explainer + MiniLM embedding scorer, with its control): features/min.
3. A synthetic atlas of 1M features (the real schema, 5 examples each): median feature-card latency.
4. Peer: delphi's latent cache (its first stage, in its own venv) on the same windows, model and SAE:
   tokens/s and peak memory. It keeps every nonzero activation in memory; the atlas streams.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aimri
from aimri.atlas.build import build_atlas
from aimri.atlas.db import Atlas
from aimri.autointerp.explainers import StatisticalExplainer
from aimri.autointerp.label import label_features
from aimri.autointerp.scorers import EmbeddingScorer
from aimri.data.corpus import Corpus, Packing, pack
from aimri.data.default_corpus import default_corpus_path
from aimri.dictionaries import load_dictionary
from aimri.dictionaries.config import DictionarySettings
from aimri.dictionaries.train import train_from_subject
from aimri.paths import aimri_home
from common import emit, gemm_gflops, run_peer


def synthetic_atlas(path: Path, n_features: int, examples: int = 5, context: int = 64, windows: int = 10_000) -> Atlas:
    """The real schema filled with random content: what a card query sees on a 1M-feature atlas."""
    if path.exists():
        return Atlas(path)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    atlas = Atlas.create(tmp)
    rng = np.random.default_rng(0)
    words = [f" w{i}" for i in range(2000)]
    atlas.db.executemany(
        "INSERT INTO windows VALUES (?, ?)",
        ((w, json.dumps([words[i] for i in rng.integers(0, 2000, context)])) for w in range(windows)),
    )
    feats = json.dumps([[" w1", 1.0]] * 10)
    atlas.db.executemany(
        "INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ((f, 10, 1e-4, 1.0, 2.0, '{"0.5": 1.0}', feats, feats, "[[1, 0.5]]", "[[2, 0.1]]") for f in range(n_features)),
    )
    acts = np.zeros(context, np.float16).tobytes()
    for start in range(0, n_features, 100_000):
        atlas.db.executemany(
            "INSERT INTO examples VALUES (?, 'top', ?, NULL, ?, 1.0, ?)",
            (
                (f, r, int(w), acts)
                for f in range(start, min(n_features, start + 100_000))
                for r, w in enumerate(rng.integers(0, windows, examples))
            ),
        )
    atlas.set_meta(format="aimri.atlas", version=1, d_sae=n_features, site="synthetic", complete=True)
    atlas.commit()
    atlas.db.close()
    tmp.rename(path)
    return Atlas(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dictionary", type=Path, default=None)
    parser.add_argument("--site", default="resid.15")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--label", type=int, default=100, help="features to label and score")
    parser.add_argument("--card-features", type=int, default=1_000_000)
    parser.add_argument("--no-peers", action="store_true", help="skip delphi (its venv is built on first use)")
    args = parser.parse_args()
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    torch.set_grad_enabled(False)
    subject = aimri.load()
    corpus = Corpus.from_paths([default_corpus_path(log=log)])
    dictionary = args.dictionary
    if dictionary is None:
        settings = DictionarySettings(tokens=300_000)
        dictionary = aimri_home() / "bench" / f"sae-{args.site}-w{settings.width}-k{settings.k}"
        if not (dictionary / "cfg.json").exists():
            log(f"training a TopK SAE on {args.site} for the benchmark (cached at {dictionary})")
            with torch.enable_grad():
                train_from_subject(subject, corpus, args.site, dictionary, settings, progress=False)
    sae = load_dictionary(dictionary)
    gflops = gemm_gflops()
    work = Path(tempfile.mkdtemp(prefix="aimri-atlas-bench-"))
    start = time.perf_counter()
    atlas = build_atlas(sae, subject, corpus, work / "atlas.sqlite", tokens=args.tokens, progress=not args.json)
    seconds = time.perf_counter() - start
    tokens = atlas.meta["windows"] * atlas.meta["context"]  # every position is computed, sinks included
    layer = subject.site(sae.cfg.site).layer
    layer_params = sum(p.numel() for i in range(layer + 1) for p in subject.layer(i).parameters())
    flops = 2 * layer_params + 2 * sae.cfg.d_in * sae.cfg.d_sae
    rate = tokens / seconds
    our_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    delphi = None
    if not args.no_peers:  # delphi's latent cache on the same windows, model and SAE
        packing = Packing.for_tokenizer(subject.tokenizer, atlas.meta["context"])
        windows = itertools.islice(pack(corpus, subject.tokenizer, packing), atlas.meta["windows"])
        np.savez(work / "windows.npz", ids=np.stack([w.ids for w in windows]))
        model_dir = str(subject.model.name_or_path)
        delphi = run_peer(
            "delphi", "delphi_cache.py", model_dir, str(dictionary), str(work / "windows.npz"), str(layer), log=log
        )

    features = atlas.live_features(min_fires=5)[: args.label]
    scorer = EmbeddingScorer()
    scorer.embedder  # noqa: B018 (load MiniLM outside the timing)
    start = time.perf_counter()
    summary = label_features(atlas, features, StatisticalExplainer(), [scorer], progress=False)
    per_min = len(features) / (time.perf_counter() - start) * 60

    big = synthetic_atlas(aimri_home() / "bench" / f"atlas-synthetic-{args.card_features}.sqlite", args.card_features)
    rng = random.Random(0)
    big.card(0)
    times = []
    for _ in range(200):
        t = time.perf_counter()
        big.card(rng.randrange(args.card_features))
        times.append((time.perf_counter() - t) * 1e3)
    emit(
        {
            "tokens_per_s": round(rate, 1),
            "roofline_ratio": round(rate * flops / (gflops * 1e9), 3),
            "features_per_min": round(per_min, 1),
            "card_ms_1m": round(statistics.median(times), 3),
            "card_ms_1m_p99": round(sorted(times)[197], 3),
            "speedup_vs_delphi_cache": round(rate / delphi["tokens_per_s"], 3) if delphi else None,
            "delphi_cache_tokens_per_s": round(delphi["tokens_per_s"], 1) if delphi else None,
            "peak_rss_mb": round(our_rss),
            "delphi_peak_rss_mb": round(delphi["peak_rss_mb"]) if delphi else None,
            "atlas_tokens": tokens,
            "atlas_build_s": round(seconds, 1),
            "features": sae.cfg.d_sae,
            "labelled": summary["labelled"],
            "mean_embedding_score": round(summary.get("mean_embedding", float("nan")), 4),
            "mean_embedding_control": round(summary.get("mean_embedding_control", float("nan")), 4),
            "gemm_gflops": round(gflops, 1),
            "device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        },
        args.json,
    )


if __name__ == "__main__":
    main()
