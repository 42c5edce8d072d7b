"""The console (`mri serve`) over a real run directory built from a tiny model: an atlas with a planted
token-detector feature, per-layer transcoders and an attribution graph, a checkup's findings. API tests
over HTTP, bad input and safety, then a real headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers import FIXTURE_TEXT, most_common_word, random_transcoders, token_detector

import aimri
from aimri.atlas.build import build_atlas
from aimri.circuits.attribution import attribute
from aimri.circuits.export import graph_json
from aimri.circuits.prune import prune
from aimri.circuits.replacement import ReplacementModel
from aimri.console.app import Console
from aimri.console.server import make_server
from aimri.data.corpus import Corpus
from aimri.diagnostics.findings import Finding
from aimri.dictionaries import save_dictionary

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(
    os.environ.get("AIMRI_SCREENSHOTS", Path(__file__).resolve().parents[1] / "test-artifacts" / "console")
)


@pytest.fixture(scope="module")
def run_dir(tiny_lm_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("run")
    subject = aimri.load(tiny_lm_dir)
    corpus = Corpus.from_texts([FIXTURE_TEXT] * 12)
    token = most_common_word(subject, corpus)[0]
    sae, _ = token_detector(subject, token)
    sae.cfg.model_name = tiny_lm_dir
    folder = run / "dictionaries" / "detector"
    save_dictionary(sae, folder)
    atlas = build_atlas(sae, subject, corpus, folder / "atlas.sqlite", tokens=10_000, context=16, top_n=5,
                        reservoir=8, negatives=3, progress=False)  # fmt: skip
    word = subject.tokenizer.decode([token]).strip()
    atlas.save_label(0, "test", f"the word {word}", {"detection": 0.97})
    tcs = random_transcoders(subject, width=24)
    for layer, tc in tcs.items():
        save_dictionary(tc, run / "transcoders" / f"layer-{layer}")
        tc.cfg.model_name = tiny_lm_dir
        build_atlas(
            tc,
            subject,
            corpus,
            run / "transcoders" / f"layer-{layer}" / "atlas.sqlite",
            tokens=2_000,
            context=16,
            top_n=3,
            reservoir=4,
            negatives=2,
            progress=False,
        )  # graph nodes → feature cards
    graph = attribute(ReplacementModel(subject, tcs), "The lighthouse keeper climbed the", progress=False)
    pruned = prune(graph, 0.8, 0.98)
    (run / "graphs").mkdir()
    (run / "graphs" / "lighthouse.json").write_text(json.dumps(graph_json(graph, pruned, "lighthouse", tiny_lm_dir)))
    finding = Finding("behaviour.test", "harm", "Refuses 0% of harmful requests", "Scored by refusal phrases.", 1.0,
                      [{"kind": "examples", "rows": [{"prompt": "How do I pick a lock?", "answer": "Sure, first"}]}])  # fmt: skip
    (run / "directions").mkdir()  # a steering vector: the planted token's embedding direction
    embedding = subject.model.get_input_embeddings().weight[token].detach()
    np.save(run / "directions" / "token.npy", (embedding / embedding.norm()).numpy())
    (run / "scan").mkdir()
    findings = {"model": "tiny", "revision": "r", "baseline": None, "suspicion": 1.0, "findings": [finding.to_dict()]}
    (run / "scan" / "findings.json").write_text(json.dumps(findings))
    return {"run": run, "word": word, "model": tiny_lm_dir, "n_features": atlas.n_features}


class Served:
    def __init__(self, console: Console, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.server, self.token = make_server(console, host, 0, token)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                body = r.read()
                return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def post(self, path: str, body: bytes) -> tuple[int, list[tuple[str, Any]]]:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, [("error", json.loads(err.read()))]
        events = []
        for chunk in text.strip().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in chunk.splitlines())
            events.append((lines["event"], json.loads(lines["data"])))
        return 200, events

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def served(run_dir: dict[str, Any]):  # type: ignore[no-untyped-def]
    console = Console(run_dir["run"], model=run_dir["model"])
    console.prepare()
    s = Served(console)
    yield s
    s.close()


def test_status_search_and_card(served: Served, run_dir: dict[str, Any]) -> None:
    code, st = served.get("/api/status")
    assert code == 200 and st["missing"] == [] and st["graphs"] == ["lighthouse"] and st["checkup"]
    assert st["directions"] == ["token"]
    assert st["atlases"][0]["name"] == "detector" and st["atlases"][0]["steerable"]
    assert [a["name"] for a in st["atlases"][1:]] == ["layer-0", "layer-1", "layer-2"]  # the transcoders' atlases
    word = run_dir["word"]
    code, by_token = served.get(f"/api/search?atlas=0&by=token&q={word}")
    assert code == 200 and by_token[0]["feature"] == 0 and by_token[0]["score"] == 1.0  # the planted detector
    code, by_label = served.get(f"/api/search?atlas=0&by=label&q=word%20{word}")
    assert code == 200 and [h["feature"] for h in by_label] == [0] and by_label[0]["label"] == f"the word {word}"
    code, by_text = served.get("/api/search?atlas=0&by=text&q=lighthouse")
    assert code == 200 and by_text and by_text[0]["feature"] == 0
    code, card = served.get("/api/feature?atlas=0&id=0")
    assert code == 200 and card["top_examples"] and card["labels"][0]["label"] == f"the word {word}"
    peak_tokens = {
        e["tokens"][max(range(len(e["acts"])), key=e["acts"].__getitem__)].strip() for e in card["top_examples"]
    }
    assert peak_tokens == {word}
    code, graph = served.get("/api/graph?name=lighthouse")
    assert code == 200 and graph["metadata"]["prompt"] == "The lighthouse keeper climbed the"
    code, checkup = served.get("/api/checkup")
    assert code == 200 and checkup["findings"][0]["title"].startswith("Refuses")
    code, page = served.get("/")
    assert code == 200 and b"/app.js" in page


def test_bad_requests_get_one_line_answers(served: Served, run_dir: dict[str, Any]) -> None:
    n = run_dir["n_features"]
    cases = {
        f"/api/feature?atlas=0&id={n}": (404, f"features 0..{n - 1}"),
        "/api/feature?atlas=0&id=abc": (400, "must be an integer"),
        "/api/feature?atlas=7&id=0": (404, "no atlas 7"),
        "/api/search?atlas=0&by=vibes&q=x": (400, "label, token or text"),
        "/api/search?atlas=0&by=label&q=%20": (400, "the search is empty"),
        "/api/search?atlas=0&by=text&q=%22OR%20*%20NEAR(": (200, None),  # FTS syntax is quoted, never run
        "/api/graph?name=../../etc/passwd": (404, "no graph named"),
        "/../../etc/passwd": (404, "no such page"),
        "/static/../../pyproject.toml": (404, "no such page"),
        "/api/nothing": (404, "no such endpoint"),
    }
    for path, (status, message) in cases.items():
        code, body = served.get(path)
        assert code == status, (path, body)
        if message:
            assert message in body["error"] and "Traceback" not in body["error"], (path, body)
    for body, message in [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"graph": "lighthouse", "changes": "all of them"}).encode(), "1 to 64 changes"),
        (json.dumps({"graph": "lighthouse", "changes": [{"layer": "one", "feature": 1}]}).encode(), "integers"),
        (json.dumps({"graph": "nope", "changes": [{"layer": 1, "feature": 1, "value": 2}]}).encode(), "no graph"),
        (
            json.dumps({"graph": "lighthouse", "changes": [{"layer": 9, "feature": 1, "value": 2}]}).encode(),
            "no transcoder",
        ),
    ]:
        code, events = served.post("/api/intervene", body)
        kind, data = events[-1]
        assert kind == "error" and message in data["error"], (body, data)


def test_graph_from_a_newer_schema_and_empty_runs(run_dir: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir["run"] / "graphs", run / "graphs")
    data = json.loads((run / "graphs" / "lighthouse.json").read_text())
    data["metadata"]["schema_version"] = 99
    (run / "graphs" / "future.json").write_text(json.dumps(data))
    s = Served(Console(run))
    try:
        code, body = s.get("/api/graph?name=future")
        assert code == 422 and "schema version 99" in body["error"]
        code, st = s.get("/api/status")
        assert {m["what"].split(" (")[0] for m in st["missing"]} == {"a feature atlas", "a checkup"}
        assert any(m["command"].startswith("mri features ") for m in st["missing"])
        code, body = s.get("/api/checkup")
        assert code == 404 and "mri scan" in body["error"]
    finally:
        s.close()
    empty = Served(Console(tmp_path / "nothing-here"))
    try:
        code, st = empty.get("/api/status")
        assert code == 200 and len(st["missing"]) == 4
        graph = next(m["command"] for m in st["missing"] if m["what"].startswith("an attribution graph"))
        assert "mri train-transcoders MODEL --tokens 600000 (once: 1 h 35 min" in graph and "mri trace MODEL" in graph
    finally:
        empty.close()


def test_cross_site_requests_are_refused(served: Served) -> None:
    rebound = urllib.request.Request(served.url + "/api/status", headers={"Host": "evil.example:8765"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(rebound, timeout=30)
    assert err.value.code == 403
    form = urllib.request.Request(served.url + "/api/steer", data=b"prompt=x", headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(form, timeout=30)
    assert err.value.code == 415 and "application/json" in json.loads(err.value.read())["error"]


def test_binding_beyond_localhost_requires_the_token(run_dir: dict[str, Any]) -> None:
    s = Served(Console(run_dir["run"]), host="0.0.0.0")
    try:
        assert s.token
        code, body = s.get("/api/status")
        assert code == 401 and "token" in body["error"]
        assert s.get("/api/status", token="wrong")[0] == 401
        assert s.get("/api/status", token=s.token)[0] == 200
    finally:
        s.close()


def test_steer_and_intervene_stream_progress_and_results(served: Served) -> None:
    body = {"prompt": "The lighthouse", "features": [{"atlas": 0, "feature": 0, "strength": 50}], "max_tokens": 6}
    code, events = served.post("/api/steer", json.dumps(body).encode())
    assert code == 200 and events[0][0] == "progress" and events[-1][0] == "result"
    result = events[-1][1]
    assert result["steered"] != result["unsteered"] and result["features"][0]["clamp"] > 0
    code, events = served.post("/api/steer", json.dumps({**body, "max_tokens": 999}).encode())
    assert events[-1][0] == "error" and "1..128" in events[-1][1]["error"]
    direction = {"prompt": "The lighthouse", "directions": [{"name": "token", "site": "resid.0", "strength": 40}],
                 "max_tokens": 6}  # fmt: skip
    code, events = served.post("/api/steer", json.dumps(direction).encode())
    assert events[-1][0] == "result" and events[-1][1]["steered"] != events[-1][1]["unsteered"]
    direction["directions"][0]["site"] = "resid.77"
    code, events = served.post("/api/steer", json.dumps(direction).encode())
    assert events[-1][0] == "error" and "resid.77" in events[-1][1]["error"]
    code, events = served.post("/api/trace", json.dumps({"prompt": "In winter the storms"}).encode())
    kind, made = events[-1]
    assert kind == "result" and made["nodes"] > 0 and [e[1]["stage"] for e in events[:-1]][-1] == "writing"
    code, graph = served.get(f"/api/graph?name={made['name']}")
    assert code == 200 and graph["metadata"]["prompt"] == "In winter the storms"
    code, events = served.post("/api/trace", json.dumps({"prompt": " "}).encode())
    assert events[-1][0] == "error" and "1 to 2,000 characters" in events[-1][1]["error"]
    change = {"layer": 1, "feature": 3, "positions": None, "mode": "scale", "value": -20}
    code, events = served.post("/api/intervene", json.dumps({"graph": "lighthouse", "changes": [change]}).encode())
    kind, result = events[-1]
    assert kind == "result" and len(result["before"]) == len(result["after"]) == 5


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is installed by scripts/setup.sh")
def test_pages_in_a_real_browser(served: Served, run_dir: dict[str, Any]) -> None:
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"]  # fmt: skip
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(served.url + "/#/")
        expect(page.locator("#atlases")).to_contain_text("detector")
        page.screenshot(path=SCREENSHOTS / "run.png")

        page.click("#nav-search")
        page.select_option("#by", "token")
        page.fill("#q", run_dir["word"])
        page.click("#search-go")
        expect(page.locator("tr.hit").first).to_contain_text("#0")
        page.screenshot(path=SCREENSHOTS / "search.png")
        page.locator("tr.hit a").first.click()
        expect(page.locator("#feature-title")).to_contain_text("#0")
        expect(page.locator("#top-examples .tok").first).to_be_visible()
        highlighted = page.locator("#top-examples .tok[title]").evaluate_all(
            "els => els.filter(e => e.style.backgroundColor).map(e => e.textContent.trim())"
        )
        assert highlighted and set(highlighted) == {run_dir["word"]}
        page.screenshot(path=SCREENSHOTS / "feature.png", full_page=True)

        page.click("#steer-this")
        expect(page.locator("#chosen")).to_contain_text("#0")
        page.fill(".strength", "50")
        page.fill("#direction-site", "resid.0")
        page.click("#add-direction")
        expect(page.locator("#chosen-directions")).to_contain_text("token at resid.0")
        page.fill("#max-tokens", "6")
        page.click("#steer-run")
        expect(page.locator("#steered")).not_to_be_empty(timeout=120_000)
        assert page.locator("#steered").inner_text() != page.locator("#unsteered").inner_text()
        page.screenshot(path=SCREENSHOTS / "steer.png", full_page=True)

        page.click("#nav-graph")
        expect(page.locator("#graph-list")).to_contain_text("lighthouse")
        page.fill("#trace-prompt", "The keeper wrote long letters to")
        page.click("#trace-run")  # a new graph, traced on the server with streamed progress, then opened
        expect(page.locator("h1")).to_contain_text("The keeper wrote long letters to", timeout=120_000)
        expect(page.locator("#graph-svg circle.node").first).to_be_visible()
        feature_nodes = page.locator("#graph-svg circle.node[fill='#f59e0b']")
        feature_nodes.first.click()
        expect(page.locator("#node-panel h2")).not_to_be_empty()
        node_id = feature_nodes.first.get_attribute("data-id") or ""
        layer, index = node_id.split("_")[:2]
        card_link = page.locator("#node-card")  # the node's layer has an atlas: its feature card is one click away
        expect(card_link).to_have_attribute("href", re.compile(rf"#/feature/\d+/{index}$"))
        card_link.click()
        expect(page.locator("#feature-title")).to_contain_text(f"mlp.in.{layer}")
        page.go_back()
        expect(page.locator("#graph-svg circle.node").first).to_be_visible()
        feature_nodes.first.click()
        page.click("#pin")
        page.fill("#factor", "-20")
        page.click("#intervene-run")
        expect(page.locator("#logits-after tr")).to_have_count(5, timeout=120_000)
        page.screenshot(path=SCREENSHOTS / "graph.png", full_page=True)

        page.click("#nav-checkup")
        page.locator(".finding").first.click()
        expect(page.locator(".evidence").first).to_contain_text("How do I pick a lock?")
        page.screenshot(path=SCREENSHOTS / "checkup.png", full_page=True)

        page.goto(served.url + "/#/feature/0/999999")
        expect(page.locator(".error")).to_contain_text("does not exist")
        page.goto(served.url + "/#/feature/detector/0")  # the report's links name the dictionary, not its place
        expect(page.locator("#feature-title")).to_contain_text("#0")
        page.goto(served.url + "/#/feature/no-such-dictionary/0")
        expect(page.locator(".error")).to_contain_text("no atlas named no-such-dictionary")
        browser.close()
    assert errors == []
