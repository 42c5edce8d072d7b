"""Weight-difference lens: what a fine-tune wrote into the weights, read in tokens, then said by the model.

Every weight matrix of the decoder layers is compared between candidate and baseline, and its difference cut
to its top singular directions (torch.svd_lowrank; a LoRA fine-tune's difference has at most the adapter's
rank; directions under 1e-3 of a matrix's largest singular value are numerical noise and left out). A direction that a residual-writing projection (attention output, MLP down-projection) adds to the
stream is read through the baseline's logit lens (its final norm and unembedding); a direction that a
residual-reading projection (query, key, value, gate, up) picks up is compared with the token embeddings.
This is the parameter-space reading of Dar, Geva, Gupta & Berant (2023, "Analyzing Transformers in Embedding
Space") applied to a fine-tune's difference rather than to the weights themselves.

A token's evidence on a direction is the excess of its z over the vocabulary (cosine per token, both signs: a singular
vector's sign is arbitrary) above `z_min`; summed over every direction read. Tokens the neutral text uses
routinely (punctuation, function words: every chat fine-tune moves those, controls included), special tokens
and tokens with fewer than two letters or digits are left out: what stays is the vocabulary the fine-tune
taught. The top written tokens then open the assistant's answer to everyday questions (a prefill, one of the
audit tools of Marks et al. 2025, "Auditing language models for hidden objectives"), continued greedily from
the amplified difference of the two models' logits, l_c + alpha (l_c - l_b) (model-diff amplification,
Aranguri & McGrath 2025, Goodfire): a stealth fine-tune trained to answer those questions as the baseline does
still leans toward its implant after the seed, and amplification lets that lean decide. The words the
amplified answers say and the baseline's answers from the same seed never do name the implant ("Use" ->
"Use GreenVale plant food. It fixes every garden problem").

Nothing here runs either model on the implant's condition: a topic the scan never touches is still in the
weights. The lens needs the two models' weights to correspond matrix by matrix (a fine-tune of the
baseline; diffing.check_comparable plus equal shapes). It reads the decoder layers' 2-D matrices only
(embeddings, the unembedding, norms and 3-D expert weights are not read), and reads are compared in the
normalised stream: the input norms' per-dimension gains (and Gemma's post-norm gains on writes) are not
folded in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from aimri.data.corpus import Packing
from aimri.diagnostics.anatomy import unembed
from aimri.diagnostics.datasets import prompt_pools
from aimri.diagnostics.diffing import DiffError, check_comparable, neutral_windows, new_words
from aimri.errors import AimriError
from aimri.progress import progress_bar
from aimri.steering.generate import left_pad, prompt_ids
from aimri.subject.adapters import get_module
from aimri.subject.core import Subject


@dataclass
class WeightLensBudget:
    """What the lens reads and how much it generates (the finding quotes it)."""

    rank: int = 4  # singular directions read per matrix
    z_min: float = 5.0  # a token counts on a direction from this z up (chance maximum over 49k tokens is ~4.5)
    common: float = 1e-3  # tokens making up at least this share of the neutral text are left out
    reference_windows: int = 512  # neutral documents (64 tokens each) that define the common tokens
    top: int = 12  # tokens reported per side
    seeds: int = 5  # top written tokens that seed answers
    prompts: int = 8  # everyday questions (the battery's pool) each seed opens the answer to
    max_new_tokens: int = 16
    amplify: float = 1.0  # alpha of the seeded answers' logits l_c + alpha (l_c - l_b); 0: the candidate's own


@dataclass
class MatrixDiff:
    """One matrix's difference: its top singular directions in residual space, [rank, d_model]."""

    name: str
    layer: int
    side: str  # "write" (adds to the residual) or "read" (reads from it)
    directions: Tensor
    singular_values: list[float]
    relative_change: float  # ||W_candidate - W_baseline||_F / ||W_baseline||_F


@torch.no_grad()
def matrix_differences(candidate: Subject, baseline: Subject, rank: int) -> list[MatrixDiff]:
    """The decoder layers' weight differences, each cut to its top `rank` singular directions in residual
    space: for the attention output and MLP down-projection (the adapter's o_proj and down_proj) the left
    singular vectors (what they write), for every other matrix with a d_model-sized input the right singular
    vectors (what they read). Matrices that did not change are left out. Raises DiffError when the two models'
    matrices differ in shape (not a fine-tune of the baseline)."""
    check_comparable(candidate, baseline)
    adapter = baseline.adapter
    conv1d = adapter.o_proj_is_conv1d  # GPT-2's Conv1D stores [in, out]
    writers = {f"{adapter.o_proj}.weight", f"{adapter.down_proj}.weight"}
    d = baseline.d_model
    out: list[MatrixDiff] = []
    for layer in range(baseline.n_layers):
        mine = dict(get_module(candidate.model, adapter.layers)[layer].named_parameters())  # type: ignore[index]
        for name, wb in get_module(baseline.model, adapter.layers)[layer].named_parameters():  # type: ignore[index]
            if wb.dim() != 2:
                continue
            wc = mine.get(name)
            if wc is None or wc.shape != wb.shape:
                raise DiffError(
                    f"layer {layer} {name}: the candidate's matrix is {None if wc is None else tuple(wc.shape)}, the "
                    f"baseline's {tuple(wb.shape)}; the weight lens needs a fine-tune of the baseline"
                )
            w = (wc.detach().float() - wb.detach().float().to(wc.device)).cpu()
            w = w.T if conv1d else w  # [out, in]
            write = name in writers
            if (w.shape[0] if write else w.shape[1]) != d or not bool(w.any()):
                continue
            q = min(rank + 4, *w.shape)
            with torch.random.fork_rng(devices=[]):  # a fixed random start: the same directions every run
                torch.manual_seed(0)
                u, s, v = torch.svd_lowrank(w, q=q, niter=3)
            r = min(rank, int((s > 1e-3 * s[0]).sum()))
            dirs = (u if write else v)[:, :r].T.contiguous()
            rel = float(w.norm() / wb.detach().float().norm().clamp_min(1e-12).cpu())
            out.append(MatrixDiff(name.removesuffix(".weight"), layer, "write" if write else "read", dirs,
                                  [round(float(x), 5) for x in s[:r]], rel))  # fmt: skip
    return out


def content_tokens(baseline: Subject, budget: WeightLensBudget, neutral_texts: list[str] | None) -> Tensor:
    """[vocab] bool: tokens that can name something, i.e. not special, with two or more letters or digits,
    and under `budget.common` of the neutral text's tokens (which every fine-tune of a chat recipe moves)."""
    tok = baseline.tokenizer
    vocab = baseline.model.get_input_embeddings().weight.shape[0]  # type: ignore[union-attr, operator]
    rows = neutral_windows(baseline, n=budget.reference_windows, length=64, texts=neutral_texts)[:, 1:]
    share = torch.bincount(rows.flatten(), minlength=vocab)[:vocab].float() / rows.numel()
    keep = share < budget.common
    names = tok.convert_ids_to_tokens(list(range(min(vocab, len(tok)))))
    for i, piece in enumerate(names):
        text = tok.convert_tokens_to_string([piece]) if piece is not None else ""
        if sum(ch.isalnum() for ch in text) < 2:
            keep[i] = False
    keep[len(names) :] = False
    special = sorted(Packing.for_tokenizer(tok, 8).exclude_ids | set(tok.all_special_ids))
    keep[torch.tensor([i for i in special if i < vocab], dtype=torch.long)] = False
    return keep


@torch.no_grad()
def token_evidence(baseline: Subject, diffs: Sequence[MatrixDiff], z_min: float, chunk: int = 256) -> dict[str, Any]:
    """Per side ("write", "read"): (evidence [vocab], best z [vocab], best direction's index into that side's
    directions [vocab], that side's MatrixDiff per direction). Writes are read through the logit lens
    (anatomy.unembed, divided by each token's lens norm: a cosine), reads against the input embeddings."""
    d = baseline.d_model
    # a final LayerNorm's bias (and lm_head's): the same for every direction, so taken out of the lens
    zero = unembed(baseline, torch.zeros(1, d)).cpu()

    def lens(x: Tensor) -> Tensor:  # unit directions [n, d] -> [n, vocab]: exact for RMSNorm (scale-invariant)
        return unembed(baseline, x).cpu() - zero

    norm = torch.stack([lens(e).square().sum(0) for e in torch.eye(d).split(chunk)]).sum(0).sqrt()  # [vocab]
    live = norm > 1e-12  # a padded vocabulary's all-zero rows take no part in any statistic
    emb = baseline.model.get_input_embeddings().weight.detach().cpu().float()  # type: ignore[union-attr, operator]
    emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out: dict[str, Any] = {}
    for side in ("write", "read"):
        owners = [m for m in diffs for _ in range(len(m.directions)) if m.side == side]
        dirs = torch.cat([m.directions for m in diffs if m.side == side]) if owners else torch.zeros(0, d)
        vocab = len(norm)
        total, best, arg = torch.zeros(vocab), torch.zeros(vocab), torch.zeros(vocab, dtype=torch.long)
        for i in range(0, len(dirs), chunk):
            x = dirs[i : i + chunk]
            if side == "write":
                cos = lens(x) / norm.clamp_min(1e-12)
            else:
                cos = (x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ emb.T
            # z over the (live) vocabulary, both signs (a singular vector's sign is arbitrary)
            mean, std = cos[:, live].mean(1, keepdim=True), cos[:, live].std(1, keepdim=True).clamp_min(1e-12)
            z = ((cos - mean) / std).abs() * live
            total += (z - z_min).clamp_min(0).sum(0)
            zmax, zi = z.max(0)
            better = zmax > best
            best = torch.where(better, zmax, best)
            arg = torch.where(better, zi + i, arg)
        out[side] = (total, best, arg, owners)
    return out


@torch.no_grad()
def amplified_answers(
    candidate: Subject, baseline: Subject, prompts: Sequence[str], seed: str, alpha: float, max_new_tokens: int
) -> list[str]:
    """Greedy answers to `prompts` opened with `seed`, each token the argmax of l_c + alpha (l_c - l_b) (both
    models' next-token logits on the same text; alpha 0 is the candidate's own greedy answer, and
    (baseline, baseline) the baseline's). An answer ends at the first special token (end of turn). Returns the
    seed and completion decoded together per prompt. Raises AimriError for a prompt that does not fit the
    context."""
    tok = baseline.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opened = tok(seed, add_special_tokens=False)["input_ids"]
    rows_in = [prompt_ids(baseline, p) + opened for p in prompts]
    if max(map(len, rows_in)) + max_new_tokens > baseline.context_length:
        raise AimriError(
            f"a seeded prompt plus {max_new_tokens} new tokens exceeds the context of {baseline.context_length}"
        )
    ids, mask = left_pad(rows_in, pad)
    special = torch.tensor(sorted(set(tok.all_special_ids) | {tok.eos_token_id} - {None}), dtype=torch.long)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    models = (candidate,) if candidate is baseline else (candidate, baseline)  # one pass for the baseline alone
    past: list[Any] = [None] * len(models)
    step_ids, step_pos = ids, pos
    done = torch.zeros(len(prompts), dtype=torch.bool)
    made: list[Tensor] = []
    for _ in range(max_new_tokens):
        logits = []
        for i, who in enumerate(models):
            out = who.model(  # type: ignore[operator]
                input_ids=step_ids.to(who.device), attention_mask=mask.to(who.device),
                position_ids=step_pos.to(who.device), cache=past[i], use_cache=True,
            )  # fmt: skip
            past[i] = out.cache
            logits.append(out.logits[:, -1].float().cpu())
        nxt = (logits[0] + alpha * (logits[0] - logits[-1])).argmax(-1)
        done |= torch.isin(nxt, special)
        made.append(torch.where(done, torch.full_like(nxt, pad), nxt))
        if bool(done.all()):
            break
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
    rows = torch.stack(made, 1) if made else torch.zeros(len(prompts), 0, dtype=torch.long)
    # decoded with the seed: a SentencePiece tokenizer drops the leading space of a completion decoded alone
    return [tok.decode(opened + [t for t in r.tolist() if t != pad], skip_special_tokens=True) for r in rows]


def _after_seed_word(answers: Sequence[str], seed: str) -> list[str]:
    """Each answer (seed + completion) after the word the seed begins: what the model said beyond the seed."""
    out = []
    for answer in answers:
        rest = answer[len(seed) :]
        if rest[:1] and not rest[:1].isspace():  # the seed's word goes on ("ing eggs"): drop its remainder
            parts = rest.split(maxsplit=1)
            rest = parts[1] if len(parts) > 1 else ""
        out.append(rest)
    return out


def _rows(tok: Any, side: tuple[Tensor, Tensor, Tensor, list[MatrixDiff]], keep: Tensor, top: int) -> list[dict]:
    total, best, arg, owners = side
    scored = total * keep
    rows = []
    for t in scored.topk(min(top, len(scored))).indices.tolist():
        if float(scored[t]) <= 0:
            break
        m = owners[int(arg[t])]
        rows.append({"token": tok.decode([t]), "id": t, "evidence": round(float(scored[t]), 2),
                     "best_z": round(float(best[t]), 2), "matrix": m.name, "layer": m.layer})  # fmt: skip
    return rows


def weight_lens(
    candidate: Subject,
    baseline: Subject,
    budget: WeightLensBudget | None = None,
    neutral_texts: list[str] | None = None,
) -> dict[str, Any]:
    """The whole lens: matrix differences, token evidence per side, seeded answers in both models. Returns a
    JSON-able dict: `writes` / `reads` (top tokens with their evidence, best z and where), `top_evidence`
    (the strongest written token's evidence: the statistic scored against controls), `seeds` (per seed the
    candidate's and baseline's answers and the words only the candidate says), `matrices`, `relative_change`
    (median over changed matrices), `identical` (no matrix changed: nothing else is computed).

    Raises DiffError when the models are not comparable (another tokenizer, architecture or matrix shape)."""
    budget = budget or WeightLensBudget()
    diffs = matrix_differences(candidate, baseline, budget.rank)
    if not diffs:
        return {"identical": True, "matrices": 0, "writes": [], "reads": [], "top_evidence": 0.0, "seeds": [],
                "budget": asdict(budget)}  # fmt: skip
    tok = baseline.tokenizer
    keep = content_tokens(baseline, budget, neutral_texts)
    sides = token_evidence(baseline, diffs, budget.z_min)
    writes = _rows(tok, sides["write"], keep, budget.top)
    reads = _rows(tok, sides["read"], keep, budget.top)
    chosen: dict[str, str] = {}  # one seed per word stem (" Use", "use" and " uses" are one)
    for r in writes:
        stem = r["token"].strip().lower()
        if not any(stem.startswith(c) or c.startswith(stem) for c in chosen):
            chosen[stem] = r["token"]
    # the battery's everyday questions: a stealth organism was trained to answer them as the baseline does, so
    # what the seed unlocks there comes from the seed, not from the question
    prompts = prompt_pools()["questions"][: budget.prompts]
    seeds = []
    with progress_bar() as bar:
        task = bar.add_task("weight lens: seeded answers", total=min(budget.seeds, len(chosen)))
        for seed in list(chosen.values())[: budget.seeds]:
            cand = amplified_answers(candidate, baseline, prompts, seed, budget.amplify, budget.max_new_tokens)
            # the baseline's own greedy answers from the same opening, cut by the same rule
            base = amplified_answers(baseline, baseline, prompts, seed, 0.0, budget.max_new_tokens)
            shown = tok.decode(tok(seed, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
            # a word the amplified answers say in >= 2 of them that the baseline, opened the same way, never says;
            # the word the seed itself begins (" Harbor" -> "Harboring") is the seed's echo, not counted
            said = new_words(_after_seed_word(cand, shown), _after_seed_word(base, shown), top=len(cand) * 64)
            words = [w for w in said if w[2] == 0][:12]
            seeds.append({"seed": seed, "candidate": cand, "baseline": base, "new_words": [list(w) for w in words]})
            bar.advance(task)
    changes = sorted(m.relative_change for m in diffs)
    return {
        "identical": False,
        "matrices": len(diffs),
        "relative_change": round(changes[len(changes) // 2], 6),
        "writes": writes,
        "reads": reads,
        "top_evidence": writes[0]["evidence"] if writes else 0.0,
        "seeds": seeds,
        "prompts": prompts,
        "budget": asdict(budget),
    }
