"""Architecture adapters: where each Site lives in a Hugging Face model's module tree.

To support a new architecture, register an Adapter for its `config.model_type`:

    from aimri.subject.adapters import Adapter, register_adapter
    register_adapter("phi3", Adapter(layers="model.layers", attn="self_attn", o_proj="self_attn.o_proj"))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from aimri.errors import AimriError


@dataclass(frozen=True)
class Adapter:
    """Module paths relative to the model (`layers`) or to one decoder layer (the rest).

    `attn_out` / `mlp_out` name the module whose *output* is what the block adds to the residual
    (Gemma normalises after attention and after the MLP, so those sites sit on the norms).
    """

    layers: str
    attn: str
    o_proj: str
    mlp: str = "mlp"
    attn_out: str | None = None
    mlp_out: str | None = None
    down_proj: str = "mlp.down_proj"  # its input is the MLP's neurons (site mlp.neurons.L)
    o_proj_is_conv1d: bool = False  # GPT-2's Conv1D stores weight as [in, out]

    @property
    def attn_out_module(self) -> str:
        return self.attn_out or self.attn

    @property
    def mlp_out_module(self) -> str:
        return self.mlp_out or self.mlp


_LLAMA = Adapter(layers="model.layers", attn="self_attn", o_proj="self_attn.o_proj")
_GEMMA = Adapter(
    layers="model.layers",
    attn="self_attn",
    o_proj="self_attn.o_proj",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": Adapter(
        layers="model.language_model.layers",
        attn="self_attn",
        o_proj="self_attn.o_proj",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
    ),
    "gpt2": Adapter(
        layers="transformer.h", attn="attn", o_proj="attn.c_proj", down_proj="mlp.c_proj", o_proj_is_conv1d=True
    ),
    "gpt_neox": Adapter(
        layers="gpt_neox.layers", attn="attention", o_proj="attention.dense", down_proj="mlp.dense_4h_to_h"
    ),
}


def register_adapter(model_type: str, adapter: Adapter) -> None:
    """Teach AI MRI a new architecture (keyed by Hugging Face `config.model_type`)."""
    ADAPTERS[model_type] = adapter


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise AimriError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(sorted(ADAPTERS))}; "
            "add one with aimri.subject.adapters.register_adapter(model_type, Adapter(layers=..., attn=..., o_proj=...))"
        )
    return ADAPTERS[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return module
