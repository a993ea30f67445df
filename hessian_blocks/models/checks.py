"""Validation shared by the model config dataclasses (called from their ``__post_init__``)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

__all__ = ["check_positive"]


def check_positive(config: object, *names: str, sequences: Sequence[str] = ()) -> None:
    """Refuse a config whose size fields are not positive, naming the field: each of ``names`` must
    be a positive integer, each of ``sequences`` a tuple (or list) of positive integers."""
    for name in names:
        value = getattr(config, name)
        if not _is_positive_int(value):
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")
    for name in sequences:
        value = getattr(config, name)
        if not isinstance(value, (tuple, list)) or not all(_is_positive_int(v) for v in value):
            raise ValueError(f"{type(config).__name__}.{name} must be a tuple of positive integers, got {value!r}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
