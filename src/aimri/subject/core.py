"""The Subject: the model under examination, its tokenizer, and its architecture adapter."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from aimri.devices import dtype_name
from aimri.errors import AimriError
from aimri.subject.adapters import Adapter, adapter_for, get_module
from aimri.subject.sites import Site, all_site_names, parse_site
from aimri.subject.taps import Edit, EditValue, Tap


@dataclass
class Subject:
    """A Hugging Face causal LM plus what AI MRI needs to address its internals.

    `revision` is a content hash of the weights (or their source file), recorded in every artifact
    so a store harvested from one model is never mixed with another.
    """

    model: nn.Module
    tokenizer: Any = None
    name: str = "model"
    revision: str = "unknown"
    adapter: Adapter = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = adapter_for(self.model)
        self.model.eval()
        text = self.config
        self.n_layers: int = int(text.num_hidden_layers)
        self.d_model: int = int(text.hidden_size)
        self.n_heads: int = int(text.num_attention_heads)
        self.head_dim: int = int(getattr(text, "head_dim", None) or self.d_model // self.n_heads)
        self.context_length: int = int(getattr(text, "max_position_embeddings", 0) or 2048)
        self._layers = get_module(self.model, self.adapter.layers)

    @property
    def config(self) -> Any:
        cfg: Any = getattr(self.model, "config")  # noqa: B009 (nn.Module has no typed config)
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first placed module's device for a device_map'd model (accelerate's hooks
        move weights offloaded to cpu or disk in and out), else the parameters' device."""
        placed = getattr(self.model, "hf_device_map", None)
        if placed:
            first = next(iter(placed.values()))
            if first in ("cpu", "disk"):
                return torch.device("cpu")
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def _dtype_tag(self) -> str:
        return "" if self.dtype == torch.float32 else f"@{dtype_name(self.dtype)}"

    @property
    def cache_key(self) -> str:
        """What a cached result of this model is keyed by: the revision, plus the dtype when it is not fp32
        (a bf16 model's answers and statistics differ from the fp32 ones; fp32 keys are the plain revision)."""
        return self.revision + self._dtype_tag

    @property
    def cache_folder(self) -> str:
        """`cache_key` as a folder name: the revision's first 24 characters, plus the dtype when not fp32."""
        return self.revision[:24] + self._dtype_tag

    def layer(self, index: int) -> nn.Module:
        return self._layers[index]  # type: ignore[index]

    def site(self, name: str | Site) -> Site:
        return name if isinstance(name, Site) else parse_site(name, self.n_layers, self.n_heads)

    def sites(self) -> list[str]:
        return all_site_names(self.n_layers)

    def site_dim(self, name: str | Site) -> int:
        """Width of a site's activations: the MLP's hidden width for mlp.neurons, else the residual's."""
        if self.site(name).kind == "mlp.neurons":
            return int(
                getattr(self.config, "intermediate_size", None)
                or getattr(self.config, "n_inner", None)
                or 4 * self.d_model
            )
        return self.d_model

    def tap(
        self,
        read: Iterable[str] = (),
        edit: Mapping[str, EditValue | Edit] | Iterable[Edit] | None = None,
        stop: bool = False,
        grad: bool = False,
    ) -> Tap:
        return Tap(self, read=read, edit=edit, stop=stop, grad=grad)

    def run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        read: Iterable[str] = (),
        edit: Mapping[str, EditValue | Edit] | Iterable[Edit] | None = None,
        stop: bool = True,
        grad: bool = False,
    ) -> dict[str, Tensor]:
        """One forward pass that returns the read Sites' activations ([batch, seq, d]); with
        `stop=False` the logits are returned too, under the key "logits" ([batch, seq, vocab]).

        `input_ids` is [batch, seq]; `attention_mask` [batch, seq] has 1 = token, 0 = padding. Padded batches
        are exact: with left or right padding, each row's real tokens get the activations and logits of that
        prompt run alone (to float rounding), for every supported architecture (position ids are derived
        from the mask, see Tap.forward). Padding positions hold meaningless values and are never edited.
        """
        read = list(read)
        if input_ids.shape[-1] > self.context_length:
            raise AimriError(
                f"input of {input_ids.shape[-1]} tokens exceeds {self.name}'s context of {self.context_length}; "
                "split it into windows (aimri.data.corpus.pack does this)"
            )
        device = self.device
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
        with torch.set_grad_enabled(grad), self.tap(read=read, edit=edit, stop=stop, grad=grad) as t:
            out = t.forward(**kwargs)
        acts = t.acts
        if out is not None:
            acts["logits"] = out.logits
        return acts

    def __repr__(self) -> str:
        return (
            f"Subject({self.name!r}, {type(self.model).__name__}, layers={self.n_layers}, "
            f"d_model={self.d_model}, revision={self.revision[:12]})"
        )
