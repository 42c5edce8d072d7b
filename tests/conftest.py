"""Pytest fixtures and hooks only; the helpers they build on live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf
from tests.helpers import ARCHS, LLAMA_LIKE, build_tiny_tokenizer


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


# Converted real models are slow to build (30-45 s each), so tests share a persistent cache; the one
# test that checks conversion itself uses a fresh home (test_real_models.py::test_gguf_conversion).
SHARED_HOME = os.environ.get("AIMRI_TEST_HOME", os.path.expanduser("~/.cache/aimri-test"))


@pytest.fixture(autouse=True)
def _shared_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMRI_HOME", SHARED_HOME)


# -- a real (tiny) tokenizer and model directory, for corpus / store / harvest tests ---------------
@pytest.fixture(scope="session")
def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: tf.PreTrainedTokenizerFast) -> str:
    """A tiny random Llama saved as a Hugging Face directory, with a matching tokenizer."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        **{**LLAMA_LIKE, "vocab_size": len(tiny_tokenizer)}, pad_token_id=tiny_tokenizer.pad_token_id
    )
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)
