"""Chat backends for explainers and scorers.

`ChatClient` talks to any OpenAI-compatible endpoint (vLLM, llama.cpp server, Ollama, `transformers serve`,
OpenAI) with asyncio concurrency, retries with exponential backoff on timeouts, 429s, 5xx and malformed
replies, a persistent response cache, and token / cost counters. It uses only the standard library.
`HFChat` runs a Hugging Face chat model in-process (default: the embedded SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aimri.errors import AimriError
from aimri.subject.chat import Messages, chat_ids
from aimri.subject.names import DEFAULT_MODEL

Parse = Callable[[str], Any] | list[Callable[[str], Any]] | None


def _parsers(parse: Parse, n: int) -> list[Callable[[str], Any] | None]:
    return list(parse) if isinstance(parse, list) else [parse] * n


class LLMError(AimriError):
    """A request that failed after every retry; carries the reason, reported per feature."""


class ChatBackend(Protocol):
    name: str

    def complete_many(self, prompts: list[Messages], max_tokens: int = 64, parse: Parse = None) -> list[Any]:
        """One result per prompt: `parse(text)` (or the text), or an LLMError for that prompt. `parse` may
        be one function for all prompts or a list, one per prompt; a ValueError from it means malformed."""
        ...


@dataclass
class Usage:
    requests: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    errors: list[str] = field(default_factory=list)


class ResponseCache:
    """request hash -> reply text, in SQLite (safe across threads and runs)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT)")
        self.lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT text FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, text: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, text))
            self.db.commit()


def _chat_text(reply: dict[str, Any]) -> str:
    text = reply["choices"][0]["message"]["content"]
    if not isinstance(text, str):
        raise ValueError("the reply has no text content")
    return text


def _echo_logprobs(reply: dict[str, Any]) -> str:
    logprobs = reply["choices"][0]["logprobs"]
    if (
        not logprobs
        or not logprobs.get("top_logprobs")
        or len(logprobs["text_offset"]) != len(logprobs["top_logprobs"])
    ):
        raise ValueError("the reply has no prompt log-probabilities")
    return json.dumps({k: logprobs[k] for k in ("text_offset", "top_logprobs")})


@dataclass
class PromptLogprobs:
    """Per prompt token: its character offset, and the top alternatives' log-probabilities at that slot."""

    text_offset: list[int]
    top_logprobs: list[dict[str, float] | None]

    @classmethod
    def from_json(cls, text: str) -> PromptLogprobs:
        data = json.loads(text)
        return cls([int(o) for o in data["text_offset"]], data["top_logprobs"])

    def at(self, offset: int) -> dict[str, float] | None:
        """The alternatives for the token starting at character `offset`; None if no token starts there."""
        try:
            return self.top_logprobs[self.text_offset.index(offset)] or {}
        except ValueError:
            return None


def _seconds(value: str | None, most: float = 60.0) -> float:
    try:
        return min(most, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


class ChatClient:
    """An OpenAI-compatible chat endpoint. `base_url` like http://localhost:8000/v1."""

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8, timeout: float = 60.0,
        retries: int = 4, backoff: float = 1.0, cache: Path | None = None,
        price_per_million: tuple[float, float] = (0.0, 0.0), temperature: float = 0.0,
    ) -> None:  # fmt: skip
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.cache = ResponseCache(cache) if cache else None
        self.price = price_per_million
        self.temperature = temperature
        self.usage = Usage()
        self.name = f"openai:{model}"
        self._lock = threading.Lock()

    # -- one request, blocking (run in a worker thread) ---------------------------------------------
    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=self.timeout) as reply:
            return json.loads(reply.read())

    def _complete(self, messages: Messages, max_tokens: int, parse: Callable[[str], Any] | None) -> Any:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": self.temperature}
        return self._request("chat/completions", body, _chat_text, parse)

    def _request(
        self, route: str, body: dict[str, Any], extract: Callable[[dict[str, Any]], str], parse: Callable[[str], Any] | None
    ) -> Any:  # fmt: skip
        """POST with cache, retries and usage counting; `extract` turns a reply into the text that is cached."""
        key = hashlib.sha256(json.dumps([self.base_url, route, body], sort_keys=True).encode()).hexdigest()
        if self.cache and (hit := self.cache.get(key)) is not None:
            try:
                result = parse(hit) if parse else hit
                with self._lock:
                    self.usage.cached += 1
                return result
            except ValueError:
                pass  # a cached reply the parser now rejects: ask again
        reason, retry_after = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.usage.retries += 1
                time.sleep(max(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()), retry_after))
            try:
                with self._lock:
                    self.usage.requests += 1
                reply = self._post(route, body)
                text = extract(reply)
                usage = reply.get("usage") or {}
                with self._lock:
                    self.usage.prompt_tokens += int(usage.get("prompt_tokens", 0))
                    self.usage.completion_tokens += int(usage.get("completion_tokens", 0))
                    self.usage.cost = (
                        self.usage.prompt_tokens * self.price[0] + self.usage.completion_tokens * self.price[1]
                    ) / 1e6
                result = parse(text) if parse else text
                if self.cache:
                    self.cache.put(key, text)
                return result
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code}"
                retry_after = _seconds(err.headers.get("Retry-After") if err.headers else None)
                if err.code not in (408, 409, 425, 429) and err.code < 500:
                    break  # a client error will not fix itself
            except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
                reason = f"no reply ({getattr(err, 'reason', err)})"
            except (ValueError, KeyError, IndexError, TypeError) as err:
                reason = f"malformed reply ({err})"
        with self._lock:
            self.usage.failures += 1
            self.usage.errors.append(reason)
        raise LLMError(f"{self.base_url}: {reason} after {attempt + 1} tries")

    def prompt_logprobs(self, prompt: str, top: int = 20) -> PromptLogprobs:
        """Top log-probabilities at every prompt position, from /completions with `echo` (vLLM, OpenAI's
        legacy completions). Chat routes only give them for generated tokens, too late for simulation."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": top, "temperature": 0}
        try:
            return self._request("completions", body, _echo_logprobs, PromptLogprobs.from_json)
        except LLMError as err:
            raise LLMError(
                f"{err} — simulation over HTTP needs prompt log-probabilities (/v1/completions with echo and "
                "logprobs, as vLLM serves); otherwise score with the in-process explainer (`explainer` hf)"
            ) from None

    # -- many requests, concurrently ------------------------------------------------------------------
    def complete_many(self, prompts: list[Messages], max_tokens: int = 64, parse: Parse = None) -> list[Any]:
        async def run() -> list[Any]:
            gate = asyncio.Semaphore(self.concurrency)

            async def one(messages: Messages, check: Callable[[str], Any] | None) -> Any:
                async with gate:
                    try:
                        return await asyncio.to_thread(self._complete, messages, max_tokens, check)
                    except LLMError as err:
                        return err

            checks = _parsers(parse, len(prompts))
            return list(await asyncio.gather(*(one(m, c) for m, c in zip(prompts, checks, strict=True))))

        return asyncio.run(run())


class HFChat:
    """A Hugging Face chat model in this process (greedy decoding), e.g. the embedded SmolLM2."""

    def __init__(self, model: str = DEFAULT_MODEL) -> None:
        import aimri

        self.subject = aimri.load(model)
        self.name = f"hf:{self.subject.name}"
        self.usage = Usage()

    def complete_many(self, prompts: list[Messages], max_tokens: int = 64, parse: Parse = None) -> list[Any]:
        import torch

        tok = self.subject.tokenizer
        out: list[Any] = []
        for messages, check in zip(prompts, _parsers(parse, len(prompts)), strict=True):
            prompt = torch.tensor([chat_ids(tok, messages)], device=self.subject.device)
            model: Any = self.subject.model
            with torch.no_grad():
                generated = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
                    do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                )  # fmt: skip
            new = generated[0, prompt.shape[1] :]
            text = tok.decode(new, skip_special_tokens=True)
            self.usage.requests += 1
            self.usage.prompt_tokens += int(prompt.shape[1])
            self.usage.completion_tokens += len(new)
            try:
                out.append(check(text) if check else text)
            except (ValueError, KeyError, TypeError) as err:
                self.usage.failures += 1
                out.append(LLMError(f"{self.name}: malformed reply ({err})"))
        return out
