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
    """A package whose exported names load on first access. No export may be named like a submodule:
    ``import package.name as alias`` binds the package attribute, so one name must mean one thing."""

    _lazy_exports: Mapping[str, str]

    def __getattr__(self, name: str) -> Any:
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], self.__name__), name)
        self.__dict__[name] = value  # later lookups skip __getattr__
        return value

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("_lazy_exports", {})})


def lazy_exports(package: str, exports: Mapping[str, str]) -> None:
    """Make attribute ``name`` of the (already imported) ``package`` load ``exports[name]`` (a module
    path relative to the package, e.g. ``".blocks"``) and take its attribute ``name``, on first access.
    An export named like one of its submodules is refused (see :class:`_LazyPackage`)."""
    clashing = sorted(name for name, source in exports.items() if source == f".{name}")
    if clashing:
        raise ValueError(f"{package}: exports {clashing} are named like the submodules that define them; "
                         "export the submodule or rename the attribute")
    module = sys.modules[package]
    module.__dict__["_lazy_exports"] = dict(exports)
    module.__class__ = _LazyPackage
