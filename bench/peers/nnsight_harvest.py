"""nnsight 0.8 doing the harvest job: a block's output at valid tokens of the same batches, early stop."""

import numpy as np
import torch
from _job import load_batches, time_job
from nnsight import TransformersModel

model_dir, ids, att, valid, layer = load_batches()
model = TransformersModel(model_dir, task="text-generation", dispatch=True, dtype=torch.float32)
model.eval()


def one(b: int) -> np.ndarray:
    with torch.no_grad(), model.trace({"input_ids": ids[b], "attention_mask": att[b]}) as tracer:
        hidden = model.model.layers[layer].output.save()
        tracer.stop()
    h = hidden[0] if isinstance(hidden, tuple) else hidden
    return h[torch.from_numpy(valid[b])].numpy().astype(np.float32)


time_job(one, len(ids), ids.numel())
