"""AI MRI: look inside transformer language models."""

from aimri.errors import AimriError
from aimri.subject import Edit, Site, Subject, Tap, load

__all__ = ["AimriError", "Edit", "Site", "Subject", "Tap", "load"]
__version__ = "0.1.0"
