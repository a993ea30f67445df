"""Lazy package attributes (PEP 562): a package names its public API without importing it.

``import hessian_blocks`` (and ``optim``, ``analysis``) must stay cheap so that the command line can
parse its options, and print ``--help``, before torch, pandas or matplotlib load. A package lists
``{attribute: submodule}`` and calls :func:`lazy_exports` with its ``__name__``; the submodule is
imported on the first access of one of its attributes.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any

__all__ = ["lazy_exports"]


class _LazyPackage(types.ModuleType):
    """A package whose exported names load on first access. An export named like the submodule that
    defines it (``hessian_blocks.lanczos``, the function, from ``hessian_blocks/lanczos.py``) stays the
    function when that submodule is imported later (the import system sets the package attribute to
    the submodule), as it did when the package imported everything up front."""

    _lazy_exports: Mapping[str, str]

    def __getattr__(self, name: str) -> Any:
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], self.__name__), name)
        self.__dict__[name] = value  # later lookups skip __getattr__
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        exports = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, types.ModuleType) and exports.get(name) == f".{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("_lazy_exports", {})})


def lazy_exports(package: str, exports: Mapping[str, str]) -> None:
    """Make attribute ``name`` of the (already imported) ``package`` load ``exports[name]`` (a module
    path relative to the package, e.g. ``".blocks"``) and take its attribute ``name``, on first access."""
    module = sys.modules[package]
    module.__dict__["_lazy_exports"] = dict(exports)
    module.__class__ = _LazyPackage
