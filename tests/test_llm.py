"""The OpenAI-compatible client against real HTTP servers on loopback: `transformers serve` with the
default model (integration), and small stdlib servers that time out, rate-limit or answer nonsense."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from aimri.autointerp.examples import Example
from aimri.autointerp.explainers import LLMExplainer
from aimri.autointerp.llm import ChatClient, LLMError

PROMPT = [{"role": "user", "content": "Name one colour."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers /v1/chat/completions from a script of (status, body, delay) steps, the last one repeating."""

    script: ClassVar[list[tuple[int, str, float]]] = []
    calls = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        step = self.script[min(type(self).calls, len(self.script) - 1)]
        type(self).calls += 1
        status, body, delay = step
        time.sleep(delay)
        try:
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


def _reply(text: str) -> str:
    return json.dumps(
        {"choices": [{"message": {"content": text}}], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    )


@pytest.fixture
def scripted() -> Iterator[type[_Scripted]]:
    handler = type("Handler", (_Scripted,), {"script": [], "calls": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()


def test_rate_limits_are_retried_and_usage_counted(scripted, tmp_path: Path) -> None:
    scripted.script = [(429, "{}", 0), (503, "{}", 0), (200, _reply("teal"), 0)]
    client = ChatClient(scripted.url, "m", backoff=0.01, cache=tmp_path / "cache.sqlite", price_per_million=(1, 2))
    assert client.complete_many([PROMPT]) == ["teal"]
    assert client.usage.retries == 2 and client.usage.prompt_tokens == 7 and client.usage.cost == pytest.approx(11e-6)
    again = ChatClient(scripted.url, "m", cache=tmp_path / "cache.sqlite")
    assert again.complete_many([PROMPT]) == ["teal"] and again.usage.cached == 1 and again.usage.requests == 0


def test_malformed_replies_and_timeouts_fail_per_prompt(scripted) -> None:
    scripted.script = [(200, "not json", 0)]
    client = ChatClient(scripted.url, "m", retries=2, backoff=0.01)
    (result,) = client.complete_many([PROMPT])
    assert isinstance(result, LLMError) and "malformed reply" in str(result) and "after 3 tries" in str(result)
    scripted.script, scripted.calls = [(200, _reply("late"), 2.0)], 0
    slow = ChatClient(scripted.url, "m", retries=1, backoff=0.01, timeout=0.3)
    (late,) = slow.complete_many([PROMPT])
    assert isinstance(late, LLMError) and "no reply" in str(late)
    scripted.script, scripted.calls = [(200, _reply("   "), 0), (200, _reply("Label: maroon"), 0)], 0
    explainer = LLMExplainer(ChatClient(scripted.url, "m", backoff=0.01))
    assert explainer.explain_many([[Example(["a", " b"], [0.0, 1.0], 1.0)]]) == ["maroon"]  # empty -> retried
    scripted.script, scripted.calls = [(400, "{}", 0)], 0
    (refused,) = ChatClient(scripted.url, "m", backoff=0.01).complete_many([PROMPT])
    assert isinstance(refused, LLMError) and "HTTP 400 after 1 tries" in str(refused)  # client errors: no retry


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, str]]:
    """`transformers serve` on loopback with the default model's cached directory."""
    import aimri

    model_dir = str(aimri.load().model.name_or_path)
    port = _free_port()
    serve = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen(
        [str(serve), "serve", model_dir, "--port", str(port), "--device", "cpu", "--dtype", "float32"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(180):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"transformers serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not become healthy in 90 s")
        yield f"http://127.0.0.1:{port}/v1", model_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
def test_labels_from_a_real_served_model(served, tmp_path: Path) -> None:
    url, model = served
    client = ChatClient(url, model, concurrency=2, cache=tmp_path / "cache.sqlite")
    sets = [
        [Example(["The", " cat", " sat"], [0.0, 2.0, 0.0], 2.0), Example(["A", " cat", " ran"], [0.0, 1.5, 0.0], 1.5)],
        [Example(["Paris", " is", " big"], [3.0, 0.0, 0.0], 3.0)],
    ]
    labels = LLMExplainer(client).explain_many(sets)
    assert all(isinstance(lab, str) and lab for lab in labels), labels
    assert client.usage.requests >= 2 and client.usage.prompt_tokens > 0 and client.usage.completion_tokens > 0
    before = client.usage.requests
    assert LLMExplainer(client).explain_many(sets) == labels and client.usage.requests == before  # cached


@pytest.mark.integration
def test_label_run_on_a_real_server_reports_every_feature(served, tiny_lm_dir: str, tmp_path: Path) -> None:
    """Detection scoring by a 135M model: each feature ends up labelled with scores, or listed as failed
    with the reason (a reply that is not the asked-for JSON list) — never silently dropped."""
    from tests.helpers import FIXTURE_TEXT, token_detector

    import aimri
    from aimri.atlas.build import build_atlas
    from aimri.autointerp.label import label_features
    from aimri.autointerp.scorers import DetectionScorer
    from aimri.data.corpus import Corpus

    url, model = served
    subject = aimri.load(tiny_lm_dir)
    sae, _ = token_detector(subject, token=int(subject.tokenizer(" keeper")["input_ids"][-1]))
    atlas = build_atlas(sae, subject, Corpus.from_texts([FIXTURE_TEXT] * 12), tmp_path / "a.sqlite", tokens=5_000,
                        context=16, top_n=5, reservoir=8, negatives=3, progress=False)  # fmt: skip
    client = ChatClient(url, model, concurrency=2, retries=1, backoff=0.01)
    features = [0, 1]
    summary = label_features(atlas, features, LLMExplainer(client), [DetectionScorer(client)], progress=False)
    labelled = atlas.labelled(client.name)
    assert labelled | {int(f) for f in summary["failed"]} == set(features)
    assert summary["labelled"] == len(labelled)
    for f in labelled:
        scores = atlas.card(f)["labels"][0]["scores"]
        assert "detection" in scores and "detection_control" in scores


class _EchoLogprobs(http.server.BaseHTTPRequestHandler):
    """/v1/completions with `echo` and `logprobs`, as vLLM answers it, computed by a real (tiny) model."""

    subject: ClassVar[object] = None

    def do_POST(self) -> None:
        import torch

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tok = self.subject.tokenizer  # type: ignore[attr-defined]
        enc = tok(body["prompt"], return_offsets_mapping=True, add_special_tokens=False)
        with torch.no_grad():
            logits = self.subject.run(torch.tensor([enc["input_ids"]]), stop=False)["logits"][0]  # type: ignore[attr-defined]
        logp = logits.log_softmax(-1)
        top: list[dict[str, float] | None] = [None]
        for row in logp[:-1]:
            values, ids = row.topk(body["logprobs"])
            top.append({tok.decode([int(i)]): float(v) for v, i in zip(values, ids, strict=True)})
        reply = {"choices": [{"text": body["prompt"], "logprobs": {
            "tokens": [tok.decode([i]) for i in enc["input_ids"]], "top_logprobs": top,
            "text_offset": [start for start, _ in enc["offset_mapping"]]}}]}  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_simulation_over_http_reads_prompt_logprobs(tiny_lm_dir: str, tmp_path: Path) -> None:
    """Digit expectations from an endpoint's prompt logprobs equal the same model's exact digit
    probabilities at the slots where the digits are written."""
    import torch

    import aimri
    from aimri.autointerp.examples import FeatureExamples
    from aimri.autointerp.scorers import SimulationScorer

    subject = aimri.load(tiny_lm_dir)
    subject.context_length = 256  # declared 128; RoPE runs longer, and the task line alone is ~130 here
    handler = type("Handler", (_EchoLogprobs,), {"subject": subject})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "tiny", cache=tmp_path / "c.sqlite")
        vocab = len(subject.tokenizer)
        scorer = SimulationScorer(client, per_class=1, top_logprobs=vocab)
        example = Example(["The", " keeper", " sat"], [0.0, 2.0, 0.0], 2.0)
        predicted = scorer._predict("goalkeepers", example)
        assert len(predicted) == 3
        from aimri.autointerp.scorers import _SIMULATION_TASK, _line

        text, slots = f"{_SIMULATION_TASK}\nThe feature: goalkeepers\n", []
        for token in example.tokens:
            text += _line(token)
            slots.append(len(text))
            text += "0\n"
        enc = subject.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        starts = [s for s, _ in enc["offset_mapping"]]
        with torch.no_grad():
            logits = subject.run(torch.tensor([enc["input_ids"]]), stop=False)["logits"][0]
        digits = torch.tensor([subject.tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)])
        expected = [float(logits[starts.index(s) - 1, digits].softmax(-1) @ torch.arange(10.0)) for s in slots]
        assert predicted == pytest.approx(expected, abs=1e-4)
        (score,) = scorer.score_many([("goalkeepers", FeatureExamples(0, [], [example], [example]))])
        assert isinstance(score, float)
        assert client.usage.cached >= 1  # the same prompt again came from the cache
    finally:
        server.shutdown()


@pytest.mark.integration
def test_simulation_on_an_endpoint_without_prompt_logprobs_says_so(served) -> None:
    from aimri.autointerp.examples import FeatureExamples
    from aimri.autointerp.scorers import SimulationScorer

    url, model = served
    scorer = SimulationScorer(ChatClient(url, model, retries=0), per_class=1)
    example = Example(["a", " b"], [0.0, 1.0], 1.0)
    (result,) = scorer.score_many([("b", FeatureExamples(0, [], [example], [example]))])
    assert isinstance(result, LLMError) and "prompt log-probabilities" in str(result), result
