"""Tiny random models of every supported architecture, built in the test (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

from aimri import Subject

_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
_LLAMA_LIKE = dict(_COMMON, num_key_value_heads=2, max_position_embeddings=128)

TINY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**_LLAMA_LIKE, sliding_window=6),
    "qwen2": lambda: tf.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: tf.Qwen3Config(**_LLAMA_LIKE, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**_LLAMA_LIKE, head_dim=8, sliding_window=6),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=8, sliding_window=6),
    "gpt2": lambda: tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=128),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_COMMON, max_position_embeddings=128),
}

ARCHS = list(TINY_CONFIGS)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config.pad_token_id = 0
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves norms at identity and tiny weights; perturb so every site carries signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_subject(arch: str, seed: int = 0) -> Subject:
    return Subject(tiny_model(arch, seed), None, name=f"tiny-{arch}", revision=f"tiny-{arch}-{seed}")


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
FIXTURE_TEXT = """The lighthouse keeper climbed the spiral stairs every evening at dusk.
Ships passing the rocky coast relied on the beam to find the harbour.
In winter the storms were fierce, and the keeper wrote long letters to his sister.
She lived in the city, where the lamps along the river glowed orange at night.
Bread, cheese and apples were delivered by boat once a fortnight.
"""


def build_tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([FIXTURE_TEXT] * 4, trainer=trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>"],
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: tf.PreTrainedTokenizerFast) -> str:
    """A tiny random Llama saved as a Hugging Face directory, with a matching tokenizer."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        **{**_LLAMA_LIKE, "vocab_size": len(tiny_tokenizer)}, pad_token_id=tiny_tokenizer.pad_token_id
    )
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)
