"""Runs inside the sae-lens venv for the format tests: load a folder and run it, or make and save one.

sae_lens_interop.py run DIR inputs.npz outputs.npz
sae_lens_interop.py make ARCH DIR inputs.npz outputs.npz     (ARCH: topk, jumprelu, standard, transcoder)
"""

import sys

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig


def outputs(sae, x: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        codes = sae.encode(x)
        recon = sae.decode(codes)
        if isinstance(sae, SkipTranscoder):
            recon = recon + x @ sae.W_skip.T
    np.savez(path, codes=codes.numpy(), recon=recon.numpy())


def main() -> None:
    if sys.argv[1] == "run":
        folder, inputs, out = sys.argv[2:5]
        outputs(SAE.load_from_disk(folder), torch.from_numpy(np.load(inputs)["x"]), out)
        return
    arch, folder, inputs, out = sys.argv[2:6]
    x = torch.from_numpy(np.load(inputs)["x"])
    d_in, d_sae = x.shape[1], 64
    meta = {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny"}
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
    elif arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    else:
        sae = SkipTranscoder(SkipTranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_in, apply_b_dec_to_input=False))
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if name == "threshold" else 0.3))
            if name == "threshold":
                p.abs_()
    sae.save_model(folder)
    outputs(sae, x, out)


main()
