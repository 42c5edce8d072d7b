"""eai-sparsify 1.x: its SparseCoder and its training step (as in sparsify.Trainer: unit-norm decoder,
b_dec at the first batch's mean, FVU loss, parallel-gradient removal, default signum optimizer)."""

import time

import torch
from _train_data import args, batches, report
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD

train, heldout, width, k, batch_size, steps = args()
torch.manual_seed(0)
sae = SparseCoder(train.shape[1], SparseCoderConfig(num_latents=width, k=k))
opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (width / 2**14) ** 0.5)]), momentum=0.95)
opt.train()
start = time.perf_counter()
for step, x in enumerate(batches(train, batch_size, steps)):
    if step == 0:
        sae.b_dec.data = x.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    out = sae(x=x, y=x, dead_mask=None)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
seconds = time.perf_counter() - start
opt.eval()
with torch.no_grad():
    enc = sae.encode(heldout)
    fired = torch.zeros(width, dtype=torch.bool)
    fired[enc.top_indices.flatten()] = True
    report(seconds, steps * batch_size, sae.decode(enc.top_acts, enc.top_indices), heldout, fired)
