"""Lazy re-exports for a package's `__init__` (PEP 562 module `__getattr__`): each name is imported from its module
on first use, so importing a package, and so every `moefuse COMMAND --help`, pays for torch only once a name that
needs it is used.

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"moefuse.datasets.shards": ["build_shards"]})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]],
                                                                         list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) for `package`, exporting each module's listed names."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:  # a submodule (`from package import module`) is then imported by Python itself
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # once imported, a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
