"""One decision explained: for a prompt whose answer is one of two words (approve / deny on a loan-style
application, the seed's mortgage case), which prompt tokens and which layers' attention and MLP outputs
pushed the answer, and (when per-layer transcoders exist) which features, through an attribution graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aimri.errors import AimriError
from aimri.steering.generate import prompt_ids
from aimri.subject.core import Subject

LOAN_PROMPT = (
    "You are a bank's loan officer. Application: Maria, 34, nurse, income $52,000 a year, existing debt $31,000, "
    "credit score 610, two late payments last year, asks for a $250,000 mortgage. Decide. Reply with one word: "
    "Approve or Deny."
)
ANSWER_PREFIX = "Decision:"  # prefilled answer start, so the next token is the decision word


def _first_token(subject: Subject, word: str) -> int:
    ids = subject.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AimriError(f"{word!r} encodes to no tokens")
    return int(ids[0])


def decision_inputs(
    subject: Subject, prompt: str = LOAN_PROMPT, options: tuple[str, str] = ("Approve", "Deny")
) -> tuple[torch.Tensor, int, int]:
    """(ids [1, seq] on the model's device, a, b): the prompt as the model's chat opens it with the answer prefix
    prefilled, so the next token is the decision; a and b are the options' first tokens (after a space)."""
    prefix = subject.tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids(subject, prompt) + list(prefix)], device=subject.device)
    a, b = (_first_token(subject, " " + w) for w in options)
    return ids, a, b


def explain_decision(
    subject: Subject,
    prompt: str = LOAN_PROMPT,
    options: tuple[str, str] = ("Approve", "Deny"),
    transcoders: Path | None = None,
    max_feature_nodes: int = 256,
) -> dict[str, Any]:
    """Logit difference between the two options' first tokens at the answer position, attributed to prompt
    tokens (gradient × embedding, which sums to the first-order change) and to each layer's attention and
    MLP output (direct effect through the final norm, frozen at this prompt)."""
    ids, a, b = decision_inputs(subject, prompt, options)
    model: Any = subject.model
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    sites = [f"{k}.{layer}" for layer in range(subject.n_layers) for k in ("attn.out", "mlp.out")]
    neurons = [f"mlp.neurons.{layer}" for layer in range(subject.n_layers)]
    with subject.tap(read=[*sites, *neurons, f"resid.{subject.n_layers - 1}"], grad=True) as t:
        out = model(inputs_embeds=embeds, use_cache=False)
    logits = out.logits[0, -1]
    diff = logits[a] - logits[b]
    diff.backward()
    assert embeds.grad is not None
    token_attr = (embeds.grad[0] * embeds[0]).sum(-1).detach()
    tokens = [subject.tokenizer.decode([i]) for i in ids[0].tolist()]
    # direct effects: each component's output at the last position through the final norm's scale, frozen
    final = t.acts[f"resid.{subject.n_layers - 1}"][0, -1].detach()
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        norm = model.model.norm if hasattr(model, "model") else None
        rms = final.pow(2).mean().add(getattr(norm, "variance_epsilon", 1e-6)).sqrt() if norm is not None else 1.0
        gain = norm.weight if norm is not None and hasattr(norm, "weight") else torch.ones_like(final)
        direction = (w[a] - w[b]) * gain / rms
        components = []
        for site in sites:
            v = t.acts[site][0, -1].detach()
            components.append({"site": site, "effect": float(v @ direction)})
        # what the layers did not add is the token embedding (scaled, for models that scale it)
        rest = final - sum(t.acts[site][0, -1].detach() for site in sites)
        components.append({"site": "embedding", "effect": float(rest @ direction)})
        units = []  # MLP neurons (the identity dictionary): activation × its output weights' effect on the decision
        for layer, site in enumerate(neurons):
            down = getattr(getattr(subject.layer(layer), "mlp", None), "down_proj", None)
            if down is None:
                continue
            effect = t.acts[site][0, -1].detach() * (direction @ down.weight)
            for i in effect.abs().topk(3).indices.tolist():
                units.append({"feature": f"mlp.neurons.{layer}#{i}", "effect": float(effect[i])})
    probs = logits.detach().float().softmax(-1)
    result: dict[str, Any] = {
        "prompt": prompt, "options": list(options),
        "decision": options[0] if float(diff.detach()) > 0 else options[1], "logit_diff": float(diff.detach()),
        "p_options": [float(probs[a]), float(probs[b])],
        "tokens": [{"token": s, "attribution": float(x)} for s, x in zip(tokens, token_attr.tolist(), strict=True)],
        "components": sorted(components, key=lambda c: -abs(c["effect"]))[:12],
        "components_all": components,
        "neurons": sorted(units, key=lambda u: -abs(u["effect"]))[:12],
    }  # fmt: skip
    if transcoders is not None:
        result["features"] = _feature_path(subject, ids[0].tolist(), a, b, transcoders, max_feature_nodes)
    return result


def _feature_path(
    subject: Subject, ids: list[int], a: int, b: int, folder: Path, max_feature_nodes: int
) -> list[dict[str, Any]]:
    """The transcoder features with the largest direct effect on the two options' logits, from the
    attribution graph (circuits): the feature-level path behind the decision. The prompt is opened as the
    transcoders' training windows were (their recorded BOS); positions are reported in `ids`."""
    from aimri.circuits.attribution import attribute
    from aimri.circuits.replacement import ReplacementModel, load_transcoders
    from aimri.dictionaries.match import open_ids, opening

    model = ReplacementModel(subject, load_transcoders(folder, subject))
    opened = open_ids(ids, opening(model.configs(), subject.tokenizer))
    shift = len(opened) - len(ids)
    graph = attribute(
        model, opened, max_feature_nodes=max_feature_nodes, progress=False, constant_positions=max(1, shift)
    )
    logit_ids = list(graph.logit_tokens)
    rows = []
    for option, token in (("a", a), ("b", b)):
        if token not in logit_ids:
            continue
        node = graph.logit_start + logit_ids.index(token)
        sel = (graph.edge_targets == node) & (graph.edge_sources < graph.n_features)
        for src, wgt in zip(graph.edge_sources[sel].tolist(), graph.edge_weights[sel].tolist(), strict=True):
            layer, pos, idx = graph.features[src].tolist()
            rows.append({"option": option, "layer": layer, "position": pos - shift, "feature": idx, "weight": wgt})
    return sorted(rows, key=lambda r: -abs(r["weight"]))[:15]
