"""User-facing errors: one line saying what is wrong and how to fix it."""

from __future__ import annotations


class AimriError(Exception):
    """An error caused by the user's input or environment, printed without a traceback."""


class SiteError(AimriError, KeyError):
    """A site name that does not exist on this Subject."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StoreError(AimriError):
    """An ActivationStore that is missing, corrupted, or does not match the request."""


class CorpusError(AimriError):
    """A corpus that is empty or unreadable."""
