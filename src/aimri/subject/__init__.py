"""Subjects: loading, architecture adapters, Sites, taps and chat formatting."""

from typing import TYPE_CHECKING

from aimri.lazy import lazy_exports

if TYPE_CHECKING:
    from aimri.subject.adapters import ADAPTERS, Adapter, register_adapter
    from aimri.subject.chat import chat_ids
    from aimri.subject.core import Subject
    from aimri.subject.loading import load
    from aimri.subject.names import DEFAULT_MODEL, EMBEDDED, model_name
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
    "chat_ids",
    "load",
    "model_name",
    "register_adapter",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {"ADAPTERS": ".adapters", "Adapter": ".adapters", "register_adapter": ".adapters", "chat_ids": ".chat",
     "Subject": ".core", "DEFAULT_MODEL": ".names", "EMBEDDED": ".names", "load": ".loading",
     "model_name": ".names", "Site": ".sites", "Edit": ".taps", "StopForward": ".taps", "Tap": ".taps"},
)  # fmt: skip
