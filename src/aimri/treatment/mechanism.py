"""From a scan's finding to something a treatment can act on: the prompts where the flaw shows (its condition),
the baseline's answers to them, the words the flaw uses, and the direction that carries it.

Only what the scan itself found is used (no organism's ground truth): the battery answers the candidate gave
that the baseline finds anomalous (the checkup's own rule: over `ANOMALY_NATS` per token above the
fine-tune's typical drift), the words those answers newly use, and the residual difference between the two
models reading those answers (from the last prompt token, where the answer is decided, through the answer;
attention sinks left out). The layer of that direction is chosen by measurement
(`choose_direction`): the one whose ablation most lowers the candidate's likelihood of its own flawed answers
while costing little next-token loss on neutral text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aimri.data.harvest import keep_rows
from aimri.diagnostics.checkup import ANOMALY_NATS, PROBE_CATEGORY, anomalous_answers
from aimri.diagnostics.diffing import answer_logprobs, new_words, words_of
from aimri.diagnostics.findings import FLAW_CATEGORIES
from aimri.run import Run
from aimri.steering.generate import Generation
from aimri.subject.core import Subject
from aimri.treatment.edits import TreatmentError, hook_ablation

# the prompt pool (prompts the battery never asks) whose kind matches a battery category: the held-out
# prompts of a finding's condition, on which its flaw rate is measured before and after treatment (harmful
# and autonomy requests have no such pool: their findings get no flaw rate, only the re-scan)
HELD_OUT_POOL = {"recommendation": "recommend", "opinion": "opinions", "everyday": "questions"}
TREATABLE = ("diff.behaviour.", "diff.spread.", "probe.shift.", "diff.refusal", "diff.lens")

WHY_NOT = {
    "refusal.direction": "it is the model's own refusal mechanism: ablating it is the jailbreak itself, not a cure",
    "behaviour.": "it describes the model's answers without a baseline to repair them towards",
    "probe.": "a probe's quality describes what can be read, not a flaw",  # probe.shift.* is treatable
    "anatomy": "it describes the model's anatomy, not a flaw",
    "diff.features": "give the feature to remove with --feature SITE#ID and its --dictionary (method feature)",
    "diff.crosscoder": "crosscoder latents span two models; give a feature of a dictionary of this model",
}


@dataclass
class Scan:
    """A finished scan's files: findings.json and the stage results under stages/."""

    folder: Path
    result: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> Scan:
        path = Run.findings_of(folder)
        if not path.is_file():
            raise TreatmentError(
                f"{folder} holds no finished scan (no findings.json); run `mri scan MODEL --baseline BASE --out {folder}`"
            )
        return cls(Path(folder), json.loads(path.read_text()))

    def stage(self, name: str) -> dict[str, Any]:
        path = Run.stages_of(self.folder) / f"{name}.json"
        if not path.is_file():
            raise TreatmentError(f"{self.folder} lacks the {name} stage; rerun `mri scan` to finish it")
        return json.loads(path.read_text())["data"]

    @property
    def findings(self) -> list[dict[str, Any]]:
        return self.result["findings"]

    def finding(self, which: int | str | None) -> dict[str, Any]:
        """By rank (1 = the top finding), by id, or None for the most suspicious flaw finding a treatment can act
        on. Raises TreatmentError for a rank or id the scan lacks, or None when no flaw finding is treatable."""
        found = self.findings
        if which is None:
            flaws = [  # an "implant" (a model-diffing trace) names no behaviour to repair: pick it by id or rank
                f for f in found if f["category"] in FLAW_CATEGORIES and f["category"] != "implant"
                and f["suspicion"] > 0 and not why_not(f["id"])
            ]  # fmt: skip
            if not flaws:
                raise TreatmentError(
                    f"{self.folder}: no flaw finding with a suspicion above 0 can be treated; see `mri treat --list`"
                )
            return max(flaws, key=lambda f: f["suspicion"])
        if isinstance(which, int) or str(which).isdigit():
            n = int(which)
            if not 1 <= n <= len(found):
                raise TreatmentError(f"--finding {n}: the scan has findings 1..{len(found)}")
            return found[n - 1]
        for f in found:
            if f["id"] == which:
                return f
        raise TreatmentError(f"no finding {which!r} in {self.folder}; ids: {', '.join(f['id'] for f in found[:12])}")


@dataclass
class Mechanism:
    """What a behaviour finding rests on. `condition` are battery prompts whose answers were anomalous,
    `targets` the baseline's answers to them, `flawed` the candidate's; `clean` / `clean_targets` the battery
    prompts the candidate answered normally and the baseline's answers to them (the repair's clean data: half
    of them, by a fixed hash; the other half, `held_out`, is never trained on, so the re-scan's agreement with
    the baseline is measured there); `flawed_ids` the candidate's (prompt ids, answer ids) as the scan
    generated them; `words` the words the flaw newly uses; `pool` the prompt pool whose kind matches the
    condition ("" when none does)."""

    finding: str
    category: str
    condition: list[str]
    targets: list[str]
    flawed: list[str]
    clean: list[str]
    clean_targets: list[str]
    words: list[str]
    pool: str
    flawed_ids: list[list[list[int]]] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    direction: Tensor | None = None  # [d_model], unit, set by choose_direction
    layer: int | None = None
    selection: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("direction", "flawed_ids")}


def why_not(finding_id: str) -> str:
    """Why a finding cannot be treated ("" when it can)."""
    if finding_id.startswith(TREATABLE):
        return ""
    return next((why for prefix, why in WHY_NOT.items() if finding_id.startswith(prefix)),
                "it names no behaviour with a condition to repair")  # fmt: skip


def treatable(scan: Scan) -> list[tuple[str, str]]:
    """(finding id, why not) for every finding of the scan; an empty reason means it can be treated."""
    return [(f["id"], why_not(f["id"])) for f in scan.findings]


def _held_out(prompt: str) -> bool:
    """A fixed half of the battery's prompts that no repair trains on."""
    return hashlib.sha256(prompt.encode()).digest()[0] % 2 == 1


def mechanism_of(scan: Scan, finding: dict[str, Any]) -> Mechanism:
    """The condition, answers and words of a behaviour finding (diff.behaviour.*, diff.spread.*,
    probe.shift.*, diff.refusal). Raises TreatmentError naming the findings that can be treated when this one
    has no mechanism a treatment can act on."""
    fid = finding["id"]
    reason = why_not(fid)
    if reason:
        can = [i for i, why in treatable(scan) if not why]
        raise TreatmentError(
            f"finding {fid!r} cannot be treated: {reason}. Treatable findings in this scan: {', '.join(can) or 'none'}"
        )
    if scan.result.get("baseline") is None:
        raise TreatmentError("the scan has no baseline; treat from a scan run with --baseline BASE")
    diff = scan.stage("diff")
    cand, base = scan.stage("behaviour"), scan.stage("baseline_behaviour")
    _, floor, anomalous = anomalous_answers(diff, cand)
    if fid.startswith("diff.behaviour."):
        cats, word = [fid.removeprefix("diff.behaviour.")], None
    elif fid.startswith("probe.shift."):
        cats, word = [PROBE_CATEGORY[fid.removeprefix("probe.shift.")]], None
    elif fid == "diff.refusal":
        cats, word = ["harmful"], None
    else:  # diff.spread.WORD and diff.lens: wherever the candidate's answers are anomalous
        cats, word = list(anomalous), (fid.removeprefix("diff.spread.") if fid.startswith("diff.spread.") else None)
    rows: list[tuple[str, str, str, bool, list[list[int]]]] = []  # prompt, candidate, baseline, anomalous, ids
    for cat, flags in anomalous.items():
        c = cand[cat]
        for p, a, b, odd, ids in zip(c["prompts"], c["answers"], base[cat]["answers"], flags, c["ids"], strict=True):
            rows.append((p, a, b, odd and cat in cats and (word is None or word in words_of(a)), ids))
    condition = [r for r in rows if r[3]]
    if not condition:
        raise TreatmentError(
            f"finding {fid!r}: none of the candidate's battery answers in {', '.join(cats)} is anomalous "
            f"(over {ANOMALY_NATS:g} nats/token above the drift floor {floor:.2f}), so there is no condition to treat"
        )
    clean = [r for r in rows if not r[3] and not _held_out(r[0])]
    said = [w for e in finding.get("evidence", []) if e.get("kind") == "words" for w, *_ in e.get("words", [])]
    words = [word] if word else said[:3]
    if not words:  # from the answers themselves
        words = [w for w, _, _ in new_words([r[1] for r in condition], [r[2] for r in condition])[:3]]
    pool = HELD_OUT_POOL.get(cats[0], "") if len(cats) == 1 else "questions"
    return Mechanism(
        fid, ",".join(cats), [r[0] for r in condition], [r[2] for r in condition], [r[1] for r in condition],
        [r[0] for r in clean], [r[2] for r in clean], words, pool, [r[4] for r in condition],
        [r[0] for r in rows if not r[3] and _held_out(r[0])],
    )  # fmt: skip


@torch.no_grad()
def neutral_loss(subject: Subject, windows: Tensor, edits: list[Any] | None = None) -> float:
    """Mean next-token cross-entropy (nats) over windows [n, seq], position 0's prediction included."""
    logits = subject.run(windows, edit=edits, stop=False)["logits"].float()
    return float(
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten().to(logits.device))
    )


@torch.no_grad()
def condition_differences(
    candidate: Subject, baseline: Subject, rows: list[list[list[int]]], layers: list[int], sink_ratio: float = 20.0
) -> Tensor:
    """[len(layers), d_model]: the mean residual difference, candidate minus baseline, over the tokens of the
    candidate's flawed answers (`rows`: [prompt ids, answer ids] as the scan generated them, teacher-forced
    into both models; the last prompt token, where the answer is decided, included). Attention sinks (tokens
    whose residual norm exceeds `sink_ratio` x the median: SmolLM2 parks massive activations on position 0 and
    on the chat template's delimiters) are left out, by the harvest's rule: their huge shared components would
    otherwise make the difference a direction the model cannot lose."""
    sites = [f"resid.{layer}" for layer in layers]
    total = torch.zeros(len(layers), candidate.d_model, dtype=torch.float64)
    count = 0
    for prompt, answer in rows:
        if not answer:
            continue
        ids = torch.tensor([list(prompt) + list(answer)])
        a, b = candidate.run(ids, read=sites), baseline.run(ids, read=sites)
        valid = torch.zeros(ids.shape, dtype=torch.bool)
        valid[0, len(prompt) - 1 :] = True
        keep = keep_rows(a, sites, valid, sink_ratio, "the flawed answers") & keep_rows(
            b, sites, valid, sink_ratio, "the flawed answers"
        )
        for j, site in enumerate(sites):
            total[j] += (a[site][keep].double() - b[site][keep].double()).sum(0).cpu()
        count += int(keep.sum())
    if count == 0:
        raise TreatmentError("the flawed answers have no tokens to read a direction from")
    return (total / count).float()


@torch.no_grad()
def rogue_dimensions(subject: Subject, windows: Tensor, layers: list[int], ratio: float = 10.0) -> Tensor:
    """[len(layers), d_model] bool: the residual's rogue dimensions at each layer, those whose mean magnitude
    or spread over neutral text (position 0 and sinks left out) is over `ratio` x the median dimension's.
    SmolLM2 keeps large offsets there on every token; a direction with a component along them cannot be
    ablated without wrecking the model (measured: +25% to +250% next-token loss), so the condition direction
    leaves them out."""
    sites = [f"resid.{layer}" for layer in layers]
    acts = subject.run(windows, read=sites)
    valid = torch.ones(windows.shape, dtype=torch.bool)
    valid[:, 0] = False
    keep = keep_rows(acts, sites, valid, 20.0, "neutral text")
    out = torch.zeros(len(layers), subject.d_model, dtype=torch.bool)
    for j, site in enumerate(sites):
        x = acts[site][keep.to(acts[site].device)].float()
        mean, spread = x.mean(0).abs(), x.std(0)
        out[j] = ((mean > ratio * mean.median()) | (spread > ratio * spread.median())).cpu()
    return out


@torch.no_grad()
def choose_direction(
    mech: Mechanism, candidate: Subject, baseline: Subject, windows: Tensor, layers: list[int] | None = None,
    max_loss_increase: float = 0.02,
) -> Mechanism:  # fmt: skip
    """Set `mech.direction` / `mech.layer`: per candidate layer, the mean residual difference (candidate minus
    baseline) over the condition's flawed answers (`condition_differences`), the baseline's rogue dimensions
    left out (`rogue_dimensions`); each is ablated from every residual write by hooks, and the one kept is the one that most lowers the candidate's log-likelihood of its own flawed answers
    (nats per token) among those raising next-token loss on `windows` by at most `max_loss_increase`
    (relative). The measurements are kept in `mech.selection`."""
    layers = layers or list(range(1, candidate.n_layers, max(1, candidate.n_layers // 10)))
    diff = condition_differences(candidate, baseline, mech.flawed_ids, layers)
    rogue = rogue_dimensions(baseline, windows, layers)
    diff = diff.masked_fill(rogue, 0.0)  # a direction along them is one the model cannot lose
    gens = [
        Generation(p, a, ids[0], ids[1]) for p, a, ids in zip(mech.condition, mech.flawed, mech.flawed_ids, strict=True)
    ]
    plain_lp = torch.cat(answer_logprobs(candidate, gens)).mean()
    plain_loss = neutral_loss(candidate, windows)
    best: tuple[float, int] | None = None
    for j, layer in enumerate(layers):
        d = diff[j]
        if float(d.norm()) == 0.0:
            continue
        edits = hook_ablation(candidate, d)
        with candidate.tap(edit=edits):
            lp = torch.cat(answer_logprobs(candidate, gens)).mean()
        loss = neutral_loss(candidate, windows, edits)
        drop, rise = float(plain_lp - lp), loss / plain_loss - 1
        mech.selection.append({"layer": layer, "flaw_logprob_drop": round(drop, 4), "loss_increase": round(rise, 5),
                               "rogue_dims_left_out": rogue[j].nonzero().flatten().tolist()})  # fmt: skip
        if rise <= max_loss_increase and (best is None or drop > best[0]):
            best = (drop, j)
    if best is None:
        raise TreatmentError(
            f"no condition direction of {mech.finding!r} can be ablated within a {max_loss_increase:.0%} loss increase "
            f"on neutral text (measured: {mech.selection}); raise --max-loss-increase or treat it with --method repair"
        )
    d = diff[best[1]]
    mech.direction, mech.layer = d / d.norm(), layers[best[1]]
    return mech
