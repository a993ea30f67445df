"""Optimizers that consume a partition: Adam-mini (one second moment per block), GaLore-mini (the same
on a low-rank projection of matrix gradients) and a small factory.

    from optim import AdamMini, make, state_memory

    opt = AdamMini(model, partition="default", lr=3e-4, weight_decay=0.1)  # or a Partition / file
    opt = GaLoreMini(model, lr=1e-3, rank=0.25, update_proj_gap=200, scale=0.25)  # low-rank states
    opt = make("adam_mini" | "galore_mini" | "adamw" | "sgd", model, lr=3e-4, weight_decay=0.1)
    adam_mini(params, grads, exp_avgs, block_exp_avg_sqs, steps, layouts, lr=..., ...)  # functional, one group
    state_memory(opt).bytes_per_param                                     # ~4 in float32 (AdamW: 8)
"""

from .adam_mini import AdamMini
from hessian_blocks.partitions.structural import default_partition, default_rules, register_attention
from .factory import OPTIMIZERS, PARTITIONED, make
from .functional import adam_mini
from .galore_mini import GaLoreMini, Projection
from .hooks import ParamTransform, UpdateHook
from .layout import BlockLayout
from .memory import StateMemory, state_memory
from .param_groups import param_groups_no_decay

__all__ = [
    "AdamMini", "BlockLayout", "GaLoreMini", "OPTIMIZERS", "PARTITIONED", "ParamTransform", "Projection", "StateMemory",
    "UpdateHook", "adam_mini", "default_partition", "default_rules", "make",
    "param_groups_no_decay", "register_attention", "state_memory",
]
