"""AI MRI: look inside transformer language models.

The stage packages export their entry points lazily: `import aimri` imports no torch until a name is used.
"""

from typing import TYPE_CHECKING

from aimri.errors import AimriError
from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.run import Run
    from aimri.subject import Edit, Site, Subject, Tap, load

__all__ = ["AimriError", "Edit", "Run", "Site", "Subject", "Tap", "load"]
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"Edit": "aimri.subject", "Site": "aimri.subject", "Subject": "aimri.subject", "Tap": "aimri.subject",
     "load": "aimri.subject", "Run": "aimri.run"},
)  # fmt: skip
