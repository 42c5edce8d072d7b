"""Taps: read, edit or stop the forward pass at named Sites, through PyTorch hooks on HF modules.

A tap never re-implements the model: with no edits, logits are bitwise those of plain HF.

    with subject.tap(read=["resid.3"], edit={"mlp.out.2": lambda x: 0 * x}) as t:
        subject.model(input_ids)
    t.acts["resid.3"]

With `stop=True` the forward pass ends right after the deepest Site the tap needs (the model call
raises StopForward, which the `with` block swallows), so later layers and the unembedding cost nothing.

Padded batches: call the model through `t.forward(input_ids=..., attention_mask=...)` (Subject.run does):
input_ids [batch, seq], attention_mask [batch, seq] with 1 = token, 0 = padding, left or right. It derives
`position_ids = cumsum(mask) - 1` when none are given, so each row's real tokens have exactly the activations
and logits of that prompt run alone (to float rounding) for every supported architecture, GPT-2's absolute
positions included; the result is plain HF's for those position ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from aimri.subject.adapters import Adapter, get_module
from aimri.subject.sites import Site


class Tappable(Protocol):
    """What a Tap needs of the model it hooks (a Subject is one): the HF model, its adapter, its blocks and
    its Sites. Declared here so taps do not import the Subject that uses them."""

    @property
    def model(self) -> Any: ...

    @property
    def adapter(self) -> Adapter: ...

    @property
    def head_dim(self) -> int: ...

    def site(self, name: str | Site) -> Site: ...

    def layer(self, index: int) -> torch.nn.Module: ...


EditValue: TypeAlias = "Tensor | Callable[[Tensor], Tensor]"
Positions: TypeAlias = "int | slice | Sequence[int] | Tensor | None"


class StopForward(Exception):
    """Raised inside the model once the deepest tapped Site has been computed."""


@dataclass
class Edit:
    """Replace a Site's value by `value` (a tensor broadcast to [batch, seq, d], or a function of the
    current value) at `positions` (absolute token positions, a slice, or a bool mask [batch, seq];
    None = all). Padding positions (attention mask 0) are never edited."""

    site: str
    value: EditValue
    positions: Positions = None


def _as_edits(edit: Mapping[str, EditValue | Edit] | Iterable[Edit] | None) -> list[Edit]:
    if edit is None:
        return []
    if isinstance(edit, Mapping):
        return [v if isinstance(v, Edit) else Edit(str(site), v) for site, v in edit.items()]
    edits = list(edit)
    if not all(isinstance(e, Edit) for e in edits):
        raise TypeError(f"edits must be a mapping site -> value or a list of Edit, got {edits!r:.200}")
    return edits


def positions_from_mask(attention_mask: Any, seq: int | None) -> Tensor | None:
    """Position ids [batch, seq] that number each row's real tokens 0, 1, 2, ... (padding gets 0), from a
    [batch, past + seq] attention mask (1 = token, 0 = padding); None when the mask is not such a tensor."""
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or not seq:
        return None
    if attention_mask.shape[1] < seq:
        return None  # not a mask over these tokens; leave it to the model to complain
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return positions[:, -seq:]


def _seq_len(args: tuple, kwargs: dict) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return int(ids.shape[1]) if isinstance(ids, Tensor) and ids.dim() >= 2 else None


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


class Tap:
    """Context manager holding hooks for one set of reads and edits; see module docstring.

    Run the model with `forward` (input_ids [batch, seq], attention_mask [batch, seq], 1 = token,
    0 = padding): padded batches are exact, left or right, for every architecture. Padding positions
    are never edited.
    """

    def __init__(
        self,
        subject: Tappable,
        read: Iterable[str] = (),
        edit: Mapping[str, EditValue | Edit] | Iterable[Edit] | None = None,
        stop: bool = False,
        grad: bool = False,
    ) -> None:
        self.subject = subject
        self.grad = grad
        self._read = {subject.site(name) for name in read}
        self._edits: dict[Site, list[Edit]] = {}
        for e in _as_edits(edit):
            self._edits.setdefault(subject.site(e.site), []).append(e)
        self._sites = sorted(self._read | set(self._edits), key=lambda s: (s.depth, s.name))
        self._stop_site = self._sites[-1] if stop and self._sites else None
        self._records: dict[str, list[Tensor]] = {s.name: [] for s in self._read}
        self._handles: list[RemovableHandle] = []
        self._offset = 0
        self._pad_mask: Tensor | None = None  # [batch, seq] of the current forward, True = real token

    # -- results ----------------------------------------------------------------------------
    @property
    def acts(self) -> dict[str, Tensor]:
        """Read activations, [batch, seq, d]; forwards inside `generate` are joined along seq."""
        return {k: (v[0] if len(v) == 1 else torch.cat(v, dim=1)) for k, v in self._records.items() if v}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model inside this tap; returns None when the pass was stopped early.

        Padded batches are exact: given `attention_mask` ([batch, seq], 1 = token, 0 = padding; with a
        cache, [batch, past + seq]) and no `position_ids`, each row's real tokens are placed at positions
        0, 1, 2, ... (`position_ids = cumsum(mask) - 1`), so with left or right padding every architecture,
        absolute-position ones (GPT-2) included, computes each row's real tokens as it would the prompt alone
        (to float rounding). Pass `attention_mask` by keyword (HF models order positional arguments
        differently); `position_ids` the caller gives are used as they are. Calling `subject.model(...)`
        directly inside the tap is plain HF, which derives no positions from the mask.
        """
        if len(args) <= 1 and kwargs.get("position_ids") is None:
            positions = positions_from_mask(kwargs.get("attention_mask"), _seq_len(args, kwargs))
            if positions is not None:
                kwargs["position_ids"] = positions
        try:
            return self.subject.model(*args, **kwargs)
        except StopForward:
            return None

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> Tap:
        self._install()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is not None and issubclass(exc_type, StopForward)

    # -- hooks ------------------------------------------------------------------------------
    def _install(self) -> None:
        subj = self.subject
        self._handles.append(subj.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for site in self._sites:
            if site.kind == "resid" and site.layer == -1:
                self._pre_hook(subj.layer(0), site)
            elif site.kind == "resid":
                self._post_hook(subj.layer(site.layer), site)
            elif site.kind == "mlp.in":
                self._pre_hook(get_module(subj.layer(site.layer), subj.adapter.mlp), site)
            elif site.kind == "mlp.neurons":
                self._pre_hook(get_module(subj.layer(site.layer), subj.adapter.down_proj), site)
            elif site.kind == "mlp.out":
                self._post_hook(get_module(subj.layer(site.layer), subj.adapter.mlp_out_module), site)
            elif site.head is None:
                self._post_hook(get_module(subj.layer(site.layer), subj.adapter.attn_out_module), site)
            else:
                self._head_hook(site)

    def _on_model_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        seq = ids.shape[1] if ids is not None else 0
        offset = 0
        for key in ("cache", "past_key_values"):
            cache = kwargs.get(key)
            if cache is not None and hasattr(cache, "get_seq_length"):
                offset = int(cache.get_seq_length())
        self._offset = offset
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and seq:
            mask = mask[:, -seq:].bool()
            self._pad_mask = None if bool(mask.all()) else mask
        else:
            self._pad_mask = None

    def _pre_hook(self, module: torch.nn.Module, site: Site) -> None:
        def hook(mod: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                new = self._process(site, args[0])
                out = (new, *args[1:]), kwargs
            else:
                new = self._process(site, kwargs["hidden_states"])
                out = args, {**kwargs, "hidden_states": new}
            self._maybe_stop(site)
            return out

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post_hook(self, module: torch.nn.Module, site: Site) -> None:
        def hook(mod: Any, args: tuple, output: Any) -> Any:
            new = self._process(site, _first(output))
            self._maybe_stop(site)
            return _replace_first(output, new)

        self._handles.append(module.register_forward_hook(hook))

    def _head_hook(self, site: Site) -> None:
        """A head's contribution is its slice of the o_proj input times its slice of W_O; an edit
        adds (new - old) contribution to the o_proj output."""
        subj = self.subject
        o_proj = get_module(subj.layer(site.layer), subj.adapter.o_proj)
        d_head, h = subj.head_dim, site.head or 0
        cols = slice(h * d_head, (h + 1) * d_head)

        def hook(mod: Any, args: tuple, output: Any) -> Any:
            z = args[0][..., cols]
            weight = mod.weight
            w = weight[cols, :] if subj.adapter.o_proj_is_conv1d else weight[:, cols].T
            contrib = z @ w
            new = self._process(site, contrib)
            self._maybe_stop(site)
            if new is contrib:
                return None
            return _replace_first(output, _first(output) + (new - contrib))

        self._handles.append(o_proj.register_forward_hook(hook))

    def _process(self, site: Site, x: Tensor) -> Tensor:
        for e in self._edits.get(site, ()):
            # an edit computed in another dtype (an fp32 vector on a bf16 model) goes back in the model's
            new = (e.value(x) if callable(e.value) else torch.broadcast_to(e.value, x.shape)).to(x)
            mask = self._position_mask(e.positions, x)
            x = new if mask is None else torch.where(mask[..., None], new, x)
        if site in self._read:
            self._records[site.name].append(x if self.grad else x.detach())
        return x

    def _maybe_stop(self, site: Site) -> None:
        if site == self._stop_site:
            raise StopForward(site.name)

    def _position_mask(self, positions: Positions, x: Tensor) -> Tensor | None:
        batch, seq = x.shape[0], x.shape[1]
        mask = self._pad_mask
        if mask is not None and mask.shape != (batch, seq):
            mask = None
        if positions is None:
            return mask
        pos = torch.arange(self._offset, self._offset + seq, device=x.device)
        total = self._offset + seq
        if isinstance(positions, Tensor) and positions.dtype == torch.bool:
            sel = positions.to(x.device)
            sel = sel[..., self._offset : total] if sel.shape[-1] >= total else sel
            sel = torch.broadcast_to(sel, (batch, seq))
        else:
            if isinstance(positions, int):
                positions = [positions]
            if isinstance(positions, slice):
                idx = torch.arange(total, device=x.device)[positions]
            else:
                idx = torch.as_tensor(list(positions) if not isinstance(positions, Tensor) else positions)
                idx = torch.where(idx < 0, idx + total, idx).to(x.device)
            sel = torch.isin(pos, idx).expand(batch, seq)
        return sel if mask is None else sel & mask
