"""The scan pipeline: the checkup (aimri.diagnostics.checkup) and then its report, each reading the stage
before it from disk. `mri scan` and notebooks call `scan`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aimri.diagnostics.checkup import run_checkup
from aimri.report.checkup_html import write_report
from aimri.subject.core import Subject


def scan(
    subject: Subject,
    out: Path,
    baseline: Subject | None = None,
    log: Callable[[str], None] = print,
    **checkup: Any,
) -> dict[str, Any]:
    """Run the checkup of `subject` into `out` (resuming finished stages) and render `out`/report.html.

    `checkup` takes run_checkup's other arguments (transcoders, dictionary, atlas, crosscoder, neutral_texts).
    Returns findings.json's content. Raises AimriError for a baseline that cannot be compared."""
    result = run_checkup(subject, Path(out), baseline=baseline, log=log, **checkup)
    write_report(Path(out))
    return result
