"""nnsight 0.8 doing the harvest job: resid (layer output) at valid tokens of the same batches, early stop."""

import json
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from nnsight import TransformersModel

model_dir, batches_path, layer = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = np.load(batches_path)
ids, att, valid = torch.from_numpy(data["ids"]), torch.from_numpy(data["attention"]), data["valid"]
model = TransformersModel(model_dir, task="text-generation", dispatch=True, dtype=torch.float32)
model.eval()


def one(b: int) -> np.ndarray:
    with torch.no_grad(), model.trace({"input_ids": ids[b], "attention_mask": att[b]}) as tracer:
        hidden = model.model.layers[layer].output.save()
        tracer.stop()
    h = hidden[0] if isinstance(hidden, tuple) else hidden
    return h[torch.from_numpy(valid[b])].numpy().astype(np.float32)


one(0)  # warm-up
out = tempfile.mkdtemp()
elapsed = float("inf")
for _ in range(2):  # best of two passes, as for ours
    start = time.perf_counter()
    rows = [one(b) for b in range(len(ids))]
    for b, r in enumerate(rows):  # the same job as a harvest: the rows end up on disk
        np.save(f"{out}/batch{b}.npy", r)
    elapsed = min(elapsed, time.perf_counter() - start)
shutil.rmtree(out)
print(
    json.dumps(
        {
            "tokens_per_s": ids.numel() / elapsed,
            "rows": int(sum(len(r) for r in rows)),
            "checksum": float(sum(float(r.astype(np.float64).sum()) for r in rows)),
        }
    )
)
