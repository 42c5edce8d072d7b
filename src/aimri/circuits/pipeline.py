"""Tracing a prompt to graph files, once for every front end: attribute → prune → clerps → supernodes → graph
JSON (+ static HTML). `mri trace`, the console's "trace a prompt" and notebooks all call `trace_prompt`.

Method: the local replacement model with per-layer transcoders and attribution by batched backward passes, as
in Ameisen et al. 2025 ("Circuit Tracing") and circuit-tracer; see aimri.circuits.attribution.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aimri.circuits.attribution import Graph, attribute
from aimri.circuits.config import TraceConfig
from aimri.circuits.export import atlas_clerps, graph_json, render_html
from aimri.circuits.prune import Pruned, prune, supernodes
from aimri.circuits.replacement import ReplacementModel, Transcoders, load_transcoders
from aimri.errors import AimriError
from aimri.paths import atomic_write_text
from aimri.subject.core import Subject

Step = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Traced:
    """A traced prompt: the full graph, its pruning, the exported JSON and the files written."""

    graph: Graph
    pruned: Pruned
    data: dict[str, Any]
    path: Path
    html: Path | None

    def summary(self) -> dict[str, Any]:
        """Sizes, scores (replacement / completeness, pruned and full), seconds and the top logits."""
        g, p = self.graph, self.pruned
        return {
            "prompt_tokens": g.n_pos, "features": g.n_features, "features_expanded": g.meta["features_expanded"],
            "edges": len(g.edge_weights), "kept_nodes": len(self.data["nodes"]), "kept_links": len(self.data["links"]),
            "replacement": p.replacement, "completeness": p.completeness,
            "replacement_full": p.replacement_full, "completeness_full": p.completeness_full,
            "hessian": g.meta.get("hessian"), "attention_edges": len(self.data.get("qk", [])), "memory_estimate_gb": g.meta.get("memory_estimate_gb"),
            "transcoder_kind": g.meta.get("transcoder_kind"), "seconds": round(g.meta["seconds"], 1),
            "top_logits": list(zip(g.logit_token_strings, g.logit_probs, strict=True)),
        }  # fmt: skip


def check_trace(prompt: str, config: TraceConfig) -> None:
    """Raises AimriError for an empty prompt or settings out of range (callers check before loading a model)."""
    config.check()
    if not prompt.strip():
        raise AimriError("the prompt is empty")


def trace_prompt(
    subject: Subject,
    transcoders: Path | Transcoders,
    prompt: str,
    out: Path,
    config: TraceConfig | None = None,
    html: Path | bool = True,
    clerps_from: Path | None = None,
    progress: bool = True,
    step: Step | None = None,
) -> Traced:
    """Trace `prompt`'s next-token prediction and write the graph JSON (circuit-tracer / Neuronpedia format)
    to `out`, with a static HTML rendering beside it (`html=True`: OUT with .html; a path; or False for none).

    transcoders: a folder of `layer-L` transcoders (`mri train-transcoders`) or those already loaded;
    clerps_from: the folder whose `layer-L/atlas.sqlite` label the nodes (default: the transcoder folder).
    step: called with (stage, done, total) as attribution, pruning and writing proceed.
    Raises AimriError for an empty prompt, settings out of range, or transcoders that do not fit the subject.
    """
    config = config or TraceConfig()
    check_trace(prompt, config)
    note = step or (lambda stage, done, total: None)
    if not isinstance(transcoders, (str, Path)):
        tcs = transcoders
    else:
        note("loading transcoders", 0, 1)
        tcs, clerps_from = load_transcoders(transcoders, subject), clerps_from or Path(transcoders)
    note("attributing", 0, 3)
    model = ReplacementModel(subject, tcs)
    graph = attribute(
        model, prompt, max_feature_nodes=config.max_feature_nodes,
        batch_size=config.batch_size, progress=progress, constant_positions=config.constant_positions,
    )  # fmt: skip
    graph.meta["hessian"] = model.hessian_check(torch.tensor(graph.tokens))  # the linearity check, every graph
    graph.meta["transcoder_kind"] = "cross-layer transcoder" if model.clt is not None else "per-layer transcoders"
    note("pruning", 1, 3)
    pruned = prune(graph, config.node_threshold, config.edge_threshold)
    clerps = atlas_clerps(graph, pruned, clerps_from) if clerps_from is not None else {}
    groups = supernodes(
        graph, pruned.node_mask, {layer: model.decoder_rows(layer) for layer in range(subject.n_layers)}, clerps
    )
    out = Path(out)
    data = graph_json(graph, pruned, out.stem, subject.name, clerps, groups, config.node_threshold)
    if config.qk_edges:
        from aimri.circuits.qk import attention_edges

        note("attention edges", 2, 3)
        data["qk"] = attention_edges(
            model, graph, pruned, config.qk_edges, config.batch_size, config.constant_positions
        )
    note("writing", 2, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(data))
    page = None if html is False else out.with_suffix(".html") if html is True else Path(html)
    if page is not None:
        atomic_write_text(page, render_html(data))
    note("writing", 3, 3)
    return Traced(graph, pruned, data, out, page)
