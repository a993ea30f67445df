"""Optimizers that consume a partition: Adam-mini (one second moment per block), GaLore-mini (the same
on a low-rank projection of matrix gradients) and a small factory.

    from optim import AdamMini, make, state_memory

    opt = AdamMini(model, partition="default", lr=3e-4, weight_decay=0.1)  # or a Partition / file
    opt = GaLoreMini(model, lr=1e-3, rank=0.25, update_proj_gap=200, scale=0.25)  # low-rank states
    opt = make("adam_mini" | "galore_mini" | "adamw" | "sgd", model, lr=3e-4, weight_decay=0.1)
    optim.functional.adam_mini(params, grads, exp_avgs, block_exp_avg_sqs, steps, layouts, lr=...)  # one group
    state_memory(opt).bytes_per_param                                     # ~4 in float32 (AdamW: 8)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hessian_blocks.lazy import lazy_exports

from .choices import OPTIMIZERS, PARTITIONED

__all__ = [
    "AdamMini", "AttentionLayout", "BlockLayout", "GaLoreMini", "OPTIMIZERS", "PARTITIONED", "ParamTransform",
    "Projection", "StateMemory", "UpdateHook", "default_partition", "default_rules", "make",
    "param_groups_no_decay", "register_attention", "state_memory",
]

_EXPORTS = {
    "AdamMini": ".adam_mini",
    **dict.fromkeys(("AttentionLayout", "default_partition", "default_rules", "register_attention"),
                    "hessian_blocks.partitions.structural"),
    "make": ".factory",
    **dict.fromkeys(("GaLoreMini", "Projection"), ".galore_mini"),
    **dict.fromkeys(("ParamTransform", "UpdateHook"), ".hooks"),
    "BlockLayout": ".layout",
    **dict.fromkeys(("StateMemory", "state_memory"), ".memory"),
    "param_groups_no_decay": ".param_groups",
}
lazy_exports(__name__, _EXPORTS)  # torch loads on first use of one of these names

if TYPE_CHECKING:
    from hessian_blocks.partitions.structural import (
        AttentionLayout,
        default_partition,
        default_rules,
        register_attention,
    )

    from .adam_mini import AdamMini
    from .factory import make
    from .galore_mini import GaLoreMini, Projection
    from .hooks import ParamTransform, UpdateHook
    from .layout import BlockLayout
    from .memory import StateMemory, state_memory
    from .param_groups import param_groups_no_decay
