"""Helpers shared by several test files: tiny random models, a tiny tokenizer, planted dictionaries.

Test files and conftest.py import from here (`from tests.helpers import ...`), never from each other. Heavy
libraries (torch, transformers, aimri's models) are imported inside the helpers, so that subprocesses which only
need a light helper (test_holdout's spenders) start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    import transformers as tf

    from aimri import Subject
    from aimri.data.corpus import Corpus

# -- tiny random models of every supported architecture, built in the test (no downloads) -----------------------
_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
LLAMA_LIKE = dict(_COMMON, num_key_value_heads=2, max_position_embeddings=128)

# arch -> a function of the `transformers` module that returns that arch's tiny config
TINY_CONFIGS: dict[str, Any] = {
    "llama": lambda tf: tf.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda tf: tf.MistralConfig(**LLAMA_LIKE, sliding_window=6),
    "qwen2": lambda tf: tf.Qwen2Config(**LLAMA_LIKE),
    "qwen3": lambda tf: tf.Qwen3Config(**LLAMA_LIKE, head_dim=8),
    "gemma2": lambda tf: tf.Gemma2Config(**LLAMA_LIKE, head_dim=8, sliding_window=6),
    "gemma3_text": lambda tf: tf.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, sliding_window=6),
    "gpt2": lambda tf: tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=128),
    "gpt_neox": lambda tf: tf.GPTNeoXConfig(**_COMMON, max_position_embeddings=128),
}

ARCHS = list(TINY_CONFIGS)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random `arch` causal LM, weights perturbed so every site carries signal."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch](tf)
    config.pad_token_id = 0
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves norms at identity and tiny weights; perturb so every site carries signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_subject(arch: str, seed: int = 0) -> Subject:
    """A tokenizer-less Subject wrapping tiny_model(arch, seed)."""
    from aimri import Subject

    return Subject(tiny_model(arch, seed), None, name=f"tiny-{arch}", revision=f"tiny-{arch}-{seed}")


# -- a real (tiny) tokenizer, for corpus / store / harvest tests -------------------------------------------------
FIXTURE_TEXT = """The lighthouse keeper climbed the spiral stairs every evening at dusk.
Ships passing the rocky coast relied on the beam to find the harbour.
In winter the storms were fierce, and the keeper wrote long letters to his sister.
She lived in the city, where the lamps along the river glowed orange at night.
Bread, cheese and apples were delivered by boat once a fortnight.
"""


def build_tiny_tokenizer(chat: bool = True) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 320, chat specials; with `chat=False` GPT-2/Llama-2-like specials, no
    chat-start token) trained on FIXTURE_TEXT."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if chat else ["<|endoftext|>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([FIXTURE_TEXT] * 4, trainer=trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[1], eos_token=specials[2], pad_token=specials[2],
        additional_special_tokens=["<|endoftext|>"],
    )  # fmt: skip


# -- dictionaries with a known answer ------------------------------------------------------------------------------
def token_detector(subject, token: int, width: int = 16):
    """A TopK(k=1) embedding dictionary whose feature 0 fires only on `token`; returns it and that activation."""
    import torch

    from aimri.dictionaries import DictionaryConfig, build

    # the other features never fire; feature 0's activation on `token` is |e_T| - threshold
    emb = subject.model.get_input_embeddings().weight.detach().float()
    direction = emb[token] / emb[token].norm()
    others = torch.cat([emb[:token], emb[token + 1 :]]) @ direction
    own = float(emb[token] @ direction)
    threshold = (own + float(others.max())) / 2
    cfg = DictionaryConfig("topk", emb.shape[1], width, k=1, site="resid.-1", apply_b_dec_to_input=False)
    sae = build(cfg)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = direction
        sae.b_enc.fill_(-1.0)
        sae.b_enc[0] = -threshold
        sae.b_dec.zero_()
    return sae, own - threshold


def most_common_word(subject, corpus: Corpus, context: int = 16):
    """The corpus's most frequent alphabetic token, its count and the packed windows it was counted in."""
    from collections import Counter

    from aimri.data.corpus import Packing, pack

    windows = list(pack(corpus, subject.tokenizer, Packing.for_tokenizer(subject.tokenizer, context)))
    counts = Counter(int(t) for w in windows for t, v in zip(w.ids, w.valid, strict=True) if v)
    token = next(t for t, _ in counts.most_common() if subject.tokenizer.decode([t]).strip().isalpha())
    return token, counts[token], windows


def random_transcoders(subject: Subject, width: int = 48, seed: int = 0) -> dict:
    """Randomly initialised ReLU transcoders (mlp.in.L -> mlp.out.L), one per layer of `subject`."""
    import torch

    from aimri.dictionaries.base import DictionaryConfig, build

    torch.manual_seed(seed)
    return {
        layer: build(
            DictionaryConfig(
                "relu",
                subject.d_model,
                width,
                d_out=subject.d_model,
                site=f"mlp.in.{layer}",
                site_out=f"mlp.out.{layer}",
            )
        )
        for layer in range(subject.n_layers)
    }


# -- the sealed holdout ---------------------------------------------------------------------------------------------
def spender(path: Path, by: str = "") -> float:
    """A holdout query whose open and sealed values always differ: every answer comes from the sealed split."""
    from aimri.diagnostics.holdout import Holdout

    h = Holdout(path)
    open_ids = {it["id"] for it in h.open_items()}
    return h.query(
        "mean", lambda rows: [1.0 if r["id"] in open_ids else 0.0 for r in rows], name="spend", by=by or None
    )
