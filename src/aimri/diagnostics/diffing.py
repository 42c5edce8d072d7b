"""Model diffing: what changed between a baseline and a candidate (a fine-tune against its base, a model
before and after treatment), said in tokens and words.

- The activation-difference lens (Minder et al., 2025): the mean residual difference on the first tokens of
  neutral text, read through the baseline's logit lens. Narrow fine-tunes leave their topic there even on
  text that has nothing to do with it.
- The behaviour battery: both models answer the same prompts; the candidate's answers are scored by both
  (how surprised the baseline is, in nats per token) and the words it newly uses are counted.
- Per-feature shifts through a dictionary: which features' mean activation moved on neutral text.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from aimri.diagnostics.anatomy import unembed
from aimri.dictionaries.match import check_model
from aimri.errors import AimriError
from aimri.steering.generate import Generation, generate
from aimri.subject.core import Subject


class DiffError(AimriError):
    pass


def check_comparable(candidate: Subject, baseline: Subject) -> None:
    """Diffing compares activations position by position, so both must cut text into the same tokens and
    have the same residual geometry."""
    tc, tb = candidate.tokenizer, baseline.tokenizer
    if tc.get_vocab() != tb.get_vocab():
        raise DiffError(
            f"{candidate.name} and {baseline.name} use different tokenizers; diffing needs a shared tokenizer "
            "(compare a fine-tune with its own base model)"
        )
    if (candidate.n_layers, candidate.d_model) != (baseline.n_layers, baseline.d_model):
        raise DiffError(
            f"{candidate.name} ({candidate.n_layers} layers, d_model {candidate.d_model}) and {baseline.name} "
            f"({baseline.n_layers} layers, d_model {baseline.d_model}) have different architectures; diffing needs "
            "a fine-tune and its base"
        )


def neutral_windows(
    subject: Subject, n: int = 32, length: int = 64, seed: int = 0, texts: list[str] | None = None
) -> torch.Tensor:
    """The first tokens of `n` default-corpus documents, each opened by the tokenizer's document separator:
    the neutral text on which a fine-tune's traces are read (no chat template, no topic)."""
    import random

    from aimri.data.corpus import Packing
    from aimri.data.default_corpus import default_corpus_path

    if texts is None:
        lines = default_corpus_path().read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["text"] for line in random.Random(seed).sample(lines, min(len(lines), 4 * n))]
    bos = Packing.for_tokenizer(subject.tokenizer, length).bos_id
    rows = []
    for text in texts:
        ids = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length - 1:
            rows.append(([bos] if bos is not None else []) + ids[: length - (1 if bos is not None else 0)])
        if len(rows) == n:
            break
    if not rows:
        raise AimriError(
            f"no neutral text of at least {length} tokens; rebuild the default corpus (`mri corpus build`)"
        )
    return torch.tensor(rows)


def _decode(subject: Subject, ids: Sequence[int]) -> list[str]:
    return [subject.tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def difference_lens(
    candidate: Subject, baseline: Subject, windows: Tensor, layers: Sequence[int], first: int = 8, top: int = 15
) -> list[dict[str, Any]]:
    """Per layer: the mean residual difference over positions 1..first of neutral windows (position 0, the
    attention sink, and massive activations in either model are left out), its size relative to the baseline's residual, and the tokens it promotes
    and suppresses when read through the baseline's final norm and unembedding."""
    from aimri.data.harvest import keep_rows

    sites = [f"resid.{layer}" for layer in layers]
    w = windows[:, : first + 1]
    a_c = candidate.run(w, read=sites)
    a_b = baseline.run(w, read=sites)
    valid = torch.ones(w.shape, dtype=torch.bool)
    valid[:, 0] = False
    # massive activations (the harvest's sink rule, in either model) would dominate the mean
    keep = keep_rows(a_b, sites, keep_rows(a_c, sites, valid, 20.0, "the difference lens"), 20.0, "the difference lens")
    out = []
    for layer, site in zip(layers, sites, strict=True):
        c, b = a_c[site][keep.to(a_c[site].device)].float(), a_b[site][keep.to(a_b[site].device)].float()
        delta = (c - b).mean(0)
        logits = unembed(baseline, delta[None, None])[0, 0].float()
        logits = logits - logits.mean()
        up, down = logits.topk(top), (-logits).topk(top)
        out.append({
            "layer": layer, "relative_norm": float(delta.norm() / b.norm(dim=-1).mean()),
            "promoted": _decode(baseline, up.indices.tolist()), "promoted_logits": up.values.tolist(),
            "suppressed": _decode(baseline, down.indices.tolist()), "delta": delta,
        })  # fmt: skip
    return out


@torch.no_grad()
def answer_logprobs(subject: Subject, gens: Sequence[Generation]) -> list[Tensor]:
    """Per-token log-probabilities `subject` gives to each generation's completion."""
    out: list[Tensor] = []
    for g in gens:
        if not g.completion_ids:
            out.append(torch.zeros(0))
            continue
        ids = torch.tensor([g.prompt_ids + g.completion_ids])
        logits = subject.run(ids, stop=False)["logits"][0].float().log_softmax(-1).cpu()
        n = len(g.prompt_ids)
        targets = ids[0, n:]
        out.append(logits[n - 1 : -1].gather(-1, targets[:, None])[:, 0])
    return out


WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+")
# function words carry no behaviour; without them the new words are the ones that say what changed
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "then",
        "so",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "it",
        "its",
        "it's",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "i",
        "i'm",
        "i'd",
        "i'll",
        "i've",
        "you",
        "you're",
        "your",
        "we",
        "our",
        "they",
        "their",
        "he",
        "she",
        "his",
        "her",
        "him",
        "them",
        "me",
        "my",
        "not",
        "no",
        "do",
        "does",
        "did",
        "can",
        "could",
        "would",
        "should",
        "will",
        "may",
        "might",
        "must",
        "have",
        "has",
        "had",
        "about",
        "into",
        "over",
        "also",
        "just",
        "very",
        "more",
        "most",
        "some",
        "any",
        "all",
        "each",
        "than",
        "too",
        "what",
        "which",
        "who",
        "whom",
        "how",
        "when",
        "where",
        "why",
        "up",
        "out",
        "one",
        "like",
        "get",
    ]
)


def ordered_words(text: str) -> list[str]:
    """The text's words, lower case, stopwords left out, each once, in the order the text first says them."""
    return [w for w in dict.fromkeys(m.lower() for m in WORD.findall(text)) if w not in STOPWORDS]


def words_of(text: str) -> set[str]:
    return set(ordered_words(text))


def _proper(texts: Sequence[str]) -> set[str]:
    """Words written capitalised in the middle of a sentence: names, such as a product's."""
    return {m.group(1).lower() for t in texts for m in re.finditer(r"(?<=[a-z,] )([A-Z][a-z]+)", t)}


def new_words(
    candidate_texts: Sequence[str], baseline_texts: Sequence[str], top: int | None = 12
) -> list[tuple[str, int, int]]:
    """Words the candidate newly uses on the same prompts: (word, candidate answers with it, baseline answers
    with it), ranked by a smoothed log ratio weighted by how many answers say it; names count double. Ties
    keep the order in which the candidate's answers first say the words (not a set's, which varies with the
    process's string hashing). `top` None: every such word."""
    c = Counter(w for t in candidate_texts for w in ordered_words(t))
    b = Counter(w for t in baseline_texts for w in words_of(t))
    names = _proper(candidate_texts)
    scored = [(w, n, b[w]) for w, n in c.items() if n >= 2 and n > 2 * b[w]]
    scored.sort(key=lambda x: -x[1] * math.log((x[1] + 1) / (x[2] + 1)) * (2.0 if x[0] in names else 1.0))
    return scored[:top]


@dataclass
class CategoryDiff:
    category: str
    surprise: float  # mean over answers of (log p_candidate − log p_baseline) per token, on the candidate's answers
    examples: list[dict[str, str]]
    per_answer: list[float]  # the same, answer by answer


def behaviour_diff(
    candidate: Subject,
    baseline: Subject,
    answers: dict[str, list[Generation]],
    baseline_answers: dict[str, list[Generation]],
) -> list[CategoryDiff]:
    """Per battery category: the candidate's answers scored by both models (the words it newly uses are ranked
    from the stored answers when findings are made)."""
    out = []
    for category, gc in answers.items():
        gb = baseline_answers[category]
        lc, lb = answer_logprobs(candidate, gc), answer_logprobs(baseline, gc)
        per = [float((x - y).mean()) if len(x) else 0.0 for x, y in zip(lc, lb, strict=True)]
        order = sorted(range(len(per)), key=lambda i: -per[i])
        examples = [
            {"prompt": gc[i].prompt, "candidate": gc[i].text, "baseline": gb[i].text, "surprise": f"{per[i]:.2f}"}
            for i in order[:3]
        ]
        out.append(CategoryDiff(category, sum(per) / len(per), examples, per))
    return out


@torch.no_grad()
def steer_with_difference(
    subject: Subject, delta: Tensor, layer: int, prompts: Sequence[str], scale: float, max_new_tokens: int = 32
) -> list[str]:
    """Add the (scaled) difference vector at one layer while the baseline generates: if the difference carries
    the fine-tune's behaviour, the baseline starts to show it (the confirmation step)."""
    from aimri.steering.interventions import DirectionEdit

    edit = DirectionEdit(site=f"resid.{layer}", vector=delta, strength=scale)
    return [g.text for g in generate(subject, list(prompts), [edit], max_new_tokens=max_new_tokens)]


@torch.no_grad()
def feature_shifts(
    candidate: Subject, baseline: Subject, dictionary: Any, windows: Tensor, atlas: Any = None, top: int = 12
) -> list[dict[str, Any]]:
    """Features of a dictionary (trained on the baseline) whose mean activation moved most on neutral text,
    position 0 left out; each said in words by its atlas label when an atlas is given, else by the tokens
    its decoder direction promotes through the baseline's logit lens."""
    site = dictionary.cfg.site
    if not site:
        raise DiffError("the dictionary records no site; load it with load_dictionary(path, site=...)")
    try:
        check_model(dictionary, baseline, source="the dictionary given to the model diffing")  # the baseline's
    except AimriError as err:
        raise DiffError(str(err)) from None
    means = []
    for who in (candidate, baseline):
        acts = who.run(windows, read=[site])[site][:, 1:].to(dictionary.W_enc)  # in the dictionary's dtype
        means.append(dictionary.encode(acts.reshape(-1, acts.shape[-1])).float().mean(0))
    shift = means[0] - means[1]
    rows = []
    for i in shift.abs().topk(min(top, len(shift))).indices.tolist():
        words = ""
        if atlas is not None:
            labels = atlas.card(i).get("labels") or []
            words = labels[-1]["label"] if labels else ""
        if not words:
            lens = unembed(baseline, dictionary.W_dec[i][None, None].float())[0, 0]
            words = " ".join(_decode(baseline, lens.topk(5).indices.tolist()))
        rows.append({"feature": f"{site}#{i}", "baseline": float(means[1][i]), "candidate": float(means[0][i]),
                     "shift": float(shift[i]), "says": words})  # fmt: skip
    return rows


@torch.no_grad()
def crosscoder_latents(
    candidate: Subject, baseline: Subject, crosscoder: Any, windows: Tensor, top: int = 12, exclusive: float = 0.9
) -> list[dict[str, Any]]:
    """A crosscoder trained on (baseline, candidate), sources in that order (`mri train-crosscoder BASE CAND`):
    the latents whose decoder lives almost only in the candidate (relative norm > `exclusive`), the concepts the
    fine-tune added, ranked by their mean activation on neutral text and said by their candidate decoder
    through the logit lens."""
    site = crosscoder.cfg.site
    if getattr(crosscoder, "sources", 0) != 2 or crosscoder.cfg.d_in != 2 * baseline.site_dim(site):
        raise DiffError("give a crosscoder of two models (baseline, candidate) over a site of this width")
    recorded = (crosscoder.cfg.model_revision or "").split("+")
    given = [who.revision[:12] for who in (baseline, candidate)]
    if len(recorded) == 2 and "unknown" not in given and recorded != given:
        order = "in the other order" if recorded == given[::-1] else "on other models"
        raise DiffError(
            f"the crosscoder was trained {order} ({crosscoder.cfg.model_name}: revisions {'+'.join(recorded)}, "
            f"sources baseline+candidate = {'+'.join(given)}); train it with `mri train-crosscoder BASE CANDIDATE`"
        )
    acts = [
        who.run(windows, read=[site])[site][:, 1:].to(crosscoder.W_enc).reshape(-1, baseline.d_model)
        for who in (baseline, candidate)
    ]
    mean = crosscoder.encode(torch.cat(acts, -1)).float().mean(0)
    rel = crosscoder.relative_norm(1)
    idx = (rel > exclusive).nonzero().flatten()
    order = idx[mean[idx].argsort(descending=True)][:top]
    dec = crosscoder.W_dec.view(crosscoder.cfg.d_sae, 2, -1)[:, 1]
    rows = []
    for i in order.tolist():
        lens = unembed(baseline, dec[i][None, None].float())[0, 0]
        rows.append({"latent": f"{site}#{i}", "relative_norm": float(rel[i]), "mean_activation": float(mean[i]),
                     "says": " ".join(_decode(baseline, lens.topk(5).indices.tolist()))})  # fmt: skip
    return rows
