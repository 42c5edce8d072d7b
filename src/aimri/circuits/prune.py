"""Pruning an attribution graph by influence, its replacement and completeness scores, and supernodes.

The graph here is circuit-tracer's: the expanded features (those whose incoming edges were computed),
error nodes, token embeddings and logits; edges from active features that were never expanded are left
out of every normalisation, so scores are comparable with circuit-tracer's for the same feature budget.
Influence: the logit probabilities propagated back through |weights| normalised per target (see
`attribution.influence`). Node pruning keeps the fewest features and error nodes that carry
`node_threshold` of the total influence (tokens and logits always stay); edge pruning keeps, among kept
nodes, the fewest edges carrying `edge_threshold` of the edge scores (normalised weight x influence of
its target). Scores, for the full or the pruned graph:
  - replacement: of the influence that reaches the graph's inputs, the share that reaches token embeddings
    rather than error nodes (mass flowing into dropped nodes counts as error);
  - completeness: the influence-weighted share of each kept node's incoming weight that comes from
    non-error nodes kept in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from aimri.circuits.attribution import Graph, influence, normalised
from aimri.errors import AimriError


@dataclass
class Pruned:
    node_mask: Tensor  # bool [n_nodes]
    edge_mask: Tensor  # bool [n_edges]
    influence: Tensor  # [n_nodes]
    replacement: float
    completeness: float
    replacement_full: float
    completeness_full: float


def _logit_weights(graph: Graph) -> Tensor:
    w = torch.tensor(graph.logit_probs)
    return w / w.sum()


def _in_graph(graph: Graph) -> Tensor:
    """Edges whose source is a node of the graph: anything but a feature that was never expanded."""
    source_kept = graph.expanded.clone()
    source_kept[graph.n_features :] = True
    return source_kept[graph.edge_sources]


def _normalised(graph: Graph) -> Tensor:
    weights = torch.where(_in_graph(graph), graph.edge_weights, 0.0)
    return normalised(graph.edge_targets, weights, graph.n_nodes)


def scores(graph: Graph, node_mask: Tensor | None = None, edge_mask: Tensor | None = None) -> tuple[float, float]:
    """(replacement, completeness) of the graph restricted to the masks (None: the full graph)."""
    n = graph.n_nodes
    node_mask = torch.ones(n, dtype=torch.bool) if node_mask is None else node_mask
    edge_mask = torch.ones(len(graph.edge_weights), dtype=torch.bool) if edge_mask is None else edge_mask
    norm = _normalised(graph)
    t, s = graph.edge_targets, graph.edge_sources
    kept = edge_mask & node_mask[t] & node_mask[s] & _in_graph(graph)
    is_error = torch.zeros(n, dtype=torch.bool)
    is_error[graph.error_start : graph.embed_start] = True
    is_embed = torch.zeros(n, dtype=torch.bool)
    is_embed[graph.embed_start : graph.logit_start] = True
    current = torch.zeros(n)
    current[graph.logit_start :] = _logit_weights(graph)
    token_mass = error_mass = 0.0
    weight_total = torch.zeros(n)
    for _ in range(4 * graph.n_layers + 8):
        weight_total += current
        through = current[t] * norm
        arrived = torch.zeros(n).index_add_(0, s[kept], through[kept])
        lost = float(through[~kept].sum())
        # mass at a node without computed incoming edges cannot be explained (none: such features are outside)
        stuck = current * (~graph.expanded & ~is_error & ~is_embed).float()
        error_mass += lost + float(stuck.sum())
        token_mass += float(arrived[is_embed].sum())
        error_mass += float(arrived[is_error].sum())
        current = arrived * (~is_error & ~is_embed).float()
        if float(current.sum()) < 1e-12:
            break
    replacement = token_mass / max(token_mass + error_mass, 1e-30)
    good = kept & ~is_error[s]
    share = torch.zeros(n).index_add_(0, t[good], norm[good])
    targets = node_mask & graph.expanded
    completeness = float((weight_total * share)[targets].sum() / weight_total[targets].sum().clamp_min(1e-30))
    return replacement, completeness


def _cover(values: Tensor, threshold: float) -> Tensor:
    """Mask of the fewest entries whose sum reaches `threshold` of the total."""
    order = values.argsort(descending=True)
    cumulative = values[order].cumsum(0) / values.sum().clamp_min(1e-30)
    keep_n = int((cumulative < threshold).sum()) + 1
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[order[: min(keep_n, len(values))]] = True
    return mask


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            raise AimriError(f"{name} must be in (0, 1], got {value}")
    inside_graph = _in_graph(graph)
    weights = torch.where(inside_graph, graph.edge_weights, 0.0)
    inf = influence(graph, graph.edge_targets, graph.edge_sources, weights, _logit_weights(graph))
    n = graph.n_nodes
    node_mask = torch.zeros(n, dtype=torch.bool)
    node_mask[graph.embed_start :] = True  # tokens and logits always stay
    candidates = torch.cat([graph.expanded[: graph.n_features].nonzero().flatten(),
                            torch.arange(graph.error_start, graph.embed_start)])  # fmt: skip
    if len(candidates):
        node_mask[candidates[_cover(inf[candidates], node_threshold)]] = True
    node_inf = inf.clone()
    node_inf[graph.logit_start :] = _logit_weights(graph)
    edge_score = _normalised(graph) * node_inf[graph.edge_targets]
    inside = node_mask[graph.edge_targets] & node_mask[graph.edge_sources] & inside_graph
    edge_mask = torch.zeros(len(edge_score), dtype=torch.bool)
    idx = inside.nonzero().flatten()
    if len(idx):
        edge_mask[idx[_cover(edge_score[idx], edge_threshold)]] = True
    replacement_full, completeness_full = scores(graph)
    replacement, completeness = scores(graph, node_mask, edge_mask)
    return Pruned(node_mask, edge_mask, inf, replacement, completeness, replacement_full, completeness_full)


def supernodes(
    graph: Graph, node_mask: Tensor, decoders: dict[int, Tensor], labels: dict[int, str] | None = None,
    cosine: float = 0.6,
) -> list[list[int]]:  # fmt: skip
    """Groups of kept feature nodes that mean the same thing: the same non-empty label, or decoder rows
    (all in the residual space) with cosine above `cosine`. Union-find over pairs; groups of one are left out."""
    kept = [i for i in node_mask[: graph.n_features].nonzero().flatten().tolist()]
    if not kept:
        return []
    parent = {i: i for i in kept}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows = torch.stack([decoders[int(graph.features[i, 0])][int(graph.features[i, 2])] for i in kept]).float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = rows @ rows.T
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            la = (labels or {}).get(kept[a], "")
            same_label = bool(la) and la == (labels or {}).get(kept[b], "")
            if same_label or float(sim[a, b]) > cosine:
                parent[find(kept[a])] = find(kept[b])
    groups: dict[int, list[int]] = {}
    for i in kept:
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=len, reverse=True)
