"""Lazy package exports: `import aimri` (or any stage package) stays fast, and a name's module is imported
only when the name is first used (PEP 562 module `__getattr__`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, exporting each name from its module.

    exports: name -> module path relative to the package (".train") or absolute ("aimri.subject.core").
    Raises AttributeError for a name the package does not export, as a plain attribute lookup would."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    def __dir__() -> list[str]:
        import sys

        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
