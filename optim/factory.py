"""One small factory for the optimizers the comparison experiments train with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hessian_blocks.blocks import Partition

from .adam_mini import AdamMini
from .choices import OPTIMIZERS, PARTITIONED
from .galore_mini import GaLoreMini
from .param_groups import param_groups_no_decay

__all__ = ["make"]


def make(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    partition: Partition | str | Path = "default",
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``name`` in OPTIMIZERS for ``model``'s trainable parameters, with no weight decay on norm and
    bias parameters (:func:`param_groups_no_decay`).

    "adam_mini": :class:`AdamMini` over ``partition``; "galore_mini": :class:`GaLoreMini` over
    ``partition`` (rank, update_proj_gap, scale, ... as keyword arguments); "adamw": ``torch.optim.AdamW``
    (decoupled weight decay); "sgd": ``torch.optim.SGD`` with momentum 0.9 unless given (its weight decay is
    L2, added to the gradient). Further keyword arguments go to the optimizer (betas, eps, foreach, ...).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    groups = param_groups_no_decay(model, weight_decay)
    if name == "adam_mini":
        return AdamMini(groups, partition, lr=lr, model=model, **kwargs)
    if name == "galore_mini":
        return GaLoreMini(groups, partition, lr=lr, model=model, **kwargs)
    if not (isinstance(partition, str) and partition == "default"):
        raise ValueError(f"a partition applies to {' and '.join(PARTITIONED)} only; {name} has no blocks")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kwargs)
    return torch.optim.SGD(groups, lr=lr, **{"momentum": 0.9, **kwargs})
