"""Parameter groups with no weight decay on norm and bias parameters, found by module type, the traced
forward (norms of any family, biases of experts) and ndim."""

from __future__ import annotations

import torch.nn as nn

from hessian_blocks.partitions.structural import no_decay_parameters

__all__ = ["param_groups_no_decay"]


def param_groups_no_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups of ``model``'s trainable parameters, as (name, tensor) pairs.

    Parameters of normalisation layers (by type, and by structure in one forward traced on the meta
    device: any family's norm scales and biases), biases the trace sees added to a projection's output
    (an expert's bias row too) and every parameter with fewer than two dimensions (biases, scales) get
    ``weight_decay=0``; all others get ``weight_decay``. Groups that would be empty are left out. The
    result can be passed to :class:`~optim.AdamMini` and to torch optimizers.
    """
    exempt = no_decay_parameters(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in exempt else decay).append((name, param))
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
