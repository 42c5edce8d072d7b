"""eai-sparsify 1.x: its SparseCoder and its training step (as in sparsify.Trainer: unit-norm decoder,
b_dec at the first batch's mean, FVU loss, parallel-gradient removal, default signum optimizer), on the
bench's device (_device); on CUDA its decoder runs its Triton kernels (sparsify.utils.decoder_impl).
Two untimed warm-up steps on a throwaway coder first (kernel compilation, GEMM selection), as for ours."""

import time

import torch
from _device import DEVICE, synchronize
from _train_data import args, batches, report
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD

train, heldout, width, k, batch_size, steps = args()


def coder_and_optimizer() -> tuple[SparseCoder, ScheduleFreeWrapper]:
    sae = SparseCoder(train.shape[1], SparseCoderConfig(num_latents=width, k=k), device=DEVICE)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (width / 2**14) ** 0.5)]), momentum=0.95)
    opt.train()
    return sae, opt


def step(sae: SparseCoder, opt: ScheduleFreeWrapper, x: torch.Tensor, first: bool) -> None:
    if first:
        sae.b_dec.data = x.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    out = sae(x=x, y=x, dead_mask=None)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()


warm_sae, warm_opt = coder_and_optimizer()
for s, x in enumerate(batches(train, batch_size, min(2, steps))):
    step(warm_sae, warm_opt, x, s == 0)
del warm_sae, warm_opt
data = list(batches(train, batch_size, steps))  # on a GPU: uploaded once, before the clock
torch.manual_seed(0)
sae, opt = coder_and_optimizer()
synchronize()
start = time.perf_counter()
for s, x in enumerate(data):
    step(sae, opt, x, s == 0)
synchronize()
seconds = time.perf_counter() - start
opt.eval()
with torch.no_grad():
    enc = sae.encode(heldout)
    fired = torch.zeros(width, dtype=torch.bool, device=heldout.device)
    fired[enc.top_indices.flatten()] = True
    report(seconds, steps * batch_size, sae.decode(enc.top_acts, enc.top_indices), heldout, fired)
