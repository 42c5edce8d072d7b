"""The scan pipeline: the subject's default feature set (built once per model revision), the checkup
(aimri.diagnostics.checkup) and then its report, each reading the stage before it from disk. `mri scan` and
notebooks call `scan`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aimri.diagnostics.checkup import run_checkup
from aimri.features import FeaturesConfig
from aimri.report.checkup_html import write_report
from aimri.run import Run
from aimri.subject.core import Subject


def scan(
    subject: Subject,
    out: Path,
    baseline: Subject | None = None,
    log: Callable[[str], None] = print,
    features: FeaturesConfig | bool = True,
    progress: bool = True,
    **checkup: Any,
) -> dict[str, Any]:
    """Run the checkup of `subject` into `out` (resuming finished stages) and render `out`/report.html.

    `features`: build or reuse the default labelled feature set (aimri.features) of the baseline, or of the
    subject without one, install it in the scan's run directory (`out`'s parent: runs/<model>/dictionaries/,
    where `mri serve` finds it; the baseline's under a name starting with the baseline's) and cite its features
    as evidence; a FeaturesConfig sets its size; False skips it (the report says how to add it). A set that
    cannot be built (AimriError) is logged and the checkup goes on without it, the report saying why. `checkup` takes run_checkup's other arguments (transcoders,
    dictionary, atlas, crosscoder, neutral_texts). Returns findings.json's content. Raises AimriError for a
    baseline that cannot be compared (before any work)."""
    from aimri.diagnostics.diffing import check_comparable

    if baseline is not None:
        check_comparable(subject, baseline)
    owner = baseline or subject
    if features is not False:
        from aimri.errors import AimriError
        from aimri.features import build_features, install
        from aimri.run import slug

        config = features if isinstance(features, FeaturesConfig) else None
        try:
            found = build_features(owner, config=config, log=log, progress=progress)
        except AimriError as err:  # the checkup goes on without them; the report says why
            log(f"features: not built: {err}")
            checkup["features_note"] = f"Features could not be built: {err}"
        else:
            # the baseline's set in the candidate's run directory is named for the baseline: never the candidate's own
            name = found.name if baseline is None else f"{slug(owner.name)}--{found.name}"
            checkup["features"] = install(found, Run(Path(out).resolve().parent), name)
    else:
        checkup.setdefault(
            "features_note",
            f"Features were skipped (--no-features). Add them with `mri features {owner.name}` (about 3 minutes "
            f"on a 2-core CPU, once per model revision) and rerun `mri scan`.",
        )
    result = run_checkup(subject, Path(out), baseline=baseline, log=log, **checkup)
    write_report(Path(out))
    return result


def treat_and_rescan(
    candidate: Subject,
    baseline: Subject,
    scan_dir: Path,
    out: Path,
    config: Any = None,
    force: bool = False,
    rescan_out: Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    corpus: tuple[list[str], list[str]] | None = None,
    neutral_texts: list[str] | None = None,
) -> dict[str, Any]:
    """Diagnose → treat → re-scan: `aimri.treatment.apply` writes the treated model to `out` (a Hugging Face
    model directory), then it is re-scanned against the same baseline (into `rescan_out`, default its run's
    scan/) and compared with the scan it was treated from, side by side: the finding's suspicion and the scan's
    (before → after), battery answers agreeing with the baseline (all, and those the repair never trained on),
    the trait probes' test AUROCs on the untreated and treated model, and the treated model's difference from
    the untreated one on neutral text. The comparison is added to OUT/treatment.json and drawn in the re-scan's
    report ("Treatment" section). Returns the full record. Raises TreatmentError / DiffError as `treat` does."""
    import aimri
    from aimri.diagnostics.checkup import model_cache, probe_from, probes_stage
    from aimri.paths import atomic_write_text
    from aimri.treatment import measure
    from aimri.treatment.apply import treat
    from aimri.treatment.mechanism import Scan

    record = treat(candidate, baseline, Path(scan_dir), Path(out), config, force=force, log=log, corpus=corpus)
    treated = aimri.load(out, device=candidate.device, dtype=candidate.dtype)
    rescan_dir = Path(rescan_out) if rescan_out is not None else Run.for_model(treated.name).scan
    log(f"re-scanning {treated.name} against {baseline.name} into {rescan_dir} ...")
    scan(
        treated, rescan_dir, baseline=baseline, log=log, features=False, progress=progress, neutral_texts=neutral_texts
    )
    before, after = Scan.read(Path(scan_dir)), Scan.read(rescan_dir)
    fid = record["finding"]["id"]
    after_finding = next((f for f in after.findings if f["id"] == fid), None)
    # battery prompts the treatment never trained on: a repair holds a fixed half of the normal answers out; an
    # ablation or feature edit trains on none
    every = [p for c in before.stage("behaviour").values() for p in c["prompts"]]
    untrained = (record.get("mechanism") or {}).get("held_out", []) if "repair" in record else every
    summary, directions = model_cache(baseline, log).stage("probes", lambda: probes_stage(baseline))
    probes = {t: probe_from(s, directions[t]) for t, s in summary.items()}
    _, held_texts = corpus or measure.corpus_split()
    windows = measure.held_out_windows(baseline, held_texts)
    record["rescan"] = {
        "scan": str(rescan_dir),
        "finding_suspicion": {"before": record["finding"]["suspicion"],
                              "after": after_finding["suspicion"] if after_finding else 0.0,
                              "still_found": after_finding is not None},
        "scan_suspicion": {"before": before.result["suspicion"], "after": after.result["suspicion"]},
        "battery_agreement": {
            "before": measure.battery_agreement(before.stage("diff"), before.stage("behaviour")),
            "after": measure.battery_agreement(after.stage("diff"), after.stage("behaviour")),
            "untrained_before": measure.battery_agreement(before.stage("diff"), before.stage("behaviour"), untrained),
            "untrained_after": measure.battery_agreement(after.stage("diff"), after.stage("behaviour"), untrained),
            "untrained_prompts": len(untrained)},
        "probe_auroc": {"untreated": measure.probe_aurocs(candidate, probes), "treated": measure.probe_aurocs(treated, probes)},
        "diff_to_untreated": measure.model_diff(treated, candidate, windows[:, :9]),
    }  # fmt: skip
    text = json.dumps(record, indent=1)
    atomic_write_text(Path(out) / "treatment.json", text)  # not a weight or config file: the revision stays
    atomic_write_text(rescan_dir / "treatment.json", text)
    write_report(rescan_dir)
    return record
