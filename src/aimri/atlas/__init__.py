"""Feature atlas (feature dashboard data): per-feature statistics, examples and labels, stored in one SQLite file.

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.atlas.build import build_atlas
    from aimri.atlas.card import render_card
    from aimri.atlas.db import Atlas

__all__ = [
    "Atlas",
    "build_atlas",
    "render_card",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Atlas": ".db",
        "build_atlas": ".build",
        "render_card": ".card",
    },
)
