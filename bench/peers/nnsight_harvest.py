"""nnsight 0.8 doing the harvest job: a block's output at valid tokens of the same batches, early stop,
on the bench's device and dtype (_device)."""

import numpy as np
import torch
from _device import DEVICE, DTYPE
from _job import load_batches, time_job
from nnsight import TransformersModel

model_dir, ids, att, valid, layer = load_batches()
placement = {} if DEVICE.type == "cpu" else {"device_map": str(DEVICE)}
model = TransformersModel(model_dir, task="text-generation", dispatch=True, dtype=DTYPE, **placement)
model.eval()


def one(b: int) -> np.ndarray:
    inputs = {"input_ids": ids[b].to(DEVICE), "attention_mask": att[b].to(DEVICE)}
    with torch.no_grad(), model.trace(inputs) as tracer:
        hidden = model.model.layers[layer].output.save()
        tracer.stop()
    h = hidden[0] if isinstance(hidden, tuple) else hidden
    return h[torch.from_numpy(valid[b]).to(h.device)].float().cpu().numpy()


time_job(one, len(ids), ids.numel())
