"""What a batch is to the engine: inputs and targets, each a tensor or a dict / tuple of tensors.

A dict of inputs goes to the model as keyword arguments (``input_ids``, ``attention_mask``), a tuple
as positional ones, a tensor as the one argument.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["batch_tensors", "batch_to", "call_model", "describe_batch"]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` applied to a batch's inputs: a tensor (one positional argument), a tuple (positional
    arguments) or a dict (keyword arguments, e.g. ``input_ids`` and ``attention_mask``)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def batch_to(value: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """A batch's inputs or targets (a tensor, or a dict / tuple / list of them) moved to ``device``;
    floating tensors also cast to ``dtype`` when given (token ids and masks keep theirs)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: batch_to(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(batch_to(v, device, dtype) for v in value)
    return value


def batch_tensors(value: Any, key: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors in a batch part (a tensor, a dict of them, or a tuple/list), with their keys."""
    if isinstance(value, torch.Tensor):
        yield key, value
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from batch_tensors(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from batch_tensors(item, f"{key}[{i}]")


def describe_batch(value: Any) -> str:
    """Shapes and dtypes of a batch part, e.g. ``(8, 64) torch.int64`` or ``{input_ids: (8, 64) torch.int64}``."""
    parts = [f"{key + ': ' if key else ''}{tuple(t.shape)} {t.dtype}" for key, t in batch_tensors(value)]
    return parts[0] if len(parts) == 1 and not isinstance(value, (dict, tuple, list)) else "{" + ", ".join(parts) + "}"
