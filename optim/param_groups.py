"""Parameter groups with no weight decay on norm and bias parameters, found by module type and ndim."""

from __future__ import annotations

import torch.nn as nn

from hessian_blocks.partitions.structural import is_norm

__all__ = ["param_groups_no_decay"]


def param_groups_no_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups of ``model``'s trainable parameters, as (name, tensor) pairs.

    Parameters of normalisation layers and every parameter with fewer than two dimensions
    (biases, scales) get ``weight_decay=0``; all others get ``weight_decay``. Groups that would be
    empty are left out. The result can be passed to :class:`~optim.AdamMini` and to torch optimizers.
    """
    in_norm = {id(p) for module in model.modules() if is_norm(module) for p in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in in_norm else decay).append((name, param))
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
