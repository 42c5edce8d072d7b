"""Evaluating a dictionary on held-out tokens: reconstruction statistics from a store, and the
downstream cost of splicing it into the model (CE loss recovered, KL to the clean model)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from aimri.data.corpus import Corpus, Window, pack
from aimri.data.harvest import keep_rows
from aimri.data.store import ActivationStore
from aimri.devices import resolve_device
from aimri.dictionaries.base import Dictionary
from aimri.dictionaries.match import check_dtype, check_model, check_store, packing_for
from aimri.errors import AimriError
from aimri.subject.core import Subject
from aimri.subject.taps import Edit


def _site_of(dictionary: Dictionary, store: ActivationStore) -> tuple[str, str]:
    site = dictionary.cfg.site
    site_out = dictionary.cfg.site_out if dictionary.cfg.is_transcoder else site
    for s in {site, site_out}:
        if s not in store.sites:
            raise AimriError(
                f"the dictionary was trained on {s!r}, which the store {store.path} lacks (it has {', '.join(store.sites)})"
            )
    if store.d(site) != dictionary.cfg.d_in:
        raise AimriError(f"store {site} is {store.d(site)} wide, the dictionary expects d_in={dictionary.cfg.d_in}")
    return site, site_out


@torch.no_grad()
def reconstruction_metrics(
    dictionary: Dictionary,
    store: ActivationStore,
    max_rows: int = 200_000,
    batch_size: int = 4096,
    shards: list[int] | None = None,
) -> dict[str, Any]:
    """L0, FVU, mean cosine, dead fraction and the log10 firing-density histogram over the store's rows
    (pass a store the dictionary was not trained on, or its held-out tail)."""
    site, site_out = _site_of(dictionary, store)
    sites = [site] if site == site_out else [site, site_out]
    batches = store.batches(sites if len(sites) > 1 else sites[0], batch_size, shuffle=False, shards=shards)
    pairs = (b if isinstance(b, tuple) else (b, b) for b in batches)
    result = reconstruction_from_pairs(dictionary, pairs, max_rows)
    if result is None:
        raise AimriError(f"the store {store.path} has no rows to evaluate on")
    return result


@torch.no_grad()
def reconstruction_from_pairs(
    dictionary: Dictionary, pairs: Iterable[tuple[Tensor, Tensor]], max_rows: int = 200_000
) -> dict[str, Any] | None:
    """The reconstruction statistics over (input, target) row batches; None when there are no rows. Rows in
    another dtype than the dictionary's (a bf16 model's) are cast to it; the statistics are summed in fp32."""
    dictionary.eval()
    fired = torch.zeros(dictionary.d_sae, dtype=torch.int64)
    sse = cos_sum = l0_sum = 0.0
    rows = 0
    sum_y = sum_y2 = None
    for x, y in pairs:
        x = x.to(dictionary.W_enc)
        codes = dictionary.encode(x)
        recon = dictionary.decode(codes, x).float()
        y = y.to(recon)
        sse += float((recon - y).pow(2).sum())
        sum_y = y.sum(0).double() if sum_y is None else sum_y + y.sum(0).double()
        sum_y2 = y.pow(2).sum(0).double() if sum_y2 is None else sum_y2 + y.pow(2).sum(0).double()
        cos_sum += float(F.cosine_similarity(recon, y, dim=1).sum())
        active = codes > 0
        l0_sum += float(active.sum())
        fired += active.sum(0).cpu()
        rows += len(x)
        if rows >= max_rows:
            break
    if rows == 0 or sum_y is None or sum_y2 is None:
        return None
    total_sq = float((sum_y2 - sum_y.pow(2) / rows).sum())
    density = fired.double() / rows
    hist, edges = np.histogram(np.log10(density[density > 0].numpy()), bins=20, range=(-8, 0))
    return {
        "rows": rows,
        "l0": l0_sum / rows,
        "fvu": sse / total_sq,
        "cosine": cos_sum / rows,
        "dead_frac": float((fired == 0).double().mean()),
        "density_log10_hist": {"counts": hist.tolist(), "edges": edges.round(2).tolist()},
    }


@torch.no_grad()
def rows_from_windows(
    subject: Subject, windows: list[Window], sites: list[str], batch_size: int = 8, sink_ratio: float = 20.0
) -> dict[str, Tensor]:
    """{site: [rows, d]}: the Subject's activations on `windows`, kept by the harvest's rule, in fp32."""
    names = [subject.site(s).name for s in sites]
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        ids = torch.from_numpy(np.stack([w.ids for w in group]))
        att = torch.from_numpy(np.stack([w.attention for w in group])).long()
        acts = subject.run(ids, att, read=names)
        valid = keep_rows(acts, names, torch.from_numpy(np.stack([w.valid for w in group])), sink_ratio, "evaluation")
        for n in names:
            parts[n].append(acts[n][valid].float())
    return {n: torch.cat(p) if p else torch.zeros(0, subject.site_dim(n)) for n, p in parts.items()}


@torch.no_grad()
def downstream_metrics(
    dictionary: Dictionary,
    subject: Subject,
    corpus: Corpus,
    context: int = 256,
    n_windows: int = 32,
    skip_windows: int = 0,
    batch_size: int = 8,
    sink_ratio: float = 20.0,
    windows: list[Window] | None = None,
) -> dict[str, float]:
    """CE of next-token prediction with the dictionary spliced in (its error term dropped) vs the clean
    model vs the site zero-ablated, over held-out windows (those after the first `skip_windows`), and the
    KL from clean to spliced. Splicing skips position 0 and attention-sink tokens, as the harvest does.
    `windows`, when given, are used instead (e.g. a training stream's held-out windows).

    A half-precision model (bf16, fp16) is evaluated in its own dtype: the dictionary computes in its dtype on
    the activations cast to it, its splice is cast back to the model's, and the losses are summed in fp32."""
    cfg = dictionary.cfg
    site_in = subject.site(cfg.site).name
    site_out = subject.site(cfg.site_out).name if cfg.is_transcoder else site_in
    if windows is None:
        packing = packing_for(dictionary, subject.tokenizer, context)  # opened as its training windows were
        windows = list(
            itertools.islice(pack(corpus, subject.tokenizer, packing), skip_windows, skip_windows + n_windows)
        )
    if not windows:
        raise AimriError("no held-out windows left in the corpus for the downstream evaluation; use a larger corpus")
    dictionary = dictionary.on(subject.device)  # spliced on the model's device
    dictionary.eval()
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        ids = torch.from_numpy(np.stack([w.ids for w in group]))
        att = torch.from_numpy(np.stack([w.attention for w in group])).long()
        valid = torch.from_numpy(np.stack([w.valid for w in group]))
        clean = subject.run(ids, att, read=[site_in], stop=False)
        valid = keep_rows(clean, [site_in], valid, sink_ratio, "the downstream evaluation")
        inputs = clean[site_in]

        def splice(y: Tensor, inputs: Tensor = inputs, valid: Tensor = valid) -> Tensor:
            # the dictionary computes in its own dtype; its reconstruction goes back in the model's
            x = (inputs if cfg.is_transcoder else y).to(dictionary.W_enc)
            recon = dictionary.decode(dictionary.encode(x), x)
            out = recon.to(y)
            lost = ~torch.isfinite(out) & torch.isfinite(recon.to(out.device)) & valid.to(out.device)[..., None]
            if bool(lost.any()):  # finite in the dictionary's dtype, out of the model's range
                raise AimriError(
                    f"the dictionary's reconstruction at {site_out} overflows the model's "
                    f"{str(y.dtype).removeprefix('torch.')} (largest value {torch.finfo(y.dtype).max:g}); "
                    "evaluate it on the model loaded in float32"
                )
            return out

        spliced = subject.run(ids, att, edit=[Edit(site_out, splice, positions=valid)], stop=False)["logits"]
        zero = subject.run(ids, att, edit=[Edit(site_out, torch.zeros(()), positions=valid)], stop=False)["logits"]
        logits_of = {"clean": clean["logits"].float(), "spliced": spliced.float(), "zero": zero.float()}
        targets = ids[:, 1:].to(spliced.device)
        mask = ((att[:, 1:] > 0) & valid[:, :-1].cpu()).to(spliced.device)
        for name, logits in logits_of.items():
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            totals[name] += float(ce[mask].sum())
        logp_clean = logits_of["clean"][:, :-1].log_softmax(-1)
        logp_spliced = logits_of["spliced"][:, :-1].log_softmax(-1)
        kl = (logp_clean.exp() * (logp_clean - logp_spliced)).sum(-1)
        totals["kl"] += float(kl[mask].sum())
        count += int(mask.sum())
    ce = {k: v / max(count, 1) for k, v in totals.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / gap if gap > 0 else math.nan,
        "kl_div": ce["kl"],
        "downstream_tokens": count,
    }


def evaluate_dictionary(
    dictionary: Path,
    store: Path,
    model: str | None = None,
    corpus: list[Path] | None = None,
    windows: int = 32,
    log: Callable[[str], None] = print,
    allow_other_model: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """A saved dictionary's reconstruction metrics (L0, FVU, cosine, dead fraction, firing density) on the
    rows of `store`, and, unless `windows` is 0, its downstream metrics (CE loss recovered, KL) on that many
    held-out windows of `corpus` run through `model`.

    When `store` is the store the dictionary was trained on (its training.json says so), only the shards
    held out of training are read; a dictionary trained on every shard of it is refused. `model` defaults
    to the store's model; `corpus` to the default corpus, past the windows the store was harvested from
    (`log` reports building the default corpus on first use).

    Raises AimriError when the store or `model` is another model than the dictionary was trained on
    (aimri.dictionaries.match.check_model; `allow_other_model` for a deliberate transfer). `device` / `dtype`:
    where the dictionary and the model run (aimri.load's rules; the statistics are summed in fp32)."""
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries.formats import load_dictionary
    from aimri.subject.loading import load

    dictionary, store = Path(dictionary), Path(store)
    sae = load_dictionary(dictionary).to(resolve_device(device))
    held_out = ActivationStore(store)
    check_store(
        held_out,
        f"the model {dictionary} was trained on, {sae.cfg.model_name or '?'}",  # its rows: its model's
        sae.cfg.model_revision,
        allow_other_model,
    )
    if note := check_dtype(held_out, sae):
        log(note)
    shards = None
    info = dictionary / "training.json"
    if info.exists():
        trained = json.loads(info.read_text())
        if trained.get("store") == str(store.resolve()):
            shards = trained.get("heldout_shards") or None
            if shards is None:
                raise AimriError(
                    f"{dictionary} was trained on every shard of {store}; pass a held-out store, or retrain with "
                    "`heldout_shards` > 0"
                )
    result: dict[str, Any] = {
        "dictionary": str(dictionary),
        "heldout_shards": shards,
        **reconstruction_metrics(sae, held_out, shards=shards),
    }
    if windows:
        subject = load(model or held_out.spec["model"]["name"], device=device, dtype=dtype)
        check_model(sae, subject, allow_other_model, dictionary)
        paths = corpus or [default_corpus_path(log=log)]
        context = int(held_out.spec["packing"]["context"])
        skip = int(held_out.spec.get("max_windows") or 0) if not corpus else 0
        result.update(
            downstream_metrics(
                sae, subject, Corpus.from_paths(paths), context=context, n_windows=windows, skip_windows=skip
            )
        )
    return result


# layer, that layer's MLP input [batch, seq, d], the codes of the layers already replaced -> the MLP output
Reconstruct = Callable[[int, Tensor, dict[int, Tensor]], Tensor]


@torch.no_grad()
def replaced_metrics(
    subject: Subject, reconstruct: Reconstruct, layers: list[int], windows: list[Window], batch_size: int = 4,
    sink_ratio: float = 20.0,
) -> dict[str, float]:  # fmt: skip
    """Next-token CE with the MLPs of `layers` all replaced at once by `reconstruct` (the replacement model:
    per-layer transcoders or a CLT, error terms dropped, each layer reading the replaced model's own MLP input)
    vs the clean model vs those MLPs zero-ablated, the KL from clean to replaced, and the share of positions
    whose top-1 next token the replaced model gets the same as the model (`top1_agreement`). Position 0 and
    attention sinks are left as they are and out of the figures, as the harvest leaves them out."""
    if not windows:
        raise AimriError("no held-out windows to evaluate the replacement on; use a larger corpus")
    totals = {"clean": 0.0, "replaced": 0.0, "zero": 0.0, "kl": 0.0, "agree": 0.0}
    count = 0
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        ids = torch.from_numpy(np.stack([w.ids for w in group]))
        att = torch.from_numpy(np.stack([w.attention for w in group])).long()
        reads = [f"mlp.in.{layer}" for layer in layers]
        clean = subject.run(ids, att, read=reads, stop=False)
        valid = keep_rows(clean, reads, torch.from_numpy(np.stack([w.valid for w in group])), sink_ratio, "evaluation")
        inputs: dict[int, Tensor] = {}
        codes: dict[int, Tensor] = {}

        def record(layer: int, inputs: dict[int, Tensor] = inputs):  # type: ignore[no-untyped-def]
            def fn(x: Tensor) -> Tensor:
                inputs[layer] = x
                return x

            return fn

        def replace_out(layer: int, inputs: dict[int, Tensor] = inputs, codes: dict[int, Tensor] = codes):  # type: ignore[no-untyped-def]
            def fn(y: Tensor) -> Tensor:
                return reconstruct(layer, inputs[layer].float(), codes).to(y)

            return fn

        edits = [e for layer in layers for e in (Edit(f"mlp.in.{layer}", record(layer)),
                                                  Edit(f"mlp.out.{layer}", replace_out(layer), positions=valid))]  # fmt: skip
        replaced = subject.run(ids, att, edit=edits, stop=False)["logits"].float()
        zeros = [Edit(f"mlp.out.{layer}", torch.zeros(()), positions=valid) for layer in layers]
        zero = subject.run(ids, att, edit=zeros, stop=False)["logits"].float()
        targets = ids[:, 1:].to(replaced.device)
        mask = ((att[:, 1:] > 0) & valid[:, :-1].cpu()).to(replaced.device)
        for name, logits in (("clean", clean["logits"].float()), ("replaced", replaced), ("zero", zero)):
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            totals[name] += float(ce[mask].sum())
        logp_clean = clean["logits"].float()[:, :-1].log_softmax(-1)
        logp_replaced = replaced[:, :-1].log_softmax(-1)
        totals["kl"] += float((logp_clean.exp() * (logp_clean - logp_replaced)).sum(-1)[mask].sum())
        same = logp_clean.argmax(-1) == logp_replaced.argmax(-1)
        totals["agree"] += float(same[mask].sum())
        count += int(mask.sum())
    ce = {k: v / max(count, 1) for k, v in totals.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"], "ce_replaced": ce["replaced"], "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["replaced"]) / gap if gap > 0 else math.nan, "kl_div": ce["kl"],
        "top1_agreement": ce["agree"], "tokens": count,
    }  # fmt: skip
