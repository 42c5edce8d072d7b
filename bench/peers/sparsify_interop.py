"""Runs inside the eai-sparsify venv for the format tests: make a SparseCoder, save it, run it.

sparsify_interop.py DIR inputs.npz outputs.npz [transcode]
"""

import sys

import numpy as np
import torch
from sparsify import SparseCoder, SparseCoderConfig

folder, inputs, out = sys.argv[1:4]
transcode = len(sys.argv) > 4
x = torch.from_numpy(np.load(inputs)["x"])
coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=64, k=5, transcode=transcode, skip_connection=transcode))
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in coder.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    coder.save_to_disk(folder)
    enc = coder.encode(x)
    recon = coder.decode(enc.top_acts, enc.top_indices)
    if coder.W_skip is not None:
        recon = recon + x @ coder.W_skip.mT
np.savez(out, recon=recon.numpy())
