"""Subjects: loading, architecture adapters, Sites and taps."""

from aimri.subject.adapters import ADAPTERS, Adapter, register_adapter
from aimri.subject.core import Subject
from aimri.subject.loading import DEFAULT_MODEL, EMBEDDED, load
from aimri.subject.sites import Site
from aimri.subject.taps import Edit, StopForward, Tap

__all__ = [
    "ADAPTERS",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "Adapter",
    "Edit",
    "Site",
    "StopForward",
    "Subject",
    "Tap",
    "load",
    "register_adapter",
]
