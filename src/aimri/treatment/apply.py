"""`treat`: turn a scan's finding into an edit of the weights and write the treated model as a standard Hugging
Face model directory (loads in plain `transformers`) with `treatment.json`, the record of what was changed,
why, on what data, and what it cost. The re-scan that proves the cure is `aimri.report.treat_and_rescan`.

Methods:
- "ablate": the finding's direction (measured from the scan: `mechanism.choose_direction`, or a given
  direction file) projected out of every residual write (`edits.ablate_direction`), exact.
- "feature": a dictionary feature removed (`edits.feature_ablation`): exact for MLP neurons, else ungated, with
  the gap to the gated hook ablation measured on held-out text.
- "repair": the CAFT repair fine-tune (`caft.repair`) on the condition the scan found, the direction ablated
  by hooks while it trains and then (kept) in the merged weights, or during training only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aimri.diagnostics.diffing import check_comparable
from aimri.errors import AimriError
from aimri.paths import atomic_write_text, fsync_dir
from aimri.subject.core import Subject
from aimri.treatment import measure
from aimri.treatment.caft import REPAIR_RECIPE, repair
from aimri.treatment.edits import (
    TreatmentError,
    ablate_direction,
    check_linear_writes,
    feature_ablation,
)
from aimri.treatment.mechanism import Scan, choose_direction, mechanism_of, neutral_loss

METHODS = ("repair", "ablate", "feature")


@dataclass
class TreatConfig:
    method: str = "repair"
    finding: str | None = None  # rank (1 = top) or id; None = the top finding
    layers: list[int] | None = None  # ablate from these layers' writes (default all, embeddings included)
    keep_ablation: bool = True  # repair: keep the direction ablated in the shipped weights
    direction: Path | None = None  # a direction file instead of the one measured from the scan
    dictionary: Path | None = None  # method feature: the dictionary and the feature to remove
    feature: int | None = None
    steps: int = REPAIR_RECIPE.steps
    lr: float = REPAIR_RECIPE.lr
    max_loss_increase: float = 0.02  # when choosing the direction's layer


def copy_subject(subject: Subject, name: str) -> Subject:
    """An independent copy of the model to edit (the untreated one stays as it is for the comparison)."""
    return Subject(copy.deepcopy(subject.model), subject.tokenizer, name=name, revision=f"{subject.revision}+treating")


def write_model_dir(
    subject: Subject, out: Path, record: dict[str, Any], force: bool = False, direction: torch.Tensor | None = None
) -> Path:
    """Save the model (safetensors), its tokenizer and treatment.json (and the ablated `direction`, [d_model], as
    treatment-direction.safetensors) as a Hugging Face model directory: written aside, fsynced, then renamed
    into place. Raises TreatmentError when `out` exists and `force` is not set."""
    out = Path(out)
    if out.exists() and not force:
        raise TreatmentError(f"{out} exists; choose another --out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subject.model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
    subject.tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / "treatment.json", json.dumps(record, indent=1))
    if direction is not None:
        from aimri.steering.specs import save_vector

        save_vector(direction, tmp / "treatment-direction.safetensors", subject)
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _direction_file(path: Path, candidate: Subject) -> torch.Tensor:
    from aimri.dictionaries.match import check_revision
    from aimri.steering.specs import load_vector, vector_model

    try:
        vector = load_vector(Path(path))  # a missing or unreadable file: one line
        name, revision = vector_model(Path(path))
        check_revision(f"the direction {path} was found in", name, revision, candidate.name, candidate.revision, False)
    except AimriError as err:
        raise TreatmentError(str(err)) from None
    if vector.shape != (candidate.d_model,):
        raise TreatmentError(
            f"the direction in {path} has shape {tuple(vector.shape)}; {candidate.name}'s residual needs [{candidate.d_model}]"
        )
    return vector


def treat(
    candidate: Subject, baseline: Subject, scan_dir: Path, out: Path, config: TreatConfig | None = None,
    force: bool = False, log: Any = print, corpus: tuple[list[str], list[str]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Treat `candidate` for a finding of its scan against `baseline` (`scan_dir`, from `mri scan MODEL
    --baseline BASE`) and write the treated model to `out`. Returns the record (also OUT/treatment.json):
    method, finding, the edit, the data a repair used, and before/after held-out loss and flaw rate.
    `corpus`: (text a repair trains on, held-out text its loss is measured on); default disjoint slices of the
    default corpus (`measure.corpus_split`).

    Raises TreatmentError (before any work) for a scan of another model or revision, a finding with no
    mechanism (naming those that can be treated), a direction of the wrong width or from another model, an
    existing `out` without `force`; and after the edit, without writing anything, when the treated model
    computes NaN or its held-out loss rose over 10%. DiffError for a baseline with another tokenizer."""
    cfg = config or TreatConfig()
    t0 = time.time()
    # every check that needs no model work first
    if cfg.method not in METHODS:
        raise TreatmentError(f"unknown method {cfg.method!r}; choose {', '.join(METHODS)}")
    if Path(out).exists() and not force:
        raise TreatmentError(f"{out} exists; choose another --out or pass --force to replace it")
    if cfg.method == "feature" and (cfg.dictionary is None or cfg.feature is None):
        raise TreatmentError("method feature needs --dictionary DIR and --feature ID (the feature to remove)")
    try:  # can a direction be ablated in the weights (no norm after the sublayers)?
        check_linear_writes(candidate)
        linear = True
    except TreatmentError:
        if cfg.method == "ablate":
            raise
        linear = False
    if cfg.layers is not None and not cfg.layers:
        raise TreatmentError("--layers names no layer; write A:B with A <= B, or A,B,C")
    check_comparable(candidate, baseline)
    scan = Scan.read(Path(scan_dir))
    if scan.result.get("revision") not in (None, candidate.revision):
        raise TreatmentError(
            f"{scan_dir} is a scan of {scan.result.get('model')} (revision {str(scan.result.get('revision'))[:12]}), not of "
            f"{candidate.name} (revision {candidate.revision[:12]}); scan this model first"
        )
    finding = scan.finding(cfg.finding)
    given = _direction_file(cfg.direction, candidate) if cfg.direction is not None else None
    mech = mechanism_of(scan, finding) if cfg.method != "feature" else None
    dictionary = None
    if cfg.method == "feature":
        from aimri.dictionaries import load_dictionary
        from aimri.dictionaries.match import check_model

        assert cfg.dictionary is not None and cfg.feature is not None
        dictionary = load_dictionary(cfg.dictionary).to(candidate.device)
        try:
            check_model(dictionary.cfg, candidate, False, f"the dictionary {cfg.dictionary}")
        except AimriError as err:
            raise TreatmentError(str(err)) from None
        if not 0 <= cfg.feature < dictionary.cfg.d_sae:
            raise TreatmentError(f"feature {cfg.feature} is outside the dictionary (0..{dictionary.cfg.d_sae - 1})")
    repair_texts, held_texts = corpus or measure.corpus_split()
    # one slice of held-out text chooses the direction's layer, a disjoint one measures the loss
    windows = measure.held_out_windows(baseline, held_texts, n=24)
    choosing, windows = windows[:8, :64], windows[8:]
    name = Path(out).name
    treated = copy_subject(candidate, name)
    record: dict[str, Any] = {
        "method": cfg.method, "finding": {k: finding[k] for k in ("id", "category", "title", "suspicion")},
        "candidate": {"name": candidate.name, "revision": candidate.revision},
        "baseline": {"name": baseline.name, "revision": baseline.revision}, "scan": str(scan_dir),
    }  # fmt: skip
    if dictionary is not None:
        from aimri.steering.interventions import ablate, to_edits

        assert cfg.feature is not None
        edit = feature_ablation(treated, dictionary, cfg.feature)
        if not edit.exact:  # what the ungated edit costs against the gated ablation by hooks
            gated = to_edits(candidate, [ablate(dictionary, cfg.feature)])
            with torch.no_grad():
                p = candidate.run(windows, edit=gated, stop=False)["logits"].float().log_softmax(-1)
                q = treated.run(windows, stop=False)["logits"].float().log_softmax(-1)
            kl = float((p.exp() * (p - q)).sum(-1)[:, 1:].mean())
            edit.details["kl_to_gated_ablation_nats"] = round(kl, 5)
            edit.note += f"; measured on held-out text: KL(gated hook ablation || this edit) = {kl:.4f} nats/token"
        record["edit"] = vars(edit)
    if mech is not None:
        if given is not None:
            mech.direction = given
        else:
            log("choosing the direction's layer ...")
            try:
                choose_direction(mech, candidate, baseline, choosing, max_loss_increase=cfg.max_loss_increase)
            except TreatmentError as err:
                if cfg.method == "ablate":
                    raise
                log(f"no direction: {err}; the repair trains without one")
                record["direction_note"] = str(err)
        if cfg.method == "repair":
            recipe = dataclasses.replace(REPAIR_RECIPE, steps=cfg.steps, lr=cfg.lr)
            # CAFT: the direction ablated by hooks while the LoRA trains (its o_proj / down_proj updates could
            # otherwise write the direction back) ...
            treated, record["repair"] = repair(treated, mech, repair_texts, mech.direction, recipe)
            treated.name = name
        # ... and then, kept, ablated in the merged weights: exactly the model the LoRA was trained inside
        if mech.direction is not None and (cfg.method == "ablate" or (cfg.keep_ablation and linear)):
            record["edit"] = vars(ablate_direction(treated, mech.direction, cfg.layers))
        record["mechanism"] = mech.summary()
    before = neutral_loss(candidate, windows)
    after = neutral_loss(treated, windows)
    measure.check_not_broken(before, after, measure.logits_finite(treated, windows))
    record["held_out_loss"] = {
        "before": round(before, 5),
        "after": round(after, 5),
        "relative_change": round(after / before - 1, 5),
    }
    if mech is not None and mech.pool:
        prompts = measure.pool_prompts(mech.pool)
        record["flaw_rate"] = {
            "prompts": f"prompt pool {mech.pool!r} ({len(prompts)} prompts the battery never asks)", "words": mech.words,
            "before": measure.flaw_rate(candidate, prompts, mech.words),
            "after": measure.flaw_rate(treated, prompts, mech.words),
        }  # fmt: skip
    record["seconds"] = round(time.time() - t0, 1)
    write_model_dir(treated, Path(out), record, force, mech.direction if mech is not None else None)
    return record
