"""transformer-lens 4.x (TransformerBridge) doing the harvest job: resid_post of one block at valid
tokens of the same batches, with run_with_cache(names_filter, stop_at_layer)."""

import numpy as np
import torch
from _device import DEVICE, DTYPE
from _job import load_batches, time_job
from transformer_lens.model_bridge import TransformerBridge

model_dir, ids, att, valid, layer = load_batches()
bridge = TransformerBridge.boot_transformers(model_dir, device=str(DEVICE), dtype=DTYPE)
hook = f"blocks.{layer}.hook_resid_post"


def one(b: int) -> np.ndarray:
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids[b].to(DEVICE), names_filter=hook, stop_at_layer=layer + 1,
                                         attention_mask=att[b].to(DEVICE))  # fmt: skip
    h = cache[hook]
    return h[torch.from_numpy(valid[b]).to(h.device)].float().cpu().numpy()


time_job(one, len(ids), ids.numel())
