"""Console latency on a large atlas: every API call and page of `mri serve` over HTTP, p50 / p99 / max in
milliseconds, on a synthetic atlas of 100k+ features in the real schema (with labels), a 2,000-node graph
and a checkup; then each page in headless Chromium (Debian's), from navigation to its content drawn.

No peer runs this locally (Neuronpedia is a hosted service), and no FLOP limit applies: the figures are
latencies against the issue's 200 ms budget.

    python bench/console.py --json [--features 100000]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimri.atlas.db import Atlas
from aimri.console.app import Console
from aimri.console.index import index_path
from aimri.console.server import make_server
from aimri.paths import aimri_home
from aimri.run import Run
from atlas import synthetic_atlas
from common import emit

CHROMIUM = "/usr/bin/chromium"


def labelled_atlas(n: int) -> Path:
    """The bench's synthetic atlas, with a label on every feature (label search needs them)."""
    path = aimri_home() / "bench" / f"console-atlas-{n}" / "atlas.sqlite"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_atlas(path, n)
    atlas = Atlas(path)
    rng = random.Random(0)
    topics = ["rivers", "cities", "numbers", "code", "names", "weather", "food", "music", "law", "sport"]
    atlas.db.executemany(
        "INSERT INTO labels VALUES (?, 'statistical', ?, '{\"detection\": 0.8}', ?)",
        ((f, f"{rng.choice(topics)} and w{rng.randrange(2000)}", float(f)) for f in range(n)),
    )
    atlas.commit()
    return path


def synthetic_graph(path: Path, n_nodes: int = 2000, n_links: int = 20000, n_pos: int = 64, layers: int = 30) -> None:
    rng = random.Random(0)
    nodes = []
    for i in range(n_nodes):
        layer, pos, idx = rng.randrange(layers), rng.randrange(n_pos), rng.randrange(16384)
        nodes.append({"node_id": f"{layer}_{idx}_{pos}_{i}", "feature": idx, "layer": str(layer), "ctx_idx": pos,
                      "feature_type": "cross layer transcoder", "influence": rng.random(), "clerp": f"feature {idx}"})  # fmt: skip
    links = [{"source": rng.choice(nodes)["node_id"], "target": rng.choice(nodes)["node_id"],
              "weight": rng.gauss(0, 1)} for _ in range(n_links)]  # fmt: skip
    meta = {"prompt": "synthetic", "prompt_tokens": [f"t{i}" for i in range(n_pos)], "schema_version": 1, "info": {}}
    path.write_text(json.dumps({"metadata": meta, "qParams": {}, "nodes": nodes, "links": links}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--features", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print

    start = time.perf_counter()
    atlas = labelled_atlas(args.features)
    log(f"atlas of {args.features:,} features ready in {time.perf_counter() - start:.1f} s")
    run = Run(Path(tempfile.mkdtemp(prefix="aimri-console-bench-")))
    run.graphs.mkdir()
    synthetic_graph(run.graph("big"))
    run.scan.mkdir()
    findings = [{"id": f"f{i}", "category": "harm", "title": f"finding {i}", "summary": "", "suspicion": i / 40,
                 "evidence": [{"kind": "examples", "rows": [{"prompt": "p", "answer": "a"}] * 20}]} for i in range(40)]  # fmt: skip
    Run.findings_of(run.scan).write_text(json.dumps({"model": "m", "suspicion": 1, "findings": findings}))
    console = Console(run.root, atlases=[atlas])
    index_path(atlas).unlink(missing_ok=True)  # measure the one-time index build too
    start = time.perf_counter()
    console.prepare()
    index_s = time.perf_counter() - start
    log(f"search index: {index_s:.1f} s (once per atlas; cached beside it)")
    server, _ = make_server(console, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rng = random.Random(1)

    def timed(path: str) -> float:
        t = time.perf_counter()
        with urllib.request.urlopen(base + path, timeout=30) as r:
            r.read()
            assert r.status == 200, path
        return (time.perf_counter() - t) * 1000

    endpoints = {
        "page /": lambda: "/",
        "page /app.js": lambda: "/app.js",
        "status": lambda: "/api/status",
        "search by label": lambda: (
            f"/api/search?atlas=0&by=label&q={rng.choice(['rivers', 'code', 'music'])}%20w{rng.randrange(2000)}"
        ),
        "search by token": lambda: f"/api/search?atlas=0&by=token&q=w{rng.randrange(2000)}",
        "search by text": lambda: f"/api/search?atlas=0&by=text&q=w{rng.randrange(2000)}%20w{rng.randrange(2000)}",
        "feature card": lambda: f"/api/feature?atlas=0&id={rng.randrange(args.features)}",
        "graph (2k nodes, 20k links)": lambda: "/api/graph?name=big",
        "checkup": lambda: "/api/checkup",
    }
    by_endpoint = {}
    for name, path in endpoints.items():
        timed(path())  # warm
        times = sorted(timed(path()) for _ in range(args.repeats))
        by_endpoint[name] = {"p50_ms": round(times[len(times) // 2], 2), "p99_ms": round(times[int(len(times) * 0.99) - 1], 2),
                             "max_ms": round(times[-1], 2)}  # fmt: skip
        log(f"{name:>30}: {by_endpoint[name]}")

    pages: dict[str, float] = {}
    if Path(CHROMIUM).exists():
        from playwright.sync_api import sync_playwright

        routes = {"run": ("#/", "#atlases"), "search": ("#/search?atlas=0&by=label&q=rivers", "tr.hit"),
                  "feature": ("#/feature/0/4242", "#top-examples"), "graph": ("#/graph/big", "#graph-svg circle"),
                  "checkup": ("#/checkup", ".finding")}  # fmt: skip
        args_ = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=args_)
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#atlases")
            for name, (route, selector) in routes.items():
                samples = []
                for _ in range(5):
                    page.goto(base + "/#/nowhere")
                    t = time.perf_counter()
                    page.evaluate(f"location.hash = {json.dumps(route)}")
                    page.wait_for_selector(selector)
                    samples.append((time.perf_counter() - t) * 1000)
                pages[name] = round(sorted(samples)[len(samples) // 2], 1)
                log(f"{'page ' + name:>30}: {pages[name]} ms median, navigation to content drawn")
            browser.close()
    server.shutdown()
    worst = max(v["p99_ms"] for v in by_endpoint.values())
    result = {
        "features": args.features,
        "index_build_s": round(index_s, 1),
        "api_ms": by_endpoint,
        "page_render_ms": pages,
        "worst_api_p99_ms": worst,
        "worst_page_ms": max(pages.values(), default=None),
        "under_200ms": worst < 200 and all(v < 200 for v in pages.values()),
        "device": f"cpu: {platform.processor() or platform.machine()}",
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
