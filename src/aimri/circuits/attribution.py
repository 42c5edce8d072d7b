"""Attribution graphs: the direct linear effect of every node on every other, in the local replacement model.

Nodes, in this order: active transcoder features (layer, position, index), error nodes (one per layer and
position), token embeddings (one per position), and the top output logits (up to 0.95 cumulative
probability, at most 10; each measured against the mean logit, i.e. through the demeaned unembedding).
An edge s -> t is value(s) x d input(t) / d value(s): for a feature the input is its pre-activation, for a
logit its demeaned logit. Rows (a target's incoming edges) come from batched backward passes, B targets per
pass over B copies of the prompt, all through one forward pass kept for them (with only the last position's
logits computed); logits first, then features in order of their current influence on the logits, up to
`max_feature_nodes` expanded. Edges are kept sparse (COO), never an n x n matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aimri.circuits.replacement import Replaced, ReplacementModel
from aimri.devices import Plan, free_memory, out_of_memory
from aimri.dictionaries.match import prompt_ids
from aimri.errors import AimriError
from aimri.progress import progress_bar


@dataclass
class Graph:
    """An attribution graph. Node ids index, in order: features, errors, embeddings, logits."""

    prompt: str
    tokens: list[int]
    token_strings: list[str]
    features: Tensor  # [n_features, 3] (layer, position, index)
    activations: Tensor  # [n_features]
    n_layers: int
    logit_tokens: list[int]
    logit_probs: list[float]
    edge_targets: Tensor  # [n_edges] node ids (COO)
    edge_sources: Tensor  # [n_edges]
    edge_weights: Tensor  # [n_edges]
    expanded: Tensor  # bool [n_nodes]: whose incoming edges were computed
    logit_token_strings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def embed_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.embed_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + len(self.logit_tokens)

    def kind(self, node: int) -> str:
        if node < self.error_start:
            return "feature"
        if node < self.embed_start:
            return "error"
        return "embedding" if node < self.logit_start else "logit"

    def row(self, node: int) -> tuple[Tensor, Tensor]:
        """A node's incoming edges: (source ids, weights)."""
        at = self.edge_targets == node
        return self.edge_sources[at], self.edge_weights[at]


def normalised(targets: Tensor, weights: Tensor, n: int) -> Tensor:
    """|weight| of each edge as a share of its target's total incoming |weight|."""
    magnitude = weights.abs()
    row_sum = torch.zeros(n).index_add_(0, targets, magnitude)
    return magnitude / row_sum[targets].clamp_min(1e-30)


def influence(graph: Graph, targets: Tensor, sources: Tensor, weights: Tensor, logit_weights: Tensor) -> Tensor:
    """Each node's total influence on the logits: the logit probabilities propagated back through the
    graph with every target's incoming |weights| normalised to sum 1 (the graph is a DAG, so this ends)."""
    n = graph.n_nodes
    norm = normalised(targets, weights, n)
    current = torch.zeros(n)
    current[graph.logit_start :] = logit_weights
    total = torch.zeros(n)
    for _ in range(4 * graph.n_layers + 8):
        nxt = torch.zeros(n).index_add_(0, sources, current[targets] * norm)
        if float(nxt.abs().sum()) < 1e-12:
            break
        total += nxt
        current = nxt
    return total


def attribution_plan(subject: Any, n_pos: int, copies: int = 1) -> Plan:
    """The memory one attribution needs per prompt copy on the model's device (bytes): the kept activations
    (~5 x d_model per layer and position) and the backward's transients, measured at ~12 x d_model in all;
    `attribute` refuses before any work when one copy will not fit, and sizes its copies per pass from it."""
    per_copy = 4.0 * n_pos * subject.n_layers * 12 * subject.d_model
    return Plan(f"attribution of a {n_pos}-token prompt", subject.device, "`batch_size`", copies, per_copy)


def fitting_copies(subject: Any, n_pos: int, wanted: int, memory_budget: float | None = None) -> Plan:
    """The attribution plan with `units` = the prompt copies per backward pass: `wanted`, or as many as fit
    `memory_budget` bytes (None: half the free memory, after checking that one copy fits: DeviceError with the
    estimate otherwise, before any work)."""
    plan = attribution_plan(subject, n_pos)
    if memory_budget is None:
        memory_budget = 0.5 * free_memory(subject.device)
        plan.check()
    plan.units = max(1, min(wanted, int(memory_budget // plan.per_unit)))
    return plan


def target_quantity(run: Replaced, encoders: dict[int, Tensor], target: tuple[int, int, int] | int, b: int) -> Tensor:
    """What a graph node's incoming edges add up to, on copy b of a run: a feature (layer, position, index) its
    pre-activation minus b_enc (its MLP input . its encoder column, `encoders` [d_model, width] per layer); a
    logit (a token id) the demeaned last-position logit."""
    if isinstance(target, int):
        row = run.logits[b, -1] if run.logits.dim() == 3 else run.logits[-1]
        return row[target] - row.mean()
    layer, pos, idx = target
    x = run.mlp_inputs[layer]
    x = x[b, pos] if x.dim() == 3 else x[pos]
    return x.float() @ encoders[layer][:, idx].float()


def _top_logits(logits: Tensor, cumulative: float = 0.95, most: int = 10) -> tuple[list[int], list[float]]:
    probs = logits.float().softmax(-1)
    values, ids = probs.sort(descending=True)
    keep = int((values.cumsum(0) < cumulative).sum()) + 1
    keep = max(1, min(most, keep))
    return ids[:keep].tolist(), values[:keep].tolist()


def attribute(
    model: ReplacementModel,
    prompt: str | list[int],
    max_feature_nodes: int = 4096,
    batch_size: int = 32,
    progress: bool = True,
    memory_budget: float | None = None,
    edge_floor: float = 1e-6,
    constant_positions: int = 1,
) -> Graph:
    """The attribution graph of `prompt` under `model`'s transcoders. Copies per backward pass are capped
    so their activations fit `memory_budget` bytes (None: half the free memory of the model's device); in each
    row, edges under `edge_floor` x the row's total |weight| are dropped (their share is recorded in
    meta["dropped_weight"]). The passes run on the model's device; the graph's tensors (nodes, edges, the
    fp32 attribution sums) are kept on the host. Raises DeviceError before any work when one copy of the
    prompt's activations will not fit (the estimate; shorten the prompt).

    The first `constant_positions` positions are held constant, as circuit-tracer holds BOS: their MLP
    outputs act like biases, so they have no feature or error nodes (their token embeddings stay nodes).
    Position 0 is the attention sink, whose residual is ~100x any other: the harvest leaves it out, so no
    transcoder was trained there and its "features" would be artefacts (and holding it keeps our graphs
    comparable with circuit-tracer's).

    A text prompt opens as the transcoders' training windows did (their recorded BOS, see
    aimri.dictionaries.match.prompt_ids), so with the default `constant_positions=1` the held position is that
    BOS and every word of the prompt gets nodes; token ids are used as given."""
    subject = model.subject
    tok = subject.tokenizer
    ids = list(prompt) if isinstance(prompt, list) else prompt_ids(tok, prompt, model.configs())

    def text(i: list[int]) -> str:
        return tok.decode(i) if tok is not None else " ".join(map(str, i))

    if not ids:
        raise AimriError("the prompt is empty")
    if not 0 <= constant_positions < len(ids):
        raise AimriError(
            f"constant_positions must be in [0, {len(ids)}) for this {len(ids)}-token prompt, got {constant_positions}"
        )
    start = time.perf_counter()
    ids_t = torch.tensor(ids)
    n_pos, L = len(ids), subject.n_layers
    plan = fitting_copies(subject, n_pos, batch_size, memory_budget)
    batch_size = plan.units
    copies = max(1, min(batch_size, max(10, max_feature_nodes)))  # 10: the most logit rows
    # one batched forward serves every backward pass (kept with retain_graph); copy 0 gives the nodes
    run = model.run(ids_t, copies=copies, last_only=True)
    dropped = [0.0, 0.0]
    logit_tokens, logit_probs = _top_logits(run.logits[0, -1].detach().cpu())
    feats, acts = [], []
    chosen = {}  # per layer: which of the forward's active entries are nodes (not at a constant position)
    for layer in range(L):
        pos, idx = (t.cpu() for t in run.active[layer])  # node bookkeeping on the host
        chosen[layer] = (pos >= constant_positions).nonzero().flatten()
        pos, idx = pos[chosen[layer]], idx[chosen[layer]]
        feats.append(torch.stack([torch.full_like(pos, layer), pos, idx], 1))
        acts.append(run.codes[layer][0].detach()[chosen[layer].to(run.codes[layer].device)].cpu())
    features, activations = torch.cat(feats), torch.cat(acts)
    graph = Graph(
        prompt=prompt if isinstance(prompt, str) else text(ids), tokens=ids,
        token_strings=[text([i]) for i in ids], features=features, activations=activations.float(), n_layers=L,
        logit_tokens=logit_tokens, logit_probs=logit_probs, edge_targets=torch.zeros(0, dtype=torch.long),
        edge_sources=torch.zeros(0, dtype=torch.long), edge_weights=torch.zeros(0), expanded=torch.zeros(0, dtype=torch.bool),
        logit_token_strings=[text([t]) for t in logit_tokens],
    )  # fmt: skip
    n = graph.n_nodes
    expanded = torch.zeros(n, dtype=torch.bool)
    # the sources every row shares, in one order: embeddings, then per layer its active features and errors
    layer_nodes = {layer: (features[:, 0] == layer).nonzero().flatten() for layer in range(L)}
    positions = torch.arange(n_pos)
    sources = torch.cat([graph.embed_start + positions] + [
        torch.cat([layer_nodes[layer], graph.error_start + layer * n_pos + positions]) for layer in range(L)
    ])  # fmt: skip
    errors = {layer: run.errors[layer][0].detach().float().clone() for layer in range(L)}
    for e in errors.values():
        e[:constant_positions] = 0
    embeds = run.embeddings[0].detach().float()
    W_enc = {layer: model.encoder(layer).detach() for layer in range(L)}
    rows_t: list[Tensor] = []
    rows_s: list[Tensor] = []
    rows_w: list[Tensor] = []
    budget = min(max_feature_nodes, graph.n_features)
    passes = [0]

    def expand(targets: list[int]) -> None:
        B = len(targets)
        passes[0] += 1
        quantities = [
            target_quantity(run, W_enc, logit_tokens[t - graph.logit_start] if t >= graph.logit_start
                            else tuple(int(v) for v in features[t]), b)  # type: ignore[arg-type]
            for b, t in enumerate(targets)
        ]  # fmt: skip
        leaves = [run.embeddings, *(run.codes[layer] for layer in range(L)), *(run.errors[layer] for layer in range(L))]
        grads = torch.autograd.grad(torch.stack(quantities).sum(), leaves, allow_unused=True, retain_graph=True)
        grads = tuple(None if g is None else g[:B] for g in grads)  # copies past B carry no target

        def direct(grad: Tensor | None, width: int, value: Callable[[Tensor], Tensor]) -> Tensor:
            return torch.zeros(B, width) if grad is None else value(grad.detach().float()).cpu()

        parts = [direct(grads[0], n_pos, lambda g: (g * embeds).sum(-1))]  # [B, n_pos] each, in `sources` order
        for layer in range(L):
            a = graph.activations[layer_nodes[layer]].to(embeds.device)
            c = chosen[layer].to(embeds.device)
            parts.append(direct(grads[1 + layer], len(a), lambda g, c=c, a=a: g[:, c] * a))
            parts.append(direct(grads[1 + L + layer], n_pos, lambda g, e=errors[layer]: (g * e).sum(-1)))
        weights = torch.cat(parts, 1)
        magnitude = weights.abs()
        keep = magnitude > edge_floor * magnitude.sum(1, keepdim=True)
        dropped[0] += float(magnitude[~keep].sum())
        dropped[1] += float(magnitude.sum())
        for b, t in enumerate(targets):
            rows_t.append(torch.full((int(keep[b].sum()),), t, dtype=torch.int32))
            rows_s.append(sources[keep[b]].int())
            rows_w.append(weights[b, keep[b]])
            expanded[t] = True

    logit_nodes = list(range(graph.logit_start, n))
    with progress_bar(disable=not progress) as bar, out_of_memory(plan):
        task = bar.add_task("attribution", total=len(logit_nodes) + budget, rate="")
        for i in range(0, len(logit_nodes), batch_size):
            expand(logit_nodes[i : i + batch_size])
            bar.update(task, advance=len(logit_nodes[i : i + batch_size]))
        done = 0
        while done < budget:
            t, s, w = torch.cat(rows_t).long(), torch.cat(rows_s).long(), torch.cat(rows_w)
            scores = influence(graph, t, s, w, torch.tensor(logit_probs))
            scores[graph.n_features :] = -1
            scores[expanded] = -1
            order = scores.argsort(descending=True)[: min(batch_size, budget - done)]
            order = order[scores[order] >= 0]
            if not len(order):
                break
            expand(order.tolist())
            done += len(order)
            bar.update(task, advance=len(order), rate=f"{done:,} features expanded")
    graph.edge_targets, graph.edge_sources = torch.cat(rows_t).long(), torch.cat(rows_s).long()
    graph.edge_weights = torch.cat(rows_w)
    graph.expanded = expanded
    graph.meta = {
        "memory_estimate_gb": round(plan.peak / 2**30, 3), "seconds": time.perf_counter() - start, "features_expanded": int(expanded[: graph.n_features].sum()),
        "copies_per_pass": copies, "backward_passes": passes[0], "constant_positions": constant_positions, "dropped_weight": dropped[0] / max(dropped[1], 1e-30),
    }  # fmt: skip
    return graph
