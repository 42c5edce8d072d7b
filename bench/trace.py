"""Attribution-graph cost against prompt length on the default model, and per-layer transcoders vs a CLT.

    python bench/trace.py --json [--transcoders DIR] [--lengths 32,64,128,256,512,1024] [--max-feature-nodes 64]
                              [--device cuda] [--dtype bfloat16] [--model DIR] [--no-factual]
                              [--clt DIR [--set-feature-nodes 256]]

`--clt DIR` compares a cross-layer transcoder (`mri train-clt`) with the per-layer set on a fixed prompt set
written for this project (PROMPT_SET: two-hop recall such as Dallas -> Texas -> Austin, rhyme and plan, antonyms
in four languages, arithmetic): the median replacement and completeness scores of the full graphs (pruned ones
too), the top-1 agreement of the replacement model (every MLP replaced, errors dropped) with the model on held-out
corpus positions, seconds per graph at 128 tokens, the Dallas path's intervention through each, and the QK check
(pair terms of a head's score vs the score); the CLT's training record (FVU per layer, tokens, seconds).

Each length runs in a fresh process (so its peak RSS is its own): the seconds for `attribute` (logit rows
plus `max-feature-nodes` feature rows by influence), the process's peak memory, node and edge counts, and
the memory circuit-tracer's dense fp32 adjacency would take for the same graph (it covers the selected
features, error nodes, tokens and logits; our sparse edges also keep every active feature as a source), and
the roofline ratio: the FLOPs counted in the run by torch's formulas (every pass's GEMMs and attention,
forward and backward) per second, over the GEMM rate measured at the start (fp32 on the CPU, bf16 on a GPU).
`--peer-length N` also runs circuit-tracer itself (nnsight backend, its own venv) on an N-token prompt, on
the same device and in the same dtype: seconds, peak memory and agreement of the top logit's edges (each
side after one untimed warm-up attribution of 8 tokens). Transcoders default to
runs/<model>/transcoders (`mri train-transcoders`). On a GPU, peak memory is the CUDA allocator's peak.
`--lengths ""` skips the sweep, `--no-factual` the known-answer check (meaningless on random weights).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from common import add_device_args, device_label, dtype_name, emit, peak_gflops, resolve, synchronize


class FlopCount(TorchDispatchMode):
    """FLOPs of every matmul and attention kernel run inside, forward and backward, by torch's own formulas
    (torch's FlopCounterMode cannot be used: its module tracker breaks torch.autograd.grad on leaves), plus
    the CPU attention kernels its table lacks (counted at half when causal, which torch's formulas ignore)."""

    @staticmethod
    def _causal(flops: int, is_causal: object) -> int:
        return flops // 2 if is_causal else flops  # a causal kernel skips the masked half

    # the CPU kernels' arguments: (q, k, v, dropout_p, is_causal, ...); backward (g, q, k, v, out, lse, dropout_p, is_causal, ...)
    cpu_attention: ClassVar[dict] = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, p=0.0, causal=False, *a, **kw: (
            FlopCount._causal(sdpa_flop_count(q.shape, k.shape, v.shape), kw.get("is_causal", causal))
        ),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, o, lse, p=0.0, causal=False, *a, **kw: FlopCount._causal(
                sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape), kw.get("is_causal", causal)
            )
        ),
    }

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet in self.cpu_attention:
            self.flops += self.cpu_attention[packet](*args, **kwargs)
        return out


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(transcoders: Path, length: int, max_feature_nodes: int, args: argparse.Namespace) -> dict:
    import aimri
    from aimri.circuits.attribution import attribute
    from aimri.circuits.replacement import ReplacementModel, load_transcoders
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries.match import opening

    device, dtype = resolve(args)
    subject = aimri.load(args.model, device=device, dtype=dtype)
    model = ReplacementModel(subject, load_transcoders(transcoders, subject))
    corpus = Corpus.from_paths([args.corpus or default_corpus_path()])
    ids: list[int] = opening(model.transcoders.values(), subject.tokenizer)  # as the training windows open
    for doc in corpus.documents():
        ids += subject.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            break
    counter = FlopCount()  # counts the GEMM and attention FLOPs of every pass
    with counter:
        synchronize(device)
        start = time.perf_counter()
        graph = attribute(model, ids[:length], max_feature_nodes=max_feature_nodes, progress=False,
                          **budget(args, device))  # fmt: skip
        synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds, "gflop": counter.flops / 1e9, "peak_mb": _peak_mb(device),
        "nodes": graph.n_nodes, "edges": len(graph.edge_weights), "copies_per_pass": graph.meta["copies_per_pass"],
        # circuit-tracer's layout: a dense fp32 matrix over selected features, error nodes, tokens and logits
        "dense_adjacency_mb": (graph.meta["features_expanded"] + (graph.n_layers + 1) * graph.n_pos
                               + len(graph.logit_tokens)) ** 2 * 4 / 2**20,
    }  # fmt: skip


FACTUAL = {
    "prompt": "The capital of the state containing Dallas is", "subject": " Dallas", "answer": " Texas",
    "probes": ["We drove to Dallas last week.", "The Dallas Cowboys won again."],
}  # fmt: skip


def factual_path(subject, transcoders, max_feature_nodes: int = 256, group: int = 3, controls: int = 5) -> dict:  # type: ignore[no-untyped-def]
    """The known-answer check on a factual prompt (per-layer transcoders or a CLT): the graph's most influential
    feature at the subject token must read that token (it fires on it in other sentences, most strongly there); scaling the `group` most
    influential features there x-2 together must move the answer off the top, and scaling each of
    `controls` draws of as many random active features at the same position that pruning dropped must not."""
    from aimri.circuits.attribution import attribute
    from aimri.circuits.intervene import Change, intervene
    from aimri.circuits.prune import prune
    from aimri.circuits.replacement import ReplacementModel
    from aimri.dictionaries.match import prompt_ids

    graph = attribute(ReplacementModel(subject, transcoders), FACTUAL["prompt"], max_feature_nodes=max_feature_nodes,
                      progress=False)  # fmt: skip
    pruned = prune(graph)
    pos = graph.token_strings.index(FACTUAL["subject"])
    at = graph.features[:, 1] == pos
    kept = (at & pruned.node_mask[: graph.n_features]).nonzero().flatten()
    kept = kept[pruned.influence[kept].argsort(descending=True)]
    layer, _, index = graph.features[int(kept[0])].tolist()

    def label(node: int) -> str:
        return f"{int(graph.features[node, 0])}/{int(graph.features[node, 2])}"

    def answer_rank(nodes: list[int]) -> int:
        changes = [Change(int(graph.features[i, 0]), int(graph.features[i, 2]), [pos], "scale", -2.0) for i in nodes]
        after = [t for t, _ in intervene(subject, transcoders, graph.tokens, changes, k=10)["after"]]
        return after.index(FACTUAL["answer"]) if FACTUAL["answer"] in after else 10

    readings = []
    model = ReplacementModel(subject, transcoders)
    for text in FACTUAL["probes"]:
        ids = prompt_ids(subject.tokenizer, text, model.configs())  # opened as its training windows were
        with torch.no_grad():
            x = subject.run(torch.tensor([ids]), read=[f"mlp.in.{layer}"])[f"mlp.in.{layer}"][0]
            acts = model.encode(layer, x.float())[:, index]
        strongest = int(acts[1:].argmax()) + 1  # position 0 is the sink (the BOS)
        readings.append({"text": text, "strongest_token": subject.tokenizer.decode([ids[strongest]]),
                         "activation": round(float(acts[strongest]), 3)})  # fmt: skip
    dropped = (at & ~pruned.node_mask[: graph.n_features]).nonzero().flatten()
    draws = [dropped[torch.randperm(len(dropped), generator=torch.Generator().manual_seed(seed))[:group]].tolist()
             for seed in range(controls)]  # fmt: skip
    return {
        "prompt": FACTUAL["prompt"], "top_logits": list(zip(graph.logit_token_strings[:3], graph.logit_probs[:3], strict=True)),
        "replacement": pruned.replacement, "replacement_full": pruned.replacement_full,
        "completeness": pruned.completeness, "completeness_full": pruned.completeness_full,
        "feature": f"{label(int(kept[0]))}@{pos}", "feature_influence": float(pruned.influence[int(kept[0])]),
        "kept_at_subject": len(kept), "readings": readings,
        "ablated": [label(i) for i in kept[:group].tolist()],
        "answer_rank_after_ablation": answer_rank(kept[:group].tolist()),
        "answer_rank_after_controls": [answer_rank(nodes) for nodes in draws],
    }  # fmt: skip


def budget(args: argparse.Namespace, device: torch.device) -> dict:
    """attribute()'s batch size (--batch-size: both sides get it) and, where --memory-budget (GB) is given, its
    memory budget (else attribute's default: half the free memory of the model's device)."""
    settings: dict[str, float] = {"batch_size": args.batch_size}
    if args.memory_budget:
        settings["memory_budget"] = args.memory_budget * 1e9
    return settings


def compare_with_circuit_tracer(
    subject, tcs: dict, transcoders: Path, length: int, max_feature_nodes: int, log, args: argparse.Namespace
) -> dict:  # type: ignore[no-untyped-def]
    """Ours and circuit-tracer (nnsight backend, its own venv) on one prompt, on the subject's device and in
    its dtype: time, memory, and agreement of the top logit's incoming edges from the features both selected
    and from the token embeddings. Each side runs one untimed 8-token attribution first. Ours runs first, so
    its figures stand when circuit-tracer fails (then "error" says why and its figures are None)."""
    import tempfile

    from aimri.circuits.attribution import attribute
    from aimri.circuits.replacement import ReplacementModel
    from aimri.dictionaries.match import opening
    from common import run_peer

    text = subject.tokenizer("The capital of the state containing Dallas is the city of", add_special_tokens=False)
    ids = text["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    bos = opening(tcs.values(), subject.tokenizer)  # the transcoders' BOS; circuit-tracer holds position 0 too
    ids = bos + ids[-(length - len(bos)) :]
    device, dtype = subject.device, next(subject.model.parameters()).dtype
    model = ReplacementModel(subject, tcs)
    settings = budget(args, device)
    attribute(model, ids[:8], max_feature_nodes=8, progress=False, **settings)  # warm-up, as circuit-tracer's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    graph = attribute(model, ids, max_feature_nodes=max_feature_nodes, progress=False, **settings)
    synchronize(device)
    seconds = time.perf_counter() - start
    result: dict[str, object] = {
        "ours_s": seconds, "ours_peak_mb": _peak_mb(device), "ours_nodes": graph.n_nodes, "theirs_s": None,
        "theirs_peak_mb": None, "theirs_selected": None, "edges_compared": 0, "max_abs_diff_over_max_edge": None,
        "error": None,
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="aimri-trace-bench-"))
    (work / "ids.json").write_text(json.dumps(ids))
    model_dir = str(subject.model.name_or_path)
    try:
        run_peer("circuit_tracer", "circuit_tracer_trace.py", model_dir, str(transcoders), str(work / "ids.json"),
                 str(max_feature_nodes), str(work / "ct.json"), str(args.batch_size), log=log, device=device,
                 dtype=dtype, timeout=args.peer_timeout)  # fmt: skip
        theirs = json.loads((work / "ct.json").read_text())
        if theirs["tokens"] != ids:
            raise RuntimeError(
                f"circuit-tracer attributed other tokens ({theirs['tokens'][:4]}...) than ours ({ids[:4]}...)"
            )
    except RuntimeError as err:  # reported, not hidden: the figures stay ours only
        result["error"] = str(err)[-600:]
        return result
    sources, weights = graph.row(graph.logit_start)
    ours = dict(zip(sources.tolist(), weights.tolist(), strict=True))
    index = {"_".join(map(str, f)): i for i, f in enumerate(graph.features.tolist())}
    pairs = [
        (ours.get(index[k], 0.0), w)
        for k, w in theirs["feature_edges"].items()
        if k in index and int(k.split("_")[1]) > 0
    ]
    pairs += [(ours.get(graph.embed_start + p, 0.0), w) for p, w in enumerate(theirs["embed_edges"]) if p > 0]
    scale = max((abs(b) for _, b in pairs), default=1.0) or 1.0
    result.update({
        "theirs_s": theirs["seconds"], "theirs_peak_mb": theirs["peak_mb"], "theirs_selected": theirs["n_selected"],
        "edges_compared": len(pairs), "max_abs_diff_over_max_edge": max((abs(a - b) for a, b in pairs), default=0.0) / scale,
    })  # fmt: skip
    return result


# The fixed prompt set of the CLT comparison, written for this project: two-hop factual recall, rhyme and
# plan, antonyms in four languages, arithmetic. (prompt, the answer a capable model gives: the graphs are of the
# model's own top prediction whatever it is; the answer is only reported)
PROMPT_SET = [
    ("The capital of the state containing Dallas is", " Austin"),
    ("The capital of the state containing Chicago is", " Springfield"),
    ("The capital of the state containing Miami is", " Tallahassee"),
    ("The capital of the country containing Lyon is", " Paris"),
    ("The currency of the country whose capital is Tokyo is the", " yen"),
    ("The language spoken in the country whose capital is Madrid is", " Spanish"),
    ("The continent of the country whose capital is Nairobi is", " Africa"),
    ("A rhyming couplet:\nHe saw a carrot and had to grab it,\nHis hunger was like a starving", " rabbit"),
    ("Roses are red, violets are blue, sugar is sweet, and so are", " you"),
    ("The cat sat on the mat and wore a funny", " hat"),
    ("Twinkle, twinkle, little star, how I wonder what you", " are"),
    ('The opposite of "small" is "', "big"),
    ('The opposite of "hot" is "', "cold"),
    ('Le contraire de "petit" est "', "grand"),
    ('El opuesto de "caliente" es "', "fr"),
    ('Das Gegenteil von "alt" ist "', "jung"),
    ("36+59=", "95"),
    ("12+7=", "19"),
    ("8*7=", "56"),
    ("100-37=", "63"),
    ("The sum of 23 and 45 is", " 68"),
    ("Two plus three equals", " five"),
]


def graph_scores(subject, transcoders, max_feature_nodes: int, batch_size: int) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every prompt of PROMPT_SET attributed through `transcoders` (per-layer or a CLT): replacement and
    completeness (full and pruned), the model's top token and seconds."""
    from aimri.circuits.attribution import attribute
    from aimri.circuits.prune import prune
    from aimri.circuits.replacement import ReplacementModel

    model = ReplacementModel(subject, transcoders)
    rows = []
    for prompt, answer in PROMPT_SET:
        start = time.perf_counter()
        graph = attribute(model, prompt, max_feature_nodes=max_feature_nodes, batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - start
        pruned = prune(graph)
        rows.append({"prompt": prompt, "answer": answer, "top": graph.logit_token_strings[0], "seconds": seconds,
                     "replacement": pruned.replacement, "completeness": pruned.completeness,
                     "replacement_full": pruned.replacement_full, "completeness_full": pruned.completeness_full})  # fmt: skip
    return rows


def heldout_agreement(subject, transcoders, windows: int = 8, context: int = 128) -> dict:  # type: ignore[no-untyped-def]
    """The replacement model (every MLP replaced, error terms dropped) on held-out default-corpus windows (those
    transcoder training never reads with its default heldout_every 50): CE recovered, KL and top-1 agreement."""
    from aimri.circuits.replacement import ReplacementModel
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries.evaluate import replaced_metrics
    from aimri.dictionaries.stream import heldout_windows

    model = ReplacementModel(subject, transcoders)
    corpus = Corpus.from_paths([default_corpus_path()])
    held = heldout_windows(subject.tokenizer, corpus, context, 50, windows)

    def per_layer(layer: int, x: torch.Tensor, codes: dict) -> torch.Tensor:
        tc = model.transcoders[layer]
        return tc.decode(tc.encode(x), x)

    reconstruct = model.clt.reconstruct if model.clt is not None else per_layer
    return replaced_metrics(subject, reconstruct, list(range(subject.n_layers)), held)


def timed_128(subject, transcoders, max_feature_nodes: int, batch_size: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds of one attribution of a 128-token default-corpus prompt (after an untimed 8-token warm-up)."""
    from aimri.circuits.attribution import attribute
    from aimri.circuits.replacement import ReplacementModel
    from aimri.data.corpus import Corpus
    from aimri.data.default_corpus import default_corpus_path
    from aimri.dictionaries.match import opening

    model = ReplacementModel(subject, transcoders)
    ids = opening(model.configs(), subject.tokenizer)  # as the training windows open
    for doc in Corpus.from_paths([default_corpus_path()]).documents():
        ids += subject.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 128:
            break
    attribute(model, ids[:8], max_feature_nodes=8, progress=False, batch_size=batch_size)
    start = time.perf_counter()
    attribute(model, ids[:128], max_feature_nodes=max_feature_nodes, progress=False, batch_size=batch_size)
    return time.perf_counter() - start


def qk_check(subject, transcoders, edges: int = 3) -> dict:  # type: ignore[no-untyped-def]
    """On the Dallas prompt: the strongest edges between positions, their head loadings and their top head's QK
    attribution; `qk_sum_error` = the largest |score - sum of pair terms| / |score| (Llama-style attention has
    no biases, so it measures the decomposition itself), `head_sum_error` the largest |edge - (residual + every
    head's part)| / |edge|."""
    from aimri.circuits.attribution import attribute
    from aimri.circuits.prune import prune
    from aimri.circuits.qk import attention_edges
    from aimri.circuits.replacement import ReplacementModel

    model = ReplacementModel(subject, transcoders)
    graph = attribute(model, FACTUAL["prompt"], max_feature_nodes=256, progress=False)
    records = attention_edges(model, graph, prune(graph), edges)
    qk = [abs(r["qk"]["unexplained"]) / max(abs(r["qk"]["score"]), 1e-12) for r in records if "qk" in r]
    heads = [abs(r["total"] - r["weight"]) / max(abs(r["weight"]), 1e-12) for r in records]
    return {
        "qk_sum_error": max(qk, default=None), "head_sum_error": max(heads, default=None),
        "edges": [{k: r[k] for k in ("source", "target", "weight", "residual")} | {"top_heads": r["heads"][:3],
                  "qk_top_pairs": r.get("qk", {}).get("pairs", [])[:3]} for r in records],
    }  # fmt: skip


def compare_clt(args: argparse.Namespace, log) -> dict:  # type: ignore[no-untyped-def]
    """Per-layer transcoders vs a CLT on PROMPT_SET, held-out agreement, time at 128 tokens, the Dallas path's
    intervention and the QK check."""
    import statistics

    import aimri
    from aimri.circuits.replacement import load_transcoders

    device, dtype = resolve(args)
    subject = aimri.load(args.model, device=device, dtype=dtype)
    sets = {"plt": load_transcoders(args.transcoders, subject), "clt": load_transcoders(args.clt, subject)}
    out: dict = {}
    for kind, tcs in sets.items():
        rows = graph_scores(subject, tcs, args.set_feature_nodes, args.batch_size)
        log(
            f"{kind}: "
            + "; ".join(f"{r['top']!r} {r['replacement_full']:.2f}/{r['completeness_full']:.2f}" for r in rows)
        )
        held = heldout_agreement(subject, tcs)
        log(f"{kind} held-out: {held}")
        path = factual_path(subject, tcs)
        log(f"{kind} factual path: {path}")
        out[kind] = {
            "replacement_median": statistics.median(r["replacement_full"] for r in rows),
            "completeness_median": statistics.median(r["completeness_full"] for r in rows),
            "replacement_median_pruned": statistics.median(r["replacement"] for r in rows),
            "completeness_median_pruned": statistics.median(r["completeness"] for r in rows),
            "replacement_dallas": rows[0]["replacement_full"], "seconds_median": statistics.median(r["seconds"] for r in rows),
            "top1_agreement": held["top1_agreement"], "ce_loss_recovered": held["ce_loss_recovered"], "kl": held["kl_div"],
            "seconds_128": timed_128(subject, tcs, args.max_feature_nodes, args.batch_size),
            "dallas_answer_rank_after_ablation": path["answer_rank_after_ablation"],
            "dallas_answer_rank_after_controls": path["answer_rank_after_controls"], "dallas_feature": path["feature"],
            "prompts": rows,
        }  # fmt: skip
    out["qk"] = qk_check(subject, sets["clt"])
    log(f"qk: {out['qk']}")
    record = (
        json.loads((Path(args.clt) / "metrics.json").read_text()) if (Path(args.clt) / "metrics.json").exists() else {}
    )
    out["clt_training"] = {k: record.get(k) for k in ("seconds", "tokens", "parameters", "replacement")} | {
        "settings": {k: record.get("settings", {}).get(k) for k in ("width", "k", "tokens", "batch_size", "lr")},
        "fvu_by_layer": {k: round(v["fvu"], 3) for k, v in record.get("layers", {}).items()},
    }  # fmt: skip
    plt_record = Path(args.transcoders) / "metrics.json"
    if plt_record.exists():
        layers = json.loads(plt_record.read_text())["layers"]
        out["plt_training"] = {"fvu_by_layer": {k: round(v.get("fvu", float("nan")), 3) for k, v in layers.items()},
                               "ce_recovered_by_layer": {k: round(v.get("ce_loss_recovered", float("nan")), 3)
                                                         for k, v in layers.items()}}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    from aimri.run import Run

    parser.add_argument("--transcoders", type=Path, default=None, help="default: runs/<model>/transcoders")
    parser.add_argument("--lengths", default="32,64,128,256,512,1024")
    parser.add_argument("--max-feature-nodes", type=int, default=64)
    parser.add_argument(
        "--peer-length", type=int, default=16, help="prompt length for the circuit-tracer run (0: skip)"
    )
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, .gguf file or HF directory")
    parser.add_argument(
        "--corpus", type=Path, default=None, help="text the sweep's prompts come from (default: the default corpus)"
    )
    parser.add_argument("--no-factual", action="store_true", help="skip the known-answer check (random weights)")
    parser.add_argument("--random-transcoders", default="", metavar="WIDTH:K",
                        help="make random TopK transcoders at --transcoders first if there are none (speed only)")  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=32, help="copies per backward pass, ours and circuit-tracer's"
    )
    parser.add_argument("--memory-budget", type=float, default=0.0, help="GB for our copies (0: attribute's default)")
    parser.add_argument("--peer-timeout", type=float, default=None, help="seconds the circuit-tracer run may take")
    parser.add_argument("--clt", type=Path, default=None,
                        help="a CLT (`mri train-clt`): compare it with --transcoders on the fixed prompt set")  # fmt: skip
    parser.add_argument("--set-feature-nodes", type=int, default=256, help="feature rows per graph of the prompt set")
    add_device_args(parser)
    args = parser.parse_args()
    if args.transcoders is None:
        args.transcoders = Run.for_model(args.model).transcoders
    if args.child:
        print(json.dumps(one(args.transcoders, args.child, args.max_feature_nodes, args)))
        return
    if args.random_transcoders and not (args.transcoders / "layer-0" / "cfg.json").exists():
        from gpu_models import make_transcoders

        width, k = (int(v) for v in args.random_transcoders.split(":"))
        print(f"random transcoders: {make_transcoders(Path(args.model), args.transcoders, width, k)}", file=sys.stderr)
    if not (args.transcoders / "layer-0" / "cfg.json").exists():
        sys.exit(f"no transcoders at {args.transcoders}: run `mri train-transcoders` first (or pass --transcoders)")
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    device, dtype = resolve(args)
    gflops = peak_gflops(device)
    by_len: dict[str, dict] = {}
    for length in [int(x) for x in args.lengths.split(",") if x.strip()]:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(length),
            "--transcoders",
            str(args.transcoders),
            "--max-feature-nodes",
            str(args.max_feature_nodes),
            "--model",
            args.model,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--batch-size",
            str(args.batch_size),
            "--memory-budget",
            str(args.memory_budget),
        ]
        cmd += ["--corpus", str(args.corpus)] if args.corpus else []  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"{length} tokens failed: {done.stderr.strip()[-400:]}")
            break
        by_len[str(length)] = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"{length} tokens: {by_len[str(length)]}")
    import aimri
    from aimri.circuits.replacement import load_transcoders

    subject = aimri.load(args.model, device=device, dtype=dtype)
    tcs = load_transcoders(args.transcoders, subject)
    path = None if args.no_factual else factual_path(subject, tcs)
    log(f"factual path: {path}")
    peer = None
    if args.peer_length:
        peer = compare_with_circuit_tracer(
            subject, tcs, args.transcoders, args.peer_length, args.max_feature_nodes, log, args
        )
        log(f"circuit-tracer comparison: {peer}")
    theirs = peer is not None and peer["theirs_s"] is not None
    clt = compare_clt(args, log) if args.clt else None
    emit(
        {
            **(
                {
                    "replacement_median_clt": round(clt["clt"]["replacement_median"], 3),
                    "replacement_median_plt": round(clt["plt"]["replacement_median"], 3),
                    "replacement_ratio_clt_over_plt": round(
                        clt["clt"]["replacement_median"] / max(clt["plt"]["replacement_median"], 1e-9), 2
                    ),
                    "completeness_median_clt": round(clt["clt"]["completeness_median"], 3),
                    "completeness_median_plt": round(clt["plt"]["completeness_median"], 3),
                    "replacement_dallas_clt": round(clt["clt"]["replacement_dallas"], 3),
                    "replacement_dallas_plt": round(clt["plt"]["replacement_dallas"], 3),
                    "top1_agreement_clt": round(clt["clt"]["top1_agreement"], 3),
                    "top1_agreement_plt": round(clt["plt"]["top1_agreement"], 3),
                    "ce_recovered_all_mlps_clt": round(clt["clt"]["ce_loss_recovered"], 3),
                    "ce_recovered_all_mlps_plt": round(clt["plt"]["ce_loss_recovered"], 3),
                    "attribution_s_128_clt": round(clt["clt"]["seconds_128"], 1),
                    "attribution_s_128_plt": round(clt["plt"]["seconds_128"], 1),
                    "attribution_time_ratio_clt_over_plt": round(
                        clt["clt"]["seconds_128"] / clt["plt"]["seconds_128"], 2
                    ),
                    "dallas_rank_after_ablation_clt": clt["clt"]["dallas_answer_rank_after_ablation"],
                    "dallas_rank_after_controls_clt": clt["clt"]["dallas_answer_rank_after_controls"],
                    "dallas_rank_after_ablation_plt": clt["plt"]["dallas_answer_rank_after_ablation"],
                    "qk_sum_error": clt["qk"]["qk_sum_error"],
                    "head_sum_error": clt["qk"]["head_sum_error"],
                    "qk_edges": clt["qk"]["edges"],
                    "clt_training": clt["clt_training"],
                    "plt_training": clt.get("plt_training"),
                    "prompt_set": [
                        {
                            "prompt": p["prompt"],
                            "top": p["top"],
                            "clt": round(p["replacement_full"], 3),
                            "plt": round(q["replacement_full"], 3),
                        }
                        for p, q in zip(clt["clt"]["prompts"], clt["plt"]["prompts"], strict=True)
                    ],
                }
                if clt
                else {}
            ),
            "seconds_by_len": {k: round(v["seconds"], 1) for k, v in by_len.items()},
            "peak_mb_by_len": {k: round(v["peak_mb"]) for k, v in by_len.items()},
            "dense_adjacency_mb_by_len": {k: round(v["dense_adjacency_mb"]) for k, v in by_len.items()},
            "nodes_by_len": {k: v["nodes"] for k, v in by_len.items()},
            "edges_by_len": {k: v["edges"] for k, v in by_len.items()},
            "gflop_by_len": {k: round(v["gflop"], 1) for k, v in by_len.items()},
            # counted FLOPs (forward and backward GEMMs and attention) per second over the measured GEMM peak
            "roofline_ratio_by_len": {k: round(v["gflop"] / v["seconds"] / gflops, 3) for k, v in by_len.items()},
            "roofline_ratio": round(min((v["gflop"] / v["seconds"] / gflops for v in by_len.values()), default=0), 3),
            "max_len_ok": max((int(k) for k in by_len), default=0),
            "max_feature_nodes": args.max_feature_nodes,
            "peer_length": args.peer_length,
            "attribution_s_ours": round(peer["ours_s"], 3) if peer else None,
            "attribution_s_circuit_tracer": round(peer["theirs_s"], 3) if theirs else None,
            "attribution_peak_mb_ours": round(peer["ours_peak_mb"]) if peer else None,
            "error_circuit_tracer": peer["error"] if peer else None,
            "speedup_vs_circuit_tracer": round(peer["theirs_s"] / peer["ours_s"], 3) if theirs else None,
            "circuit_tracer_edge_agreement": round(peer["max_abs_diff_over_max_edge"], 6) if theirs else None,
            "circuit_tracer_peak_mb": round(peer["theirs_peak_mb"]) if theirs else None,
            "factual_path": None
            if path is None
            else {
                k: path[k]
                for k in (
                    "feature",
                    "readings",
                    "ablated",
                    "answer_rank_after_ablation",
                    "answer_rank_after_controls",
                    "replacement_full",
                    "completeness_full",
                )
            },
            "gemm_gflops": round(gflops, 1),
            "model": subject.name,
            "dtype": dtype_name(dtype),
            "batch_size": args.batch_size,
            "device": device_label(device),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
