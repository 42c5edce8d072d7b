"""The scan pipeline: the subject's default feature set (built once per model revision), the checkup
(aimri.diagnostics.checkup) and then its report, each reading the stage before it from disk. `mri scan` and
notebooks call `scan`."""

from __future__ import annotations

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
