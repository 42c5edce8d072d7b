"""Reports: the checkup's self-contained HTML page, rendered from a finished scan's files."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.report.checkup_html import render_report, write_report
    from aimri.report.pipeline import scan, treat_and_rescan

__all__ = ["render_report", "scan", "treat_and_rescan", "write_report"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "render_report": ".checkup_html",
        "write_report": ".checkup_html",
        "scan": ".pipeline",
        "treat_and_rescan": ".pipeline",
    },
)
