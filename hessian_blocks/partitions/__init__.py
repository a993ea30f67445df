"""Every way to get a :class:`~hessian_blocks.blocks.Partition` of a model's parameters.

- :mod:`.structural`: the default partition from module types and attention geometry (no measurement);
- the Hessian-derived partitioner, a pipeline of stages (:mod:`.measured` runs them):
  :mod:`.coupling` (measured slice couplings) -> :mod:`.evidence` (per axis) -> :mod:`.candidates`
  (groupings, one family at a time) -> :mod:`.decide` (a rule per tensor) -> :mod:`.render` (its
  ``why``), and :mod:`.transfer` (a smaller instance's rules mapped to the full model).
"""

from .decide import DecisionSettings
from .measured import derive, derive_decisions, derive_partition
from .structural import AttentionLayout, default_partition, default_rules, register_attention
from .transfer import map_rules, small_overrides

__all__ = ["AttentionLayout", "DecisionSettings", "default_partition", "default_rules", "derive", "derive_decisions",
           "derive_partition", "map_rules", "register_attention", "small_overrides"]
