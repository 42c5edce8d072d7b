"""Graph export: the circuit-tracer / Neuronpedia graph JSON (metadata, qParams, nodes, links) and a
self-contained HTML rendering (inline SVG: positions across, layers up; no network needed)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from aimri.circuits.attribution import Graph
from aimri.circuits.prune import Pruned
from aimri.run import Run


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_record(graph: Graph, node: int, influence: float, clerp: str = "") -> dict[str, Any]:
    kind = graph.kind(node)
    base = {"influence": influence, "clerp": clerp, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "activation": None}  # fmt: skip
    if kind == "feature":
        layer, pos, idx = (int(v) for v in graph.features[node])
        node_id = f"{layer}_{idx}_{pos}"
        rec = {"node_id": node_id, "feature": _cantor(layer, idx), "layer": str(layer), "ctx_idx": pos,
               "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{idx}-0",
               "activation": float(graph.activations[node])}  # fmt: skip
    elif kind == "error":
        layer, pos = divmod(node - graph.error_start, graph.n_pos)
        rec = {"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
               "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{pos}"}  # fmt: skip
    elif kind == "embedding":
        pos = node - graph.embed_start
        vocab = graph.tokens[pos]
        rec = {"node_id": f"E_{vocab}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
               "feature_type": "embedding", "jsNodeId": f"E_{vocab}-{pos}"}  # fmt: skip
    else:
        j = node - graph.logit_start
        vocab, prob = graph.logit_tokens[j], graph.logit_probs[j]
        layer = str(graph.n_layers + 1)
        rec = {"node_id": f"{layer}_{vocab}_{graph.n_pos - 1}", "feature": vocab, "layer": layer,
               "ctx_idx": graph.n_pos - 1, "feature_type": "logit", "token_prob": prob, "is_target_logit": j == 0,
               "jsNodeId": f"L_{vocab}-{graph.n_pos - 1}"}  # fmt: skip
        base["clerp"] = clerp or f"Output {json.dumps(graph.logit_token_strings[j])} (p={prob:.3f})"
    return {**base, **rec}


def graph_json(
    graph: Graph, pruned: Pruned, slug: str, scan: str, clerps: dict[int, str] | None = None,
    groups: list[list[int]] | None = None, node_threshold: float = 0.8,
) -> dict[str, Any]:  # fmt: skip
    """The pruned graph as circuit-tracer's frontend and Neuronpedia read it, plus our scores in metadata."""
    clerps = clerps or {}
    kept = pruned.node_mask.nonzero().flatten().tolist()
    nodes = {i: node_record(graph, i, float(pruned.influence[i]), clerps.get(i, "")) for i in kept}
    mask = pruned.edge_mask
    triples = zip(
        graph.edge_targets[mask].tolist(),
        graph.edge_sources[mask].tolist(),
        graph.edge_weights[mask].tolist(),
        strict=True,
    )
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(w)}
        for t, s, w in triples
        if s in nodes and t in nodes
    ]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [r for r in nodes.values() if r["node_id"] in connected or r["feature_type"] in ("embedding", "logit")]
    supernodes = [
        [clerps.get(g[0], "") or f"group {k}", *(nodes[i]["node_id"] for i in g if i in nodes)]
        for k, g in enumerate(groups or [])
    ]
    return {
        "metadata": {
            "slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph.token_strings,
            "prompt_ids": list(graph.tokens), "prompt": graph.prompt, "node_threshold": node_threshold, "schema_version": 1,
            "info": {"generator": "aimri", "replacement_score": pruned.replacement,
                     "completeness_score": pruned.completeness, "replacement_score_full": pruned.replacement_full,
                     "completeness_score_full": pruned.completeness_full, **graph.meta},
        },
        "qParams": {"pinnedIds": [], "supernodes": supernodes, "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": used,
        "links": links,
    }  # fmt: skip


def atlas_clerps(graph: Graph, pruned: Pruned, folder: Path) -> dict[int, str]:
    """Labels of kept feature nodes from each layer's atlas (FOLDER/layer-L/atlas.sqlite), where one exists."""
    from aimri.atlas.db import Atlas

    atlases: dict[int, Atlas | None] = {}
    clerps: dict[int, str] = {}
    for node in pruned.node_mask[: graph.n_features].nonzero().flatten().tolist():
        layer, _, index = (int(v) for v in graph.features[node])
        if layer not in atlases:
            path = Run.atlas_of(Run.transcoder_layer(folder, layer))
            atlases[layer] = Atlas(path) if path.is_file() else None
        atlas = atlases[layer]
        if atlas is not None:
            labels = atlas.card(index, n_top=0)["labels"]
            if labels:
                clerps[node] = labels[-1]["label"]
    return clerps


def render_html(data: dict[str, Any], width: int = 1100, height: int = 720) -> str:
    """A static picture of a graph JSON: token columns across, layers upward, links coloured by sign
    (blue +, red -) with width by |weight|; hover a node for its label."""
    meta, nodes, links = data["metadata"], data["nodes"], data["links"]
    n_pos = max(1, len(meta["prompt_tokens"]))
    layers = [int(n["layer"]) for n in nodes if n["layer"] not in ("E",)]
    top = max(layers, default=1) + 1
    left, right, bottom, upper = 60, 30, 60, 40
    col = (width - left - right) / n_pos
    row = (height - upper - bottom) / (top + 1)
    placed: dict[str, tuple[float, float]] = {}
    per_cell: dict[tuple[int, int], int] = {}
    for n in nodes:
        level = 0 if n["layer"] == "E" else int(n["layer"]) + 1
        cell = (n["ctx_idx"], level)
        k = per_cell.get(cell, 0)
        per_cell[cell] = k + 1
        x = left + col * (n["ctx_idx"] + 0.5) + (k % 5 - 2) * min(12.0, col / 6)
        y = height - bottom - row * level - (k // 5) * 8
        placed[n["node_id"]] = (x, y)
    biggest = max((abs(link["weight"]) for link in links), default=1.0) or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']  # fmt: skip
    for i, token in enumerate(meta["prompt_tokens"]):
        out.append(
            f'<text x="{left + col * (i + 0.5):.1f}" y="{height - 20}" text-anchor="middle">{escape(token)}</text>'
        )
    for link in sorted(links, key=lambda item: abs(item["weight"])):
        if link["source"] in placed and link["target"] in placed:
            (x1, y1), (x2, y2) = placed[link["source"]], placed[link["target"]]
            colour = "#1f77b4" if link["weight"] > 0 else "#d62728"
            w = 0.3 + 3.5 * abs(link["weight"]) / biggest
            out.append(
                f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" stroke-width="{w:.2f}" stroke-opacity="0.55"/>'
            )
    fills = {
        "cross layer transcoder": "#444",
        "mlp reconstruction error": "#bbb",
        "embedding": "#2ca02c",
        "logit": "#ff7f0e",
    }
    for n in nodes:
        x, y = placed[n["node_id"]]
        tip = escape(f"{n['node_id']} {n['clerp']} (influence {n['influence'] or 0:.3g})")
        shape = "rect" if n["feature_type"] == "mlp reconstruction error" else "circle"
        if shape == "rect":
            out.append(
                f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{fills[n["feature_type"]]}"><title>{tip}</title></rect>'
            )
        else:
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{fills[n["feature_type"]]}"><title>{tip}</title></circle>'
            )
        if n["feature_type"] == "logit":
            out.append(f'<text x="{x + 8:.1f}" y="{y + 4:.1f}">{escape(n["clerp"])}</text>')
    out.append("</svg>")
    info = meta.get("info", {})
    scores = (f"replacement {info.get('replacement_score', float('nan')):.3f} (full {info.get('replacement_score_full', float('nan')):.3f}), "
              f"completeness {info.get('completeness_score', float('nan')):.3f} (full {info.get('completeness_score_full', float('nan')):.3f})")  # fmt: skip
    hessian = info.get("hessian")
    if hessian is not None:
        scores += f"; linearity check {hessian:.1e}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + escape(meta["slug"]) + "</title></head><body>"
        f"<h3>{escape(meta['prompt'])}</h3><p>{len(nodes)} nodes, {len(links)} links; {scores}. "
        "Hover a node for its label; blue links excite, red inhibit.</p>"
        + "\n".join(out)
        + _qk_tables(data)
        + "</body></html>"
    )


def _qk_tables(data: dict[str, Any]) -> str:
    """The attention-mediated edges (`mri trace --qk-edges`): heads per edge, the top head's QK pairs."""
    parts = []
    for e in data.get("qk", []):
        heads = "".join(f"<tr><td>{x['layer']}.{x['head']}</td><td>{x['weight']:.3g}</td></tr>" for x in e["heads"])
        names = escape(str(e.get("source_label", e["source"]))), escape(json.dumps(e.get("target_label", e["target"])))
        parts.append(f"<h4>{names[0]} &rarr; {names[1]} (edge {e['weight']:.3g})</h4><table>"
                     f"<tr><th>layer.head</th><th>weight</th></tr>{heads}<tr><td>residual</td><td>{e['residual']:.3g}</td></tr></table>")  # fmt: skip
        if "qk" in e:
            q = e["qk"]
            pairs = "".join(f"<tr><td>{escape(p['query'])}</td><td>{escape(p['key'])}</td><td>{p['value']:.3g}</td></tr>"
                            for p in q["pairs"])  # fmt: skip
            parts.append(f"<p>QK of head {q['layer']}.{q['head']} (query @{q['query_pos']}, key @{q['key_pos']}): score "
                         f"{q['score']:.4g}</p><table><tr><th>query node</th><th>key node</th><th>term</th></tr>{pairs}</table>")  # fmt: skip
    return ("<h3>Attention-mediated edges</h3>" + "".join(parts)) if parts else ""
