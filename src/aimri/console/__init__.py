"""The console: a local web app over a run directory (`mri serve`).

Entry points are exported lazily: importing the package imports nothing heavy until a name is used."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.console.app import Console
    from aimri.console.server import make_server

__all__ = [
    "Console",
    "make_server",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Console": ".app",
        "make_server": ".server",
    },
)
