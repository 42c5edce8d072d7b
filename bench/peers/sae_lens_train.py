"""sae-lens 6: its SAETrainer on a TopK training SAE, fed the same batches (Adam, its defaults)."""

import time

import torch
from _train_data import args, batches, report
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

train, heldout, width, k, batch_size, steps = args()
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=width, k=k))
cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=2e-4 * (16384 / width) ** 0.5, lr_end=2e-5 * (16384 / width) ** 0.5,
                       n_batches_for_norm_estimate=1)  # fmt: skip
trainer = SAETrainer(cfg, sae, data_provider=batches(train, batch_size, steps + 1))
start = time.perf_counter()
trainer.fit()
seconds = time.perf_counter() - start
with torch.no_grad():
    sae.eval()
    codes = sae.encode(heldout)
    report(seconds, steps * batch_size, sae.decode(codes), heldout, (codes > 0).any(0))
