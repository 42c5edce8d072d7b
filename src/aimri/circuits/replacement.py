"""The local replacement model: a prompt's forward pass on the Hugging Face modules in which every MLP is
a transcoder (per-layer transcoders, or a cross-layer transcoder whose layer-L output sums the decoders of the
features of layers <= L) plus an error term, attention patterns and normalisation denominators are frozen, so that
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

import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_utils import AttentionInterface

from aimri.dictionaries.base import Dictionary, DictionaryConfig
from aimri.dictionaries.clt import CrossLayerTranscoder
from aimri.dictionaries.match import check_model
from aimri.errors import AimriError
from aimri.run import Run
from aimri.subject.adapters import get_module
from aimri.subject.core import Subject


def _freeze_pattern(kernel: Callable[..., Any], state: dict[str, Any]) -> Callable[..., Any]:
    """The model's own attention kernel with the pattern held constant (query and key detached). For QK
    attribution (aimri.circuits.qk), the query and key handed to the kernel of layer state["capture"] are kept,
    with the gradient they carry, and state["freeze_values"] detaches the values too (no path crosses positions)."""

    def frozen(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if state.get("capture") is not None and getattr(module, "layer_idx", None) == state["capture"]:
            state["qk"] = (query, key, kwargs.get("scaling"), module)
        if state.get("freeze_values"):
            value = value.detach()
        return kernel(module, query.detach(), key.detach(), value, *args, **kwargs)

    return frozen


@contextmanager
def _frozen_attention(subject: Subject, state: dict[str, Any]) -> Iterator[None]:
    """Swap the attention kernel the model uses for its pattern-frozen version, for the duration: the
    registered kernel (sdpa, flash, ...) in transformers' table, or the modeling file's eager function."""
    attn = get_module(subject.layer(0), subject.adapter.attn)
    config: Any = getattr(attn, "config", None) or subject.config
    impl = str(config._attn_implementation or "eager")
    if impl == "eager":
        owner: Any = sys.modules[type(attn).__module__]
        original = owner.eager_attention_forward
        owner.eager_attention_forward = _freeze_pattern(original, state)
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
    table[impl] = _freeze_pattern(original, state)
    try:
        yield
    finally:
        table[impl] = original


@dataclass
class Replaced:
    """One prompt through the replacement model. `codes[L]` [n_active] holds layer L's active feature
    activations, at positions and feature indices `active[L]` = (pos, idx); with `errors[L]` [seq, d] (the
    error nodes) and `embeddings` [seq, d] they are the leaves (requires_grad) whose gradients are direct
    linear effects. Only active features are leaves: decoding is a sparse sum of their decoder rows."""

    logits: Tensor
    codes: dict[int, Tensor]
    active: dict[int, tuple[Tensor, Tensor]]
    errors: dict[int, Tensor]
    embeddings: Tensor
    mlp_inputs: dict[int, Tensor]
    # what `run(options=...)` asked to keep (aimri.circuits.qk): "qk" (query, key, scaling, module) of the
    # captured layer, "heads" {layer: the attention output projection's input [copies, seq, heads x head_dim]},
    # "biases" {layer: the decoder bias leaf [copies, 1, d]}
    kept: dict[str, Any] = field(default_factory=dict)


def _norm_modules(subject: Subject) -> list[tuple[str, nn.Module]]:
    out = []
    for name, module in subject.model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.LayerNorm) or kind.endswith("RMSNorm"):
            out.append((name, module))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _norm_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for matching a norm's output recomputed in fp32 against the model's own in `dtype`: a
    few units in the last place of `dtype`, never tighter than fp32's (1e-3, 1e-4)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-3, 4 * eps), max(1e-4, 4 * eps)


def _frozen_norm(name: str, module: nn.Module):  # type: ignore[no-untyped-def]
    """(pre-hook, hook): the norm runs on a detached input (autograd records nothing of it) and its output
    is replaced by the same values computed linearly from the real input, the denominator held constant."""
    eps = float(getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-6)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    held: list[Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> tuple:
        held.append(args[0])
        return (args[0].detach(), *args[1:])

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        xf = held.pop().float()
        if isinstance(mod, nn.LayerNorm):
            centred = xf - xf.mean(-1, keepdim=True)
            scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + eps)
            lin = centred * scale
            if weight is not None:
                lin = lin * weight.float()
            candidates = [lin if bias is None else lin + bias.float()]
        else:
            normed = xf * torch.rsqrt(xf.detach().pow(2).mean(-1, keepdim=True) + eps)
            candidates = [normed] if weight is None else [normed * weight.float(), normed * (1.0 + weight.float())]
        # a half-precision norm rounds once or twice (Llama: normed.to(dtype) * weight; Gemma: the product):
        # the tolerance is a few units of the output dtype's last place, never below fp32's
        rtol, atol = _norm_tolerance(out.dtype)
        target = out.detach().float()
        for lin in candidates:
            if torch.allclose(lin.detach(), target, rtol=rtol, atol=atol):
                return out + (lin - lin.detach()).to(out.dtype)
        raise AimriError(
            f"cannot freeze the norm {name} ({type(mod).__name__}, {_dtype_name(out.dtype)}): neither the RMSNorm nor "
            f"the LayerNorm convention reproduces its {_dtype_name(out.dtype)} output (rtol {rtol:g})"
        )

    return pre, hook


# per-layer transcoders {layer: mlp.in.L -> mlp.out.L}, or one cross-layer transcoder
Transcoders = Mapping[int, Dictionary] | CrossLayerTranscoder


def load_transcoders(folder: str | Path, subject: Subject, allow_other_model: bool = False) -> Transcoders:
    """Transcoders saved by `mri train-transcoders` (FOLDER/layer-L), or a cross-layer transcoder (`mri
    train-clt`, circuit-tracer's or Gemma Scope 2's files: aimri.dictionaries.clt_formats), checked against the
    subject: trained on this model (aimri.dictionaries.match; `allow_other_model` for a deliberate transfer), its
    layer count and width those of the model, placed on the Subject's device."""
    from aimri.dictionaries import load_dictionary
    from aimri.dictionaries.clt_formats import check_clt, is_clt, load_clt

    folder = Path(folder)
    if not folder.is_dir():
        raise AimriError(
            f"{folder} is not a folder of transcoders; make one with `mri train-transcoders` (per-layer) or "
            "`mri train-clt` (a cross-layer transcoder)"
        )
    if is_clt(folder):
        clt = load_clt(folder)
        check_clt(clt, subject, allow_other_model, folder)
        return clt.to(subject.device)
    found: dict[int, Dictionary] = {}
    for layer in range(subject.n_layers):
        sub = Run.transcoder_layer(folder, layer)
        if (sub / "cfg.json").exists():
            tc = load_dictionary(sub).to(subject.device)  # on the model's device, like its MLPs
            check_model(tc, subject, allow_other_model, sub)
            found[layer] = tc
    if not found:
        raise AimriError(f"{folder} holds no transcoders (expected layer-0 ... layer-{subject.n_layers - 1})")
    return found


class ReplacementModel:
    """A Subject with a transcoder (mlp.in.L -> mlp.out.L) at every layer, or one cross-layer transcoder."""

    def __init__(self, subject: Subject, transcoders: Transcoders) -> None:
        self.subject = subject
        self._keeps_logits = "logits_to_keep" in inspect.signature(subject.model.forward).parameters
        self.clt: CrossLayerTranscoder | None = None
        self.transcoders: dict[int, Dictionary] = {}
        if isinstance(transcoders, CrossLayerTranscoder):
            from aimri.dictionaries.clt_formats import check_clt

            check_clt(transcoders, subject, allow_other_model=True)  # shapes; the revision was checked at loading
            self.clt = transcoders
            return
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
        self.transcoders = dict(transcoders)

    # -- what attribution reads of either kind -------------------------------------------------------------
    def configs(self) -> list[DictionaryConfig]:
        """Each layer's encoder as a transcoder config (for the prompt's opening: match.prompt_ids)."""
        if self.clt is not None:
            return [self.clt.cfg.layer_config(layer) for layer in range(self.clt.n_layers)]
        return [tc.cfg for tc in self.transcoders.values()]

    def encoder(self, layer: int) -> Tensor:
        """[d_model, width]: layer L's encoder (a feature's pre-activation is mlp_in @ encoder[:, i] + b_enc[i])."""
        return self.clt.encoder(layer) if self.clt is not None else self.transcoders[layer].W_enc

    def decoder_rows(self, layer: int) -> Tensor:
        """[width, n_out x d_model]: what layer L's features write (a CLT: to every layer side by side, zeros
        before L, so rows of different layers compare)."""
        if self.clt is not None:
            rows = self.clt.W_dec[layer].detach().flatten(1)
            return F.pad(rows, (layer * self.clt.cfg.d_model, 0))
        return self.transcoders[layer].W_dec.detach()

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Layer L's feature activations [rows, width] from its MLP input [rows, d_model]."""
        if self.clt is not None:
            return self.clt.encode(layer, x)
        tc = self.transcoders[layer]
        return tc.encode(x.to(tc.W_enc))

    @contextmanager
    def _frozen(self, state: dict[str, Any]) -> Iterator[None]:
        subj = self.subject
        handles = []
        for name, module in _norm_modules(subj):
            pre, hook = _frozen_norm(name, module)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(hook)]
        for layer in range(subj.n_layers):
            block = subj.layer(layer)
            handles.append(
                get_module(block, subj.adapter.mlp).register_forward_pre_hook(self._read_input(layer, state))
            )
            handles.append(
                get_module(block, subj.adapter.mlp_out_module).register_forward_hook(self._replace(layer, state))
            )
        embed = subj.model.get_input_embeddings()  # type: ignore[operator]
        handles.append(embed.register_forward_hook(self._embed_leaf(state)))
        if state.get("capture_heads"):
            for layer in range(subj.n_layers):
                o_proj = get_module(subj.layer(layer), subj.adapter.o_proj)
                handles.append(o_proj.register_forward_pre_hook(self._keep_heads(layer, state)))
        try:
            with _frozen_attention(subj, state):
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
    def _keep_heads(layer: int, state: dict[str, Any]):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            if state.get("freeze_values"):  # a constant then: made a leaf, so gradients can be read at it
                z = args[0].detach().requires_grad_(True)
                state.setdefault("heads", {})[layer] = z
                return (z, *args[1:])
            state.setdefault("heads", {})[layer] = args[0]
            return None

        return hook

    @staticmethod
    def _read_input(layer: int, state: dict[str, Any]):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            if not args:
                return None
            state.setdefault("inputs", {})[layer] = args[0]
            # the MLP's own output is only read (its error node is a leaf): keep autograd from recording it
            return (args[0].detach(), *args[1:])

        return hook

    def _decoded(self, layer: int, x: Tensor, state: dict[str, Any], copies: int, seq: int) -> Tensor:
        """Layer L's reconstruction [copies, seq, d] (fp32) from the leaves: the sparse sum of active features'
        decoder rows (a CLT: those of every layer <= L, to L) + b_dec (+ the skip term)."""
        recon = None
        sources = range(layer + 1) if self.clt is not None else [layer]
        for source in sources:
            indices, offsets = state["bags"][source]  # built once per source layer (a CLT reads it L - source times)
            leaf = state["codes"][source]
            if self.clt is not None:
                rows = self.clt.decoder(source, layer).detach().float()
            else:
                rows = self.transcoders[layer].W_dec.detach().float()
            part = F.embedding_bag(indices, rows, offsets, mode="sum",
                                   per_sample_weights=leaf.reshape(-1)).view(copies, seq, -1)  # fmt: skip
            recon = part if recon is None else recon + part
        assert recon is not None
        if self.clt is not None:
            b_dec, skip = self.clt.b_dec[layer], None if self.clt.W_skip is None else self.clt.W_skip[layer]
        else:
            b_dec, skip = self.transcoders[layer].b_dec, self.transcoders[layer].W_skip
        bias = b_dec.detach().float()
        if state.get("bias_leaves"):  # b_dec as a leaf per copy, so its share of a linear readout can be read
            bias = bias.expand(copies, 1, -1).clone().requires_grad_(True)
            state.setdefault("biases", {})[layer] = bias
        recon = recon + bias
        if skip is not None:
            recon = recon + (x.to(skip) @ skip.detach()).float()
        return recon

    def _replace(self, layer: int, state: dict[str, Any]):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            true = out[0] if isinstance(out, tuple) else out
            x = state["inputs"][layer]
            batched = state["batched"]
            copies, seq = x.shape[0], x.shape[1]
            # the transcoder computes in its own dtype and the node values are fp32, whatever the model's dtype
            # (a bf16 model with fp32 transcoders); the reconstruction is cast back to the model's
            with torch.no_grad():  # every copy holds the same prompt: encode one, copy the activations
                codes = self.encode(layer, x[0].detach()).float()
                pos, idx = codes.nonzero(as_tuple=True)  # position-major, as embedding_bag's bags
                values = codes[pos, idx]
            leaf = (values.expand(copies, -1).clone() if batched else values).requires_grad_(True)
            state.setdefault("codes", {})[layer] = leaf
            state.setdefault("active", {})[layer] = (pos, idx)
            counts = torch.bincount(pos, minlength=seq)  # embedding_bag's bags: one per (copy, position)
            starts = counts.cumsum(0) - counts
            offsets = (starts[None] + len(idx) * torch.arange(copies, device=pos.device)[:, None]).flatten()
            state.setdefault("bags", {})[layer] = (idx.repeat(copies), offsets)
            # sum of activation x decoder row per position: the gradient reaches only the active features
            recon = self._decoded(layer, x, state, copies, seq).to(true)
            error = (true - recon).detach()
            error = (error if batched else error[0]).requires_grad_(True)  # the error node, a leaf too
            state.setdefault("errors", {})[layer] = error
            lin = recon + (error if batched else error[None])
            new = true.detach() + (lin - lin.detach())
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    def run(
        self, input_ids: Tensor, copies: int = 0, last_only: bool = False, options: dict[str, Any] | None = None
    ) -> Replaced:
        """One prompt ([seq] or [1, seq]); returns logits [seq, vocab] equal to the model's, and the nodes.
        With `copies` = B > 0 the prompt runs B times side by side and every tensor keeps a batch dimension:
        B independent backward passes in one (row b's gradient answers row b's target). `last_only`: logits
        for the last position only ([1, vocab] per copy), skipping the unembedding everywhere else — at a
        49k vocabulary that is a fifth of a small model's FLOPs, forward and backward. `options` (for QK
        attribution): {"capture": layer} keeps that layer's query and key, {"capture_heads": True} every layer's
        per-head attention output, {"freeze_values": True} detaches the attention values as well, {"bias_leaves": True} makes each layer's
        decoder bias a leaf ("biases" {layer: [copies, 1, d]}; unbatched, its copy dimension is 1)."""
        ids = input_ids.reshape(1, -1)
        if ids.shape[1] == 0:
            raise AimriError("the prompt is empty")
        if ids.shape[1] > self.subject.context_length:
            raise AimriError(
                f"a prompt of {ids.shape[1]} tokens exceeds {self.subject.name}'s context of {self.subject.context_length}"
            )
        state: dict[str, Any] = {"batched": copies > 0, **(options or {})}
        keep: dict[str, int] = {"logits_to_keep": 1} if last_only and self._keeps_logits else {}
        weights = [p for p in self.subject.model.parameters() if p.requires_grad]
        try:  # gradients go to the leaves only: no autograd record of the weights
            for p in weights:
                p.requires_grad_(False)
            with torch.enable_grad(), self._frozen(state):
                out = self.subject.model(
                    input_ids=ids.expand(max(1, copies), -1).to(self.subject.device), use_cache=False, **keep
                )
        finally:
            for p in weights:
                p.requires_grad_(True)
        inputs = state["inputs"] if copies else {k: v[0] for k, v in state["inputs"].items()}
        logits = out.logits[:, -1:] if last_only else out.logits
        return Replaced(
            logits=logits if copies else logits[0], codes=state["codes"], active=state["active"], errors=state["errors"],
            embeddings=state["embeddings"], mlp_inputs=inputs,
            kept={k: state[k] for k in ("qk", "heads", "biases") if k in state},
        )  # fmt: skip

    def hessian_check(self, input_ids: Tensor, max_tokens: int = 16, seed: int = 0) -> float:
        """The check that the frozen replacement is linear in its leaves (circuit-tracer tests the same): the
        gradient g of the top demeaned last logit with respect to every leaf (embeddings, feature activations,
        errors) must not depend on them, so the derivative of g . v (v random) is zero. Returns max |d(g.v)/d
        leaves| / max |g| over the first `max_tokens` tokens (0.0 for a linear pass; anything else means some
        nonlinearity escaped the freezing). The pass runs with eager attention (the fused CPU kernel has no
        second derivative), switched back afterwards."""
        model = self.subject.model
        impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
        ids = input_ids.reshape(-1)[:max_tokens]
        try:
            if impl != "eager":
                model.set_attn_implementation("eager")  # type: ignore[operator]
            run = self.run(ids)
            leaves = [run.embeddings, *run.codes.values(), *run.errors.values()]
            row = run.logits[-1]
            target = row[int(row.detach().argmax())] - row.mean()
            grads = torch.autograd.grad(target, leaves, create_graph=True, allow_unused=True)
            g = torch.Generator(device="cpu").manual_seed(seed)
            dot = sum(
                (gi * torch.randn(gi.shape, generator=g).to(gi)).sum()
                for gi in grads
                if gi is not None and gi.requires_grad
            )
            scale = max((float(gi.detach().abs().max()) for gi in grads if gi is not None), default=0.0)
            if isinstance(dot, int):  # no first derivative depends on any leaf
                return 0.0
            second = torch.autograd.grad(dot, leaves, allow_unused=True)
            worst = max((float(h.abs().max()) for h in second if h is not None), default=0.0)
            return worst / max(scale, 1e-30)
        finally:
            if impl != "eager":
                model.set_attn_implementation(impl)  # type: ignore[operator]
