"""Labelled features as evidence for the checkup's findings: which features of the subject's default feature
set (aimri.features) separate each piece of evidence, each with its label, a few top examples and the
address of its card in the console.

  categories  per battery category, the features most specific to the model's own answers there (mean
              activation over answer tokens, minus the mean over the other categories' answers);
  diff        with a baseline, per category, the features that fire more on the candidate's answers than on
              the baseline's answers to the same prompts (one dictionary, the baseline's: one ruler for both);
  probes      per trait probe, the features whose per-answer activation correlates most with the probe's
              reading of the same answers (Pearson, over every battery answer);
  decision    the features carrying the loan decision at the decisive position: activation x (decoder .
              gradient of the logit difference), a first-order attribution (as circuit-tracer's feature
              nodes, here at one Site).

Position 0 and attention-sink tokens are left out of every mean, as in the harvest (SmolLM2 parks massive
activations there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimri.data.harvest import keep_rows
from aimri.diagnostics.decision import decision_inputs
from aimri.subject.core import Subject

TOP = 5  # features cited per piece of evidence
MIN_ANSWERS = 3  # a feature must fire on this many answers to be cited for a correlation


def console_link(atlas_name: str, feature: int) -> str:
    """The feature's card in the console (`mri serve` on the run directory, at its default address)."""
    return f"http://127.0.0.1:8765/#/feature/{atlas_name}/{feature}"


def _snippet(example: dict[str, Any], radius: int = 8) -> str:
    """The text around an example's peak token, the peak in [brackets]."""
    acts, tokens = example["acts"], example["tokens"]
    peak = max(range(len(acts)), key=acts.__getitem__) if acts else 0
    lo, hi = max(0, peak - radius), min(len(tokens), peak + 3)
    return ("".join(tokens[lo:peak]) + f"[{tokens[peak]}]" + "".join(tokens[peak + 1 : hi])).replace("\n", " ")


class Cited:
    """Looks up each cited feature's label and top examples in the atlas, once per feature."""

    def __init__(self, atlas_path: Path, name: str) -> None:
        from aimri.atlas.db import Atlas

        self.atlas, self.name = Atlas(atlas_path), name
        self._cards: dict[int, dict[str, Any]] = {}

    def row(self, feature: int, **values: float) -> dict[str, Any]:
        if feature not in self._cards:
            card = self.atlas.card(feature, n_top=3)
            labels = card.get("labels") or []
            self._cards[feature] = {
                "label": labels[-1]["label"] if labels else "(unlabelled)",
                "examples": [_snippet(e) for e in card["top_examples"][:3]],
            }
        return {"feature": feature, **{k: round(v, 4) for k, v in values.items()}, **self._cards[feature],
                "link": console_link(self.name, feature)}  # fmt: skip


@torch.no_grad()
def answer_codes(subject: Subject, dictionary: Any, rows: list[list[Any]], sink_ratio: float = 20.0) -> Tensor:
    """[answers, d_sae]: each answer's mean code over its own tokens, the conversation teacher-forced
    (`rows`: a behaviour stage's [prompt ids, completion ids] per answer); sinks left out."""
    site = subject.site(dictionary.cfg.site).name
    out = torch.zeros(len(rows), dictionary.d_sae)
    for i, (prompt, completion) in enumerate(rows):
        if not completion:
            continue
        ids = torch.tensor([list(prompt) + list(completion)])
        acts = subject.run(ids, read=[site])
        valid = torch.zeros(ids.shape, dtype=torch.bool)
        valid[0, len(prompt) :] = True
        valid = keep_rows(acts, [site], valid, sink_ratio, "the answers' features")
        x = acts[site][valid].to(dictionary.W_enc)
        if len(x):
            out[i] = dictionary.encode(x).float().mean(0)
    return out


def decision_gradient(
    subject: Subject, site: str, options: tuple[str, str] = ("Approve", "Deny")
) -> tuple[Tensor, Tensor]:
    """(x, g), both [d_model] fp32: the loan prompt's activation at `site` at the decisive (last) position, and
    the gradient of logit[options[0]] - logit[options[1]] there with respect to it."""
    ids, a, b = decision_inputs(subject, options=options)
    model: Any = subject.model
    with torch.enable_grad(), subject.tap(read=[site], grad=True) as t:
        logits = model(ids, use_cache=False).logits[0, -1]
        x = t.acts[site]
        (grad,) = torch.autograd.grad(logits[a] - logits[b], x)
    return x[0, -1].detach().float(), grad[0, -1].float()


def decision_features(
    subject: Subject, dictionary: Any, cited: Cited, options: tuple[str, str] = ("Approve", "Deny")
) -> list[dict[str, Any]]:
    """The features at the dictionary's Site and the decisive (last) position whose activation x (decoder .
    gradient of the logit difference) is largest in size: positive pushes options[0]."""
    x, grad = decision_gradient(subject, subject.site(dictionary.cfg.site).name, options)
    with torch.no_grad():
        codes = dictionary.encode(x.to(dictionary.W_enc)[None])[0].float()
        effect = codes * (dictionary.W_dec.float() @ grad.to(dictionary.W_dec.device))
    order = effect.abs().argsort(descending=True)[:TOP]
    return [cited.row(int(i), activation=float(codes[i]), effect=float(effect[i])) for i in order if codes[i] > 0]


def _specific(means: dict[str, Tensor], cited: Cited) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for cat, m in means.items():
        others = (
            torch.stack([v for c, v in means.items() if c != cat]).mean(0) if len(means) > 1 else torch.zeros_like(m)
        )
        lift = m - others
        order = lift.argsort(descending=True)[:TOP]
        out[cat] = [
            cited.row(int(i), mean=float(m[i]), others=float(others[i]), lift=float(lift[i]))
            for i in order
            if lift[i] > 0
        ]
    return out


def _correlated(codes: Tensor, scores: Tensor, cited: Cited) -> list[dict[str, Any]]:
    firing = (codes > 0).sum(0) >= MIN_ANSWERS
    c = codes - codes.mean(0)
    s = scores - scores.mean()
    corr = (c * s[:, None]).sum(0) / (c.norm(dim=0) * s.norm()).clamp_min(1e-12)
    corr = torch.where(firing, corr, torch.zeros_like(corr))
    order = corr.argsort(descending=True)[:TOP]
    return [cited.row(int(i), correlation=float(corr[i])) for i in order if corr[i] > 0]


def feature_evidence(
    subject: Subject,
    dictionary_path: Path,
    behaviour: dict[str, Any],
    baseline: Subject | None = None,
    base_behaviour: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkup's `features` stage (see the module docstring). `dictionary_path` is a feature set's
    dictionary folder with its labelled atlas.sqlite; it must be the baseline's when there is one (else the
    subject's): raises AimriError otherwise (aimri.dictionaries.match.check_model)."""
    from aimri.dictionaries import load_dictionary
    from aimri.dictionaries.match import check_model
    from aimri.run import Run

    sae = load_dictionary(dictionary_path).to(subject.device)  # encodes where the model's rows are
    owner = baseline or subject
    check_model(sae, owner, source=f"the feature set {dictionary_path}")
    cited = Cited(Run.atlas_of(dictionary_path), dictionary_path.name)
    codes = {c: answer_codes(subject, sae, v["ids"]) for c, v in behaviour.items()}
    out: dict[str, Any] = {
        "dictionary": dictionary_path.name, "site": sae.cfg.site, "d_sae": sae.d_sae,
        "categories": _specific({c: v.mean(0) for c, v in codes.items()}, cited),
    }  # fmt: skip
    every = torch.cat(list(codes.values()))
    out["probes"] = {}
    for trait in next(iter(behaviour.values()))["probe_scores"]:
        scores = torch.tensor([s for v in behaviour.values() for s in v["probe_scores"][trait]])
        out["probes"][trait] = _correlated(every, scores, cited)
    out["decision"] = decision_features(subject, sae, cited)
    if baseline is not None and base_behaviour is not None:
        out["diff"] = {}
        for cat, v in base_behaviour.items():
            base = answer_codes(baseline, sae, v["ids"]).mean(0)
            shift = codes[cat].mean(0) - base
            order = shift.argsort(descending=True)[:TOP]
            out["diff"][cat] = [cited.row(int(i), candidate=float(codes[cat].mean(0)[i]), baseline=float(base[i]),
                                          shift=float(shift[i])) for i in order if shift[i] > 0]  # fmt: skip
    return out


def attach(findings: list[Any], evidence: dict[str, Any]) -> None:
    """Add each finding's features as a `features` evidence entry: behaviour and diff findings get their
    category's, probe findings their trait's."""
    by_id: dict[str, list[dict[str, Any]]] = {
        "behaviour.sycophancy": evidence["categories"].get("opinion", []),
        "behaviour.harmful": evidence["categories"].get("harmful", []),
    }
    for trait, rows in evidence["probes"].items():
        by_id[f"probe.{trait}"] = by_id[f"probe.shift.{trait}"] = rows
    for cat, rows in evidence.get("diff", {}).items():
        by_id[f"diff.behaviour.{cat}"] = rows
    for f in findings:
        if rows := by_id.get(f.id):
            f.evidence.append({"kind": "features", "dictionary": evidence["dictionary"], "rows": rows})
