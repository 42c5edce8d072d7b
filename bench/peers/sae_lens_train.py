"""sae-lens 6: its SAETrainer on a TopK training SAE, fed the same batches (Adam, its defaults), on the
bench's device (_device). Two untimed warm-up steps on a throwaway SAE first, as for ours."""

import time

import torch
from _device import DEVICE, synchronize
from _train_data import args, batches, report
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

train, heldout, width, k, batch_size, steps = args()


def trainer(n_steps: int, data) -> tuple[TopKTrainingSAE, SAETrainer]:  # type: ignore[no-untyped-def]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=width, k=k, device=str(DEVICE)))
    cfg = SAETrainerConfig(total_training_samples=n_steps * batch_size, train_batch_size_samples=batch_size,
                           lr=2e-4 * (16384 / width) ** 0.5, lr_end=2e-5 * (16384 / width) ** 0.5,
                           n_batches_for_norm_estimate=1, device=str(DEVICE))  # fmt: skip
    return sae, SAETrainer(cfg, sae, data_provider=data)


_, warm = trainer(min(2, steps), batches(train, batch_size, min(2, steps) + 1))
warm.fit()
del warm
data = list(batches(train, batch_size, steps + 1))  # on a GPU: uploaded once, before the clock
torch.manual_seed(0)
sae, fit = trainer(steps, iter(data))
synchronize()
start = time.perf_counter()
fit.fit()
synchronize()
seconds = time.perf_counter() - start
with torch.no_grad():
    sae.eval()
    codes = sae.encode(heldout)
    report(seconds, steps * batch_size, sae.decode(codes), heldout, (codes > 0).any(0))
