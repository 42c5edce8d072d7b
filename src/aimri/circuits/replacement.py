"""The local replacement model: a prompt's forward pass on the Hugging Face modules in which every MLP is
a transcoder plus an error term, attention patterns and normalisation denominators are frozen, so that
the pass is linear from feature activations (and token embeddings and errors) to everything downstream.

Nothing is re-implemented. Each frozen piece returns HF's own output value, `out.detach() + (lin - lin.detach())`,
so the logits are exactly the model's, while gradients follow the linear map `lin`:
  - attention: the query and key handed to the model's own attention kernel are detached, so the pattern
    is a constant and only values carry gradient;
  - norms: x·(1/rms(x)) with the denominator detached (LayerNorm: the centring stays linear);
  - MLPs: the transcoder's reconstruction from its feature activations, which are leaf tensors (the graph's
    nodes), plus the error node, out − reconstruction, a constant.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_utils import AttentionInterface

from aimri.dictionaries.base import Dictionary
from aimri.errors import AimriError
from aimri.subject.adapters import get_module
from aimri.subject.core import Subject


def _freeze_pattern(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """The model's own attention kernel with the pattern held constant (query and key detached)."""

    def frozen(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        return kernel(module, query.detach(), key.detach(), value, *args, **kwargs)

    return frozen


@contextmanager
def _frozen_attention(subject: Subject) -> Iterator[None]:
    """Swap the attention kernel the model uses for its pattern-frozen version, for the duration: the
    registered kernel (sdpa, flash, ...) in transformers' table, or the modeling file's eager function."""
    attn = get_module(subject.layer(0), subject.adapter.attn)
    config: Any = getattr(attn, "config", None) or subject.config
    impl = str(config._attn_implementation or "eager")
    if impl == "eager":
        owner: Any = sys.modules[type(attn).__module__]
        original = owner.eager_attention_forward
        owner.eager_attention_forward = _freeze_pattern(original)
        try:
            yield
        finally:
            owner.eager_attention_forward = original
        return
    table = AttentionInterface._global_mapping
    if impl not in table:
        raise AimriError(
            f"cannot freeze attention implemented as {impl!r}; load the model with sdpa or eager attention"
        )
    original = table[impl]
    table[impl] = _freeze_pattern(original)
    try:
        yield
    finally:
        table[impl] = original


@dataclass
class Replaced:
    """One prompt through the replacement model. `codes[L]` [seq, d_sae], `errors[L]` [seq, d] (the error
    nodes) and `embeddings` [seq, d] are leaves (requires_grad): their gradients are direct linear effects."""

    logits: Tensor
    codes: dict[int, Tensor]
    errors: dict[int, Tensor]
    embeddings: Tensor
    mlp_inputs: dict[int, Tensor]


def _norm_modules(subject: Subject) -> list[tuple[str, nn.Module]]:
    out = []
    for name, module in subject.model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.LayerNorm) or kind.endswith("RMSNorm"):
            out.append((name, module))
    return out


def _frozen_norm(name: str, module: nn.Module):  # type: ignore[no-untyped-def]
    eps = float(getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-6)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        xf = x.float()
        if isinstance(mod, nn.LayerNorm):
            centred = xf - xf.mean(-1, keepdim=True)
            scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()
            candidates = [centred * scale * (weight if weight is not None else 1) + (bias if bias is not None else 0)]
        else:
            normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
            candidates = [normed] if weight is None else [normed * weight.float(), normed * (1.0 + weight.float())]
        for lin in candidates:
            lin = lin.to(out.dtype)
            if torch.allclose(lin.detach(), out.detach(), rtol=1e-3, atol=1e-4):
                return out.detach() + (lin - lin.detach())
        raise AimriError(
            f"cannot freeze the norm {name} ({type(mod).__name__}): its convention is not RMSNorm or LayerNorm"
        )

    return hook


def load_transcoders(folder: str | Path, subject: Subject) -> dict[int, Dictionary]:
    """Transcoders saved by `mri train-transcoders` (FOLDER/layer-L), checked against the subject."""
    from aimri.dictionaries import load_dictionary

    folder = Path(folder)
    if not folder.is_dir():
        raise AimriError(f"{folder} is not a folder of transcoders; make one with `mri train-transcoders`")
    found: dict[int, Dictionary] = {}
    for sub in sorted(folder.glob("layer-*")):
        if (sub / "cfg.json").exists():
            tc = load_dictionary(sub)
            layer = int(sub.name.removeprefix("layer-"))
            revision = tc.cfg.model_revision
            if revision and subject.revision != "unknown" and revision != subject.revision:
                raise AimriError(
                    f"{sub} was trained on another model (revision {revision[:12]}, not {subject.revision[:12]})"
                )
            found[layer] = tc
    if not found:
        raise AimriError(f"{folder} holds no transcoders (expected layer-0 ... layer-{subject.n_layers - 1})")
    return found


class ReplacementModel:
    """A Subject with a transcoder (mlp.in.L -> mlp.out.L) at every layer."""

    def __init__(self, subject: Subject, transcoders: Mapping[int, Dictionary]) -> None:
        missing = [layer for layer in range(subject.n_layers) if layer not in transcoders]
        if missing:
            raise AimriError(
                f"the transcoder set is incomplete: layers {missing} have none (train them with `mri train-transcoders`)"
            )
        for layer, tc in transcoders.items():
            want = (f"mlp.in.{layer}", f"mlp.out.{layer}")
            if (tc.cfg.site, tc.cfg.site_out) != want:
                raise AimriError(
                    f"the transcoder for layer {layer} maps {tc.cfg.site} -> {tc.cfg.site_out or '?'}, not {want[0]} -> {want[1]}"
                )
            if tc.cfg.d_in != subject.d_model or tc.cfg.out_dim != subject.d_model:
                raise AimriError(
                    f"the transcoder for layer {layer} is {tc.cfg.d_in} -> {tc.cfg.out_dim} wide but {subject.name} has "
                    f"d_model {subject.d_model}: it belongs to another model"
                )
        self.subject, self.transcoders = subject, dict(transcoders)

    @contextmanager
    def _frozen(self, state: dict[str, Any]) -> Iterator[None]:
        subj = self.subject
        handles = []
        for name, module in _norm_modules(subj):
            handles.append(module.register_forward_hook(_frozen_norm(name, module)))
        for layer, tc in self.transcoders.items():
            block = subj.layer(layer)
            handles.append(
                get_module(block, subj.adapter.mlp).register_forward_pre_hook(self._read_input(layer, state))
            )
            handles.append(
                get_module(block, subj.adapter.mlp_out_module).register_forward_hook(self._replace(layer, tc, state))
            )
        embed = subj.model.get_input_embeddings()  # type: ignore[operator]
        handles.append(embed.register_forward_hook(self._embed_leaf(state)))
        try:
            with _frozen_attention(subj):
                yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _embed_leaf(state: dict[str, Any]):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            leaf = (out if state["batched"] else out[0]).detach().clone().requires_grad_(True)
            state["embeddings"] = leaf
            return leaf if state["batched"] else leaf[None]

        return hook

    @staticmethod
    def _read_input(layer: int, state: dict[str, Any]):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0] if args else (kwargs or {})["hidden_states"]
            state.setdefault("inputs", {})[layer] = x

        return hook

    @staticmethod
    def _replace(layer: int, tc: Dictionary, state: dict[str, Any]):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            true = out[0] if isinstance(out, tuple) else out
            x = state["inputs"][layer]
            batched = state["batched"]
            with torch.no_grad():  # every copy holds the same prompt: encode one, copy the codes
                codes = tc.encode(x[0].detach().float())
                codes = codes.expand(x.shape[0], *codes.shape).clone() if batched else codes
            leaf = codes.requires_grad_(True)  # [seq, d_sae], or [batch, seq, d_sae]
            recon = leaf @ tc.W_dec.detach() + tc.b_dec.detach()
            recon = recon if batched else recon[None]
            if tc.W_skip is not None:
                recon = recon + x.float() @ tc.W_skip.detach()
            recon = recon.to(true.dtype)
            error = (true - recon).detach()
            error = (error if batched else error[0]).requires_grad_(True)  # the error node, a leaf too
            state.setdefault("codes", {})[layer] = leaf
            state.setdefault("errors", {})[layer] = error
            lin = recon + (error if batched else error[None])
            new = true.detach() + (lin - lin.detach())
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    def run(self, input_ids: Tensor, copies: int = 0) -> Replaced:
        """One prompt ([seq] or [1, seq]); returns logits [seq, vocab] equal to the model's, and the nodes.
        With `copies` = B > 0 the prompt runs B times side by side and every tensor keeps a batch dimension:
        B independent backward passes in one (row b's gradient answers row b's target)."""
        ids = input_ids.reshape(1, -1)
        if ids.shape[1] == 0:
            raise AimriError("the prompt is empty")
        if ids.shape[1] > self.subject.context_length:
            raise AimriError(
                f"a prompt of {ids.shape[1]} tokens exceeds {self.subject.name}'s context of {self.subject.context_length}"
            )
        state: dict[str, Any] = {"batched": copies > 0}
        with torch.enable_grad(), self._frozen(state):
            out = self.subject.model(input_ids=ids.expand(max(1, copies), -1).to(self.subject.device), use_cache=False)
        inputs = state["inputs"] if copies else {k: v[0] for k, v in state["inputs"].items()}
        return Replaced(
            logits=out.logits if copies else out.logits[0], codes=state["codes"], errors=state["errors"],
            embeddings=state["embeddings"], mlp_inputs=inputs,
        )  # fmt: skip
