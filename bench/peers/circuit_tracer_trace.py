"""Runs inside the circuit-tracer venv: its nnsight-backend attribution on the same model, transcoders and
prompt as ours. circuit_tracer_trace.py MODEL_DIR TRANSCODERS_DIR ids.json MAX_FEATURE_NODES OUT.json

Writes timing, peak memory and the logit row's edges (to compare with ours) to OUT.json. Runs on the bench's
device and dtype (_device: the model and its transcoders in that dtype, as circuit-tracer loads them);
one untimed warm-up attribution on the first 8 tokens first, as for ours. Optional 6th argument: batch size
(default 32).
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _device import DEVICE, DTYPE, peak_mb, synchronize
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
from safetensors.torch import load_file
from transformers import AutoConfig

model_dir, tc_dir, ids_path, max_nodes, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
batch_size = int(sys.argv[6]) if len(sys.argv) > 6 else 32


def for_transformers_4(folder: str) -> str:
    """The model folder as transformers 4 reads it: a linked copy whose tokenizer config names the fast
    tokenizer class and whose config states rope_theta at the top level (transformers 5 writes both in
    forms v4 does not read; v4 would silently fall back to rope_theta 10000, another model)."""
    copy = Path(tempfile.mkdtemp(prefix="ct-model-"))
    for item in Path(folder).iterdir():
        (copy / item.name).symlink_to(item.resolve())
    config = copy / "tokenizer_config.json"
    if config.exists():
        data = json.loads(config.read_text())
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        extra = data.get("extra_special_tokens")
        if isinstance(extra, list):  # v5 lists them; v4 wants a dict, or additional_special_tokens
            data.pop("extra_special_tokens")
            data["additional_special_tokens"] = extra
        config.unlink()
        config.write_text(json.dumps(data))
    model_config = copy / "config.json"
    data = json.loads(model_config.read_text())
    rope = data.get("rope_parameters") or {}
    if "full_attention" in rope:  # Gemma 3: one rope per attention type; v4 names the local one apart
        data.setdefault("rope_theta", rope["full_attention"]["rope_theta"])
        data.setdefault("rope_local_base_freq", rope.get("sliding_attention", rope["full_attention"])["rope_theta"])
    else:
        for key, value in rope.items():
            data.setdefault(key, value)
    model_config.unlink()
    model_config.write_text(json.dumps(data))
    return str(copy)


model_dir = for_transformers_4(model_dir)
torch.set_grad_enabled(True)
n_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
transcoders = {}
for layer in range(n_layers):
    folder = tc_dir / f"layer-{layer}"
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    d_model, d_sae = w["W_enc"].shape
    tc = SingleLayerTranscoder(d_model, d_sae, TopK(cfg["k"]), layer, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        tc.W_enc.copy_(w["W_enc"].T)
        tc.W_dec.copy_(w["W_dec"])
        tc.b_enc.copy_(w["b_enc"])
        tc.b_dec.copy_(w["b_dec"])
    transcoders[layer] = tc
# MLP input after its norm -> what the MLP adds to the residual (for Gemma, after its post-norm), as ours:
# circuit-tracer's nnsight mapping names these mlp.hook_in and hook_mlp_out for both Llama and Gemma 3
tset = TranscoderSet(transcoders, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")
model = ReplacementModel.from_pretrained_and_transcoders(model_dir, tset, backend="nnsight", dtype=DTYPE, device=DEVICE)
ids = json.loads(Path(ids_path).read_text())
attribute(torch.tensor(ids[:8]), model, max_feature_nodes=8, batch_size=min(batch_size, 8))  # warm-up
synchronize()
start = time.perf_counter()
graph = attribute(torch.tensor(ids), model, max_feature_nodes=max_nodes, batch_size=batch_size)
synchronize()
seconds = time.perf_counter() - start
n_sel = len(graph.selected_features)
n_pos = len(graph.input_tokens)  # it prepends BOS when the prompt lacks one
logit_row = n_sel + n_layers * n_pos + n_pos  # the first (top) logit node
row = graph.adjacency_matrix[logit_row].float().cpu()
feature_edges = {
    "_".join(map(str, graph.active_features[graph.selected_features[j]].tolist())): float(row[j]) for j in range(n_sel)
}
embed_edges = [float(row[n_sel + n_layers * n_pos + p]) for p in range(n_pos)]
Path(out).write_text(json.dumps({
    "seconds": seconds, "peak_mb": peak_mb(),
    "n_active": int(graph.active_features.shape[0]), "n_selected": n_sel, "tokens": graph.input_tokens.tolist(),
    "top_logit": int(graph.logit_targets[0].vocab_idx) if hasattr(graph.logit_targets[0], "vocab_idx") else None,
    "feature_edges": feature_edges, "embed_edges": embed_edges,
}))  # fmt: skip
print(json.dumps({"seconds": seconds}))
