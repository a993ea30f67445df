"""Every way to get a :class:`~hessian_blocks.blocks.Partition` of a model's parameters.

- :mod:`.structural`: the default partition from module types and attention geometry (no measurement);
- :mod:`.coupling`: measured slice-to-slice Hessian couplings of each parameter tensor;
- :mod:`.measured`: rules decided from those couplings (the Hessian-derived partitioner).
"""

from .measured import derive_decisions, derive_partition, map_rules
from .structural import AttentionLayout, default_partition, default_rules, register_attention

__all__ = ["AttentionLayout", "default_partition", "default_rules", "derive_decisions", "derive_partition", "map_rules", "register_attention"]
