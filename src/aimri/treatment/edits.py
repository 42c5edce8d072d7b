"""Edits of the weights that remove a direction or a feature from what a model writes to its residual stream.

A direction ablated from every matrix that writes to the residual stream (the embeddings, each attention
output projection, each MLP down projection, and their biases) can never appear in the residual: the edited
model computes exactly what the unedited model computes with the direction projected out of the residual at
every layer by hooks. This is Arditi et al.'s (2024) "weight orthogonalization" of the refusal direction,
here for any direction and optionally over a span of layers. It needs sublayers that add their projection's
output to the residual as it is: architectures that normalise a sublayer's output first (Gemma 2 and 3's
post-norms) are refused, since a projection before a norm does not remove the direction after it.

A feature of a dictionary is removed exactly where it is a weight of the model (an MLP neuron: its column of
the down projection) and approximately elsewhere: an SAE or transcoder feature's decoder direction is ablated
from the writes that reach its site, ungated (the whole component along it, also where the feature does not
fire). `feature_ablation` says which, and `approximation_gap` measures what the ungated edit costs against
the gated hook ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from aimri.errors import AimriError
from aimri.steering.interventions import DirectionEdit, to_edits
from aimri.subject.adapters import get_module
from aimri.subject.core import Subject
from aimri.subject.taps import Edit


class TreatmentError(AimriError):
    """A treatment that cannot be applied as asked, or that broke the model."""


@dataclass
class WeightEdit:
    """What an edit changed: the matrices (by module path), the direction or neurons, and whether the edit is
    exact (equal to the hook ablation to float rounding) or an approximation (`note` says of what)."""

    kind: str  # "direction" | "neuron" | "decoder-direction"
    modules: list[str] = field(default_factory=list)
    exact: bool = True
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def check_linear_writes(subject: Subject) -> None:
    """Weight ablation is exact only where a sublayer's projection output is added to the residual unchanged.
    Raises TreatmentError for architectures that normalise it first (Gemma's post-attention / post-MLP norms)."""
    adapter = subject.adapter
    if adapter.attn_out is not None or adapter.mlp_out is not None:
        raise TreatmentError(
            f"{subject.name} ({subject.config.model_type}) normalises attention and MLP outputs before adding them "
            "to the residual, so a direction projected out of the weights comes back after the norm; treat it "
            "with --method repair (a fine-tune), which does not edit the residual writes"
        )


def _unit(direction: Tensor, subject: Subject) -> Tensor:
    if direction.ndim != 1 or direction.shape[0] != subject.d_model:
        raise TreatmentError(
            f"a direction of shape {tuple(direction.shape)} cannot be ablated from {subject.name}'s residual "
            f"(width {subject.d_model}); give a [{subject.d_model}] vector found in this model"
        )
    direction = direction.detach().double()
    norm = direction.norm()
    if not torch.isfinite(norm) or float(norm) == 0.0:
        raise TreatmentError("the direction to ablate is zero or not finite")
    return direction / norm


def _layer_span(subject: Subject, layers: Sequence[int] | None) -> list[int]:
    span = list(range(subject.n_layers)) if layers is None else sorted(set(layers))
    bad = [i for i in span if not 0 <= i < subject.n_layers]
    if bad:
        raise TreatmentError(f"layer(s) {bad} are outside {subject.name} (0..{subject.n_layers - 1})")
    return span


def untie_embeddings(model: nn.Module) -> bool:
    """Give the unembedding its own copy of the weights when it shares them with the embeddings, so editing
    what the embeddings write leaves the readout alone; the config records the models as untied (so the saved
    model loads untied). Returns whether they were tied."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
    if out is None or out.weight.data_ptr() != emb.weight.data_ptr():
        return False
    out.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False  # type: ignore[union-attr]
    if getattr(model.config, "text_config", None) is not None:  # type: ignore[union-attr]
        model.config.text_config.tie_word_embeddings = False  # type: ignore[union-attr]
    return True


@torch.no_grad()
def _project_rows(weight: Tensor, u: Tensor) -> None:
    """weight [n, d] whose rows are written to the residual: w <- w - (w·u) u, in float64, rounded once."""
    w = weight.double()
    weight.copy_((w - (w @ u)[:, None] * u[None, :]).to(weight.dtype))


@torch.no_grad()
def _project_columns(weight: Tensor, u: Tensor) -> None:
    """weight [d, n] (a Linear writing to the residual): W <- (I - u u^T) W, in float64, rounded once."""
    w = weight.double()
    weight.copy_((w - u[:, None] * (u @ w)[None, :]).to(weight.dtype))


def _writers(subject: Subject, layer: int) -> list[tuple[str, nn.Module, bool]]:
    """(path, module, stores [in, out]) of the two projections of `layer` that write to the residual."""
    adapter = subject.adapter
    out = []
    for path, conv in ((adapter.o_proj, adapter.o_proj_is_conv1d), (adapter.down_proj, adapter.o_proj_is_conv1d)):
        out.append((f"{adapter.layers}.{layer}.{path}", get_module(subject.layer(layer), path), conv))
    return out


@torch.no_grad()
def _ablate_from(module: nn.Module, u: Tensor, conv1d: bool) -> None:
    weight: Tensor = module.weight  # type: ignore[assignment]
    uu = u.to(weight.device)
    if conv1d:  # GPT-2's Conv1D: weight [in, out], rows read, columns written
        _project_rows(weight, uu)
    else:
        _project_columns(weight, uu)
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        bias.copy_((bias.double() - (bias.double() @ uu) * uu).to(bias.dtype))


@torch.no_grad()
def ablate_direction(
    subject: Subject, direction: Tensor, layers: Sequence[int] | None = None, embeddings: bool | None = None
) -> WeightEdit:
    """Project `direction` [d_model] out of every matrix that writes to the residual, in place.

    `layers`: the attention and MLP outputs of these layers (default all); `embeddings`: the token (and
    position) embeddings too (default: when the span starts at layer 0). The result equals hook ablation of the
    direction at the same writes (`hook_ablation`), and with every layer and the embeddings, ablation from the
    residual at every layer (Arditi et al. 2024). Shared embedding/unembedding weights are untied first.
    Raises TreatmentError for a direction of the wrong width, zero or NaN, layers outside the model, or an
    architecture with post-sublayer norms."""
    check_linear_writes(subject)
    u = _unit(direction, subject)
    span = _layer_span(subject, layers)
    if embeddings is None:
        embeddings = 0 in span
    model = subject.model
    edit = WeightEdit("direction", details={"layers": span, "embeddings": embeddings})
    if embeddings:
        edit.details["untied_unembedding"] = untie_embeddings(model)
        emb = model.get_input_embeddings()  # type: ignore[operator]
        _project_rows(emb.weight, u.to(emb.weight.device))
        edit.modules.append("input embeddings")
        wpe = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2's learned positions
        if isinstance(wpe, nn.Embedding):
            _project_rows(wpe.weight, u.to(wpe.weight.device))
            edit.modules.append("transformer.wpe")
    for layer in span:
        for path, module, conv in _writers(subject, layer):
            _ablate_from(module, u, conv)
            edit.modules.append(path)
    return edit


def hook_ablation(
    subject: Subject, direction: Tensor, layers: Sequence[int] | None = None, embeddings: bool | None = None
) -> list[Edit]:
    """The tap edits equal to `ablate_direction` with the same arguments: the direction projected out of the
    embeddings' and each layer's attention and MLP outputs while the model runs (the CAFT repair trains under
    these; tests compare them with the weight edit)."""
    u = _unit(direction, subject).float()
    span = _layer_span(subject, layers)
    sites = (["resid.-1"] if (0 in span if embeddings is None else embeddings) else []) + [
        f"{kind}.{layer}" for layer in span for kind in ("attn.out", "mlp.out")
    ]
    return to_edits(subject, [DirectionEdit(site, u, mode="ablate") for site in sites])


@torch.no_grad()
def ablate_neurons(subject: Subject, layer: int, neurons: Sequence[int]) -> WeightEdit:
    """Zero what MLP neurons write (their columns of layer `layer`'s down projection): exactly the model with
    those neurons' activations set to zero. Raises TreatmentError for a neuron or layer outside the model."""
    _layer_span(subject, [layer])
    width = subject.site_dim(f"mlp.neurons.{layer}")
    bad = [n for n in neurons if not 0 <= n < width]
    if bad:
        raise TreatmentError(f"neuron(s) {bad} are outside layer {layer}'s MLP (0..{width - 1})")
    adapter = subject.adapter
    module = get_module(subject.layer(layer), adapter.down_proj)
    idx = torch.tensor(list(neurons), dtype=torch.long)
    weight: Tensor = module.weight  # type: ignore[assignment]
    if adapter.o_proj_is_conv1d:
        weight[idx] = 0
    else:
        weight[:, idx] = 0
    return WeightEdit(
        "neuron", [f"{adapter.layers}.{layer}.{adapter.down_proj}"], details={"layer": layer, "neurons": list(neurons)}
    )


def feature_ablation(subject: Subject, dictionary: Any, feature: int) -> WeightEdit:
    """Remove feature `feature` of a dictionary from the weights, in place: exact for MLP neurons (a dictionary
    whose site is mlp.neurons.L), else its decoder direction ablated (ungated) from the writes that reach the
    dictionary's output site: for an SAE on resid.L every write up to layer L (the embeddings included), for a
    transcoder or SAE on mlp.out.L / attn.out.L that projection of layer L. Raises TreatmentError for a feature
    outside the dictionary or a dictionary of another width."""
    cfg = dictionary.cfg
    if not 0 <= feature < cfg.d_sae:
        raise TreatmentError(f"feature {feature} is outside the dictionary (0..{cfg.d_sae - 1})")
    if subject.site(cfg.site).kind == "mlp.neurons":  # the MLP's own neurons (aimri.dictionaries.neuron_dictionary)
        return ablate_neurons(subject, subject.site(cfg.site).layer, [feature])
    site = subject.site(cfg.site_out or cfg.site)
    direction = dictionary.W_dec[feature].detach().float().cpu()
    if site.kind == "resid":
        edit = ablate_direction(subject, direction, range(0, site.layer + 1), embeddings=True)
        where = f"every write up to layer {site.layer} (embeddings included)"
    elif site.kind in ("mlp.out", "attn.out"):
        check_linear_writes(subject)
        u = _unit(direction, subject)
        path, module, conv = _writers(subject, site.layer)[0 if site.kind == "attn.out" else 1]
        _ablate_from(module, u, conv)
        edit = WeightEdit("direction", [path])
        where = f"layer {site.layer}'s {'attention' if site.kind == 'attn.out' else 'MLP'} output"
    else:
        raise TreatmentError(
            f"features of a dictionary on {site.name} cannot be removed from the weights; use one on resid, "
            "mlp.out, attn.out or mlp.neurons"
        )
    edit.kind, edit.exact = "decoder-direction", False
    edit.note = (
        f"approximate: the decoder direction of {site.name}#{feature} is projected out of {where} wherever the "
        "model runs, not only where the feature fires (a gate is not a weight of a standard model)"
    )
    edit.details.update({"site": site.name, "feature": feature})
    return edit
