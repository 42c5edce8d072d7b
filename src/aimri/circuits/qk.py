"""Attention in attribution graphs: why a head attends (QK attribution) and which heads carry an edge.

In the local replacement model (aimri.circuits.replacement) every quantity is linear in the graph's nodes: the
norms' denominators and the attention patterns are frozen, the MLPs are transcoders whose feature activations,
error terms and decoder biases are leaves, and the token embeddings are leaves. So:

- **QK attribution** (`qk_attribution`): head h's query at position q and key at position k are sums over nodes,
  q = sum_i q_i, k = sum_j k_j, with q_i = value_i x dq/dvalue_i (one backward pass per query / key component,
  B at a time), and the pre-softmax score s = scaling x q.k splits into pair terms scaling x q_i.k_j. Nodes at
  the held (constant) positions and the decoder biases are one "constant" node per side; `unexplained` is what
  the nodes do not account for (the attention projections' own biases, where a model has them: exactly zero
  for Llama-style models).
- **Head loadings of an edge** (`edge_heads`): an edge s -> t whose source and target sit at different
  positions passes through attention. Its weight splits exactly into the residual path (no attention hop) and,
  per head (layer m, head h), the paths whose last hop into t's position is that head: value_s x d(u_mh .
  z_mh[q])/d value_s, where z_mh[q] is the head's output at t's position q and u_mh the gradient of t's input
  at z_mh[q] along the residual (every attention value detached). The parts sum to the edge weight; the
  residual part is zero for an edge between positions (its check: nothing crosses positions but attention).

Method: QK attributions as in Kamath et al. 2025, "Tracing Attention Computation Through Attention
Superposition" (transformer-circuits.pub), asked of circuit-tracer in its issue #53.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aimri.circuits.attribution import fitting_copies, target_quantity
from aimri.circuits.replacement import Replaced, ReplacementModel
from aimri.errors import AimriError


def _scaling(module: Any, given: Any, head_dim: int) -> float:
    """The factor the kernel multiplies q.k by: the kernel's `scaling` argument, the module's, or GPT-2's rule."""
    if given is not None:
        return float(given)
    if getattr(module, "scaling", None) is not None:
        return float(module.scaling)
    scale = head_dim**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


@dataclass
class QKAttribution:
    """Why head `head` of `layer` attends from `query_pos` to `key_pos`.

    `nodes` label the rows of `query` [n, head_dim] and `key` [n, head_dim] (each node's contribution to the
    query / key vector; "constant" = held positions and decoder biases); `score` is the pre-softmax score
    (scaling x q.k, the model's own q and k), `pairs` the largest pair terms (query node, key node, value),
    which with every other pair add up to `score` - `unexplained`."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float
    scaling: float
    nodes: list[str]
    query: Tensor
    key: Tensor
    unexplained: float
    pairs: list[tuple[str, str, float]] = field(default_factory=list)

    def pair_matrix(self) -> Tensor:
        """[n, n] (float64): scaling x query_i . key_j for every pair of nodes."""
        return self.scaling * self.query.double() @ self.key.double().T

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "head": self.head, "query_pos": self.query_pos, "key_pos": self.key_pos,
            "score": self.score, "unexplained": self.unexplained,
            "pairs": [{"query": q, "key": k, "value": v} for q, k, v in self.pairs],
        }  # fmt: skip


def _leaf_values(run: Replaced, model: ReplacementModel) -> tuple[list[Tensor], list[tuple[str, Any]]]:
    """The leaves of a run and, per leaf, its kind and layer."""
    L = model.subject.n_layers
    leaves: list[Tensor] = [run.embeddings]
    plan: list[tuple[str, Any]] = [("embed", None)]
    for layer in range(L):
        leaves.append(run.codes[layer])
        plan.append(("codes", layer))
    for layer in range(L):
        leaves.append(run.errors[layer])
        plan.append(("error", layer))
    for layer, bias in sorted(run.kept.get("biases", {}).items()):
        leaves.append(bias)
        plan.append(("bias", layer))
    return leaves, plan


class _Contributions:
    """Per-node contributions of a batch of scalar targets from one retained forward (B copies)."""

    def __init__(self, model: ReplacementModel, run: Replaced, constant_positions: int) -> None:
        self.model, self.run, self.cp = model, run, constant_positions
        self.leaves, self.plan = _leaf_values(run, model)
        seq = run.embeddings.shape[-2]
        labels = [f"emb@{p}" for p in range(seq)]
        self.slices: list[tuple[int, int]] = []
        start = len(labels)
        for kind, layer in self.plan[1:]:
            if kind == "codes":
                pos, idx = run.active[layer]
                labels += [f"{layer}/{int(i)}@{int(p)}" for p, i in zip(pos.tolist(), idx.tolist(), strict=True)]
                n = len(pos)
            elif kind == "error":
                labels += [f"err{layer}@{p}" for p in range(seq)]
                n = seq
            else:
                labels.append(f"bias{layer}")
                n = 1
            self.slices.append((start, start + n))
            start += n
        self.labels = labels
        # constant: held positions and decoder biases
        constant = torch.zeros(len(labels), dtype=torch.bool)
        constant[:constant_positions] = True
        for (kind, layer), (a, b) in zip(self.plan[1:], self.slices, strict=True):
            if kind == "codes":
                constant[a:b] = run.active[layer][0].cpu() < constant_positions
            elif kind == "error":
                constant[a : a + constant_positions] = True
            else:
                constant[a:b] = True
        self.constant = constant

    def rows(self, quantities: list[Tensor]) -> Tensor:
        """[len(quantities), n_nodes]: each node's value x gradient of each quantity (quantity b on copy b)."""
        B = len(quantities)
        grads = torch.autograd.grad(torch.stack(quantities).sum(), self.leaves, allow_unused=True, retain_graph=True)
        parts = []
        for leaf, grad, (kind, _layer) in zip(self.leaves, grads, self.plan, strict=True):
            value = leaf.detach().float()[:B]
            if grad is None:
                width = value.shape[1] if kind == "codes" else (1 if kind == "bias" else value.shape[-2])
                parts.append(torch.zeros(B, width))
                continue
            g = grad.detach().float()[:B]
            if kind == "codes":
                parts.append((g * value).cpu())
            else:  # embeddings and errors [B, seq, d] -> [B, seq]; a bias [B, 1, d] -> [B, 1]
                parts.append((g * value).sum(-1).cpu())
        return torch.cat(parts, 1)


def _check_ids(model: ReplacementModel, ids: list[int], *positions: int) -> None:
    if not ids:
        raise AimriError("the prompt is empty")
    for p in positions:
        if not 0 <= p < len(ids):
            raise AimriError(f"position {p} is outside the {len(ids)}-token prompt (0..{len(ids) - 1})")


def qk_attribution(
    model: ReplacementModel, ids: list[int], layer: int, head: int, query_pos: int, key_pos: int,
    batch_size: int = 32, constant_positions: int = 1, top: int = 12,
) -> QKAttribution:  # fmt: skip
    """The QK attribution of one head's score from `query_pos` to `key_pos` (see the module docstring).

    Raises AimriError for a layer, head or position out of range, or a key after the query (causal attention
    never reads it)."""
    subject = model.subject
    _check_ids(model, ids, query_pos, key_pos)
    if not 0 <= layer < subject.n_layers:
        raise AimriError(f"layer {layer} is outside {subject.name}'s 0..{subject.n_layers - 1}")
    if key_pos > query_pos:
        raise AimriError(f"key position {key_pos} is after query position {query_pos}: causal attention never reads it")
    n_heads, head_dim = _heads_of(model)
    if not 0 <= head < n_heads:
        raise AimriError(f"head {head} is outside layer {layer}'s 0..{n_heads - 1}")
    copies = fitting_copies(model.subject, len(ids), min(batch_size, 2 * head_dim)).units
    run = model.run(torch.tensor(ids), copies=copies, last_only=True, options={"capture": layer, "bias_leaves": True})
    if "qk" not in run.kept:
        raise AimriError(f"layer {layer}'s attention module records no layer index; QK attribution cannot find it")
    query, key, given, module = run.kept["qk"]
    kv_head = head // (query.shape[1] // key.shape[1])  # grouped-query attention: the head's key/value group
    scaling = _scaling(module, given, head_dim)
    contrib = _Contributions(model, run, constant_positions)
    targets = [("q", j) for j in range(head_dim)] + [("k", j) for j in range(head_dim)]
    rows = []
    for start in range(0, len(targets), copies):
        chunk = targets[start : start + copies]
        quantities = [
            query[b, head, query_pos, j] if side == "q" else key[b, kv_head, key_pos, j]
            for b, (side, j) in enumerate(chunk)
        ]
        rows.append(contrib.rows(quantities))
    table = torch.cat(rows)  # [2 head_dim, n_nodes]
    q_nodes, k_nodes = table[:head_dim].T, table[head_dim:].T  # [n_nodes, head_dim]
    q_true = query[0, head, query_pos].detach().float().cpu()
    k_true = key[0, kv_head, key_pos].detach().float().cpu()
    score = scaling * float(q_true @ k_true)
    keep = ~contrib.constant
    labels = [lab for lab, k in zip(contrib.labels, keep.tolist(), strict=True) if k] + ["constant"]
    Q = torch.cat([q_nodes[keep], q_nodes[~keep].sum(0, keepdim=True)])
    K = torch.cat([k_nodes[keep], k_nodes[~keep].sum(0, keepdim=True)])
    live_q = (Q.abs().sum(1) > 0).nonzero().flatten()
    live_k = (K.abs().sum(1) > 0).nonzero().flatten()
    live = sorted(set(live_q.tolist()) | set(live_k.tolist()))
    Q, K, labels = Q[live], K[live], [labels[i] for i in live]
    explained = scaling * float(Q.double().sum(0) @ K.double().sum(0))
    result = QKAttribution(layer, head, query_pos, key_pos, score, scaling, labels, Q, K, score - explained)
    pairs = result.pair_matrix()
    order = pairs.abs().flatten().argsort(descending=True)[:top]
    n = len(labels)
    result.pairs = [(labels[int(i) // n], labels[int(i) % n], float(pairs.flatten()[i])) for i in order]
    return result


@dataclass
class HeadLoadings:
    """How an edge's weight splits over attention heads: `heads` [(layer, head, weight)] largest first, the
    residual-only part, and `total` (their sum; equal to the graph's edge weight)."""

    source: str
    target: str
    total: float
    residual: float
    heads: list[tuple[int, int, float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "total": self.total, "residual": self.residual,
            "heads": [{"layer": m, "head": h, "weight": w} for m, h, w in self.heads],
        }  # fmt: skip


def _source_value(run: Replaced, source: tuple[int, int, int]) -> tuple[Tensor, int]:
    """(the codes leaf of the source's layer, the source's column in it)."""
    layer, pos, idx = source
    p, i = run.active[layer]
    hit = ((p == pos) & (i == idx)).nonzero().flatten()
    if not len(hit):
        raise AimriError(f"feature {layer}/{idx} is not active at position {pos} in this prompt")
    return run.codes[layer], int(hit[0])


def edge_heads(
    model: ReplacementModel, ids: list[int], source: tuple[int, int, int], target: tuple[int, int, int] | int,
    batch_size: int = 32, top: int = 8, runs: dict[str, Replaced] | None = None,
) -> HeadLoadings:  # fmt: skip
    """The head loadings of the edge from feature `source` (layer, pos, index) to `target` (a feature, or a logit
    token id at the last position); see the module docstring. `runs`: a dict the caller keeps across the edges of
    one prompt, so its two forward passes (values frozen; B copies) are run once and reused.

    Raises AimriError when the edge cannot pass through attention (both at one position: "it does not pass
    through attention"), runs backwards (a source after its target), or names an inactive feature."""
    subject = model.subject
    s_layer, s_pos, _ = source
    t_pos = len(ids) - 1 if isinstance(target, int) else target[1]
    t_layer = subject.n_layers if isinstance(target, int) else target[0]
    _check_ids(model, ids, s_pos, t_pos)
    if s_pos == t_pos:
        raise AimriError(
            f"the edge {source} -> {target} stays at position {s_pos}: it does not pass through attention "
            "(only edges between positions have head loadings)"
        )
    if s_pos > t_pos or s_layer >= t_layer:
        raise AimriError(f"no edge runs from {source} to {target}: a source must precede its target")
    ids_t = torch.tensor(ids)
    runs = {} if runs is None else runs
    # (a) u_m: the gradient of t's input at each layer's head outputs along the residual (values detached)
    if "direct" not in runs:
        runs["direct"] = model.run(ids_t, last_only=True, options={"freeze_values": True, "capture_heads": True})
    direct = runs["direct"]
    # heads after the source's first write (its layer's MLP) and up to the target's layer (whose attention comes
    # before its MLP); a logit reads every layer
    layers = list(range(s_layer + 1, min(t_layer, subject.n_layers - 1) + 1))
    leaf, column = _source_value(direct, source)
    layer_t = target if isinstance(target, int) else target[0]
    encoders = {} if isinstance(target, int) else {layer_t: model.encoder(layer_t).detach()}
    quantity = target_quantity(direct, encoders, target, 0)
    heads = [direct.kept["heads"][m] for m in layers]
    grads = torch.autograd.grad(quantity, [leaf, *heads], allow_unused=True, retain_graph=True)
    value = float(leaf.detach()[column])
    residual = 0.0 if grads[0] is None else float(grads[0][column]) * value
    u = {m: (g[0, t_pos].detach() if g is not None else None) for m, g in zip(layers, grads[1:], strict=True)}
    # (b) for each (layer, head): d(u_mh . z_mh[q]) / d source, B heads per backward pass
    n_heads, head_dim = _heads_of(model)
    pairs = [(m, h) for m in layers if u[m] is not None for h in range(n_heads)]
    loadings: list[tuple[int, int, float]] = []
    if pairs and "heads" not in runs:
        copies = fitting_copies(model.subject, len(ids), min(batch_size, len(pairs))).units
        runs["heads"] = model.run(ids_t, copies=copies, last_only=True, options={"capture_heads": True})
    run = runs.get("heads")
    copies = run.embeddings.shape[0] if run is not None else 1
    leaf_b = _source_value(run, source)[0] if run is not None else None
    for start in range(0, len(pairs), copies):
        chunk = pairs[start : start + copies]
        assert run is not None and leaf_b is not None
        quantities = []
        for b, (m, h) in enumerate(chunk):
            z = run.kept["heads"][m][b, t_pos, h * head_dim : (h + 1) * head_dim]
            quantities.append(z.float() @ u[m][h * head_dim : (h + 1) * head_dim].float())  # type: ignore[index]
        (g,) = torch.autograd.grad(torch.stack(quantities).sum(), [leaf_b], allow_unused=True, retain_graph=True)
        for b, (m, h) in enumerate(chunk):
            loadings.append((m, h, 0.0 if g is None else float(g[b, column]) * value))
    total = residual + sum(w for _, _, w in loadings)
    loadings.sort(key=lambda t: -abs(t[2]))
    name = f"{s_layer}/{source[2]}@{s_pos}"
    tname = f"logit {target}" if isinstance(target, int) else f"{target[0]}/{target[2]}@{target[1]}"
    return HeadLoadings(name, tname, total, residual, [x for x in loadings[:top] if x[2] != 0.0])


def _heads_of(model: ReplacementModel) -> tuple[int, int]:
    """(attention heads, head dimension) from the model's config (GPT-2 names them n_head, n_embd)."""
    config = model.subject.config
    n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    return n_heads, int(getattr(config, "head_dim", None) or model.subject.d_model // n_heads)


def attention_edges(
    model: ReplacementModel, graph: Any, pruned: Any, n: int, batch_size: int = 32, constant_positions: int = 1
) -> list[dict[str, Any]]:  # fmt: skip
    """For the `n` strongest edges of the pruned graph that cross positions (feature -> feature or logit): their
    head loadings and the QK attribution of their top head (query at the target's position, key at the
    source's), as JSON records keyed by the graph JSON's node ids ("source", "target"; "source_label" and
    "target_label" name them as layer/feature@position or the logit's token)."""
    from aimri.circuits.export import node_record

    if graph.n_features == 0 or n < 1:
        return []
    t, s, w = graph.edge_targets, graph.edge_sources, graph.edge_weights
    kept = pruned.edge_mask & (s < graph.n_features)
    is_logit = t >= graph.logit_start
    kept &= (t < graph.n_features) | is_logit
    src_pos = graph.features[s.clamp(max=max(graph.n_features - 1, 0)), 1]
    tgt_pos = torch.where(is_logit, graph.n_pos - 1, graph.features[t.clamp(max=max(graph.n_features - 1, 0)), 1])
    kept &= src_pos != tgt_pos
    order = kept.nonzero().flatten()
    order = order[w[order].abs().argsort(descending=True)][:n]
    records = []
    seen: dict[tuple[int, int, int, int], dict[str, Any]] = {}  # one QK attribution per (layer, head, q, k)
    runs: dict[str, Replaced] = {}  # edge_heads' forward passes, shared by every edge of this prompt
    for e in order.tolist():
        source = tuple(int(v) for v in graph.features[int(s[e])])
        target_node = int(t[e])
        if target_node >= graph.logit_start:
            target: tuple[int, int, int] | int = graph.logit_tokens[target_node - graph.logit_start]
        else:
            target = tuple(int(v) for v in graph.features[target_node])  # type: ignore[assignment]
        loadings = edge_heads(model, graph.tokens, source, target, batch_size=batch_size, runs=runs)  # type: ignore[arg-type]
        named = loadings.to_dict()
        label = (
            graph.logit_token_strings[target_node - graph.logit_start] if isinstance(target, int) else named["target"]
        )
        record: dict[str, Any] = {
            **named, "source_label": named["source"], "target_label": label, "weight": float(w[e]),
            "source": node_record(graph, int(s[e]), 0.0)["node_id"], "target": node_record(graph, target_node, 0.0)["node_id"],
        }  # fmt: skip
        if loadings.heads:
            layer, head, _ = loadings.heads[0]
            q_pos = graph.n_pos - 1 if isinstance(target, int) else target[1]
            key = (layer, head, q_pos, source[1])
            if key not in seen:
                qk = qk_attribution(model, graph.tokens, layer, head, q_pos, source[1], batch_size, constant_positions)
                seen[key] = qk.to_dict()
            record["qk"] = seen[key]
        records.append(record)
    return records
