"""The optimizer registry's names, importable without torch (the command line offers them as choices).

:func:`optim.make` builds each of them; the experiments train with them in this order.
"""

from __future__ import annotations

__all__ = ["OPTIMIZERS", "PARTITIONED"]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw", "adam_mini", "galore_mini")
PARTITIONED: tuple[str, ...] = ("adam_mini", "galore_mini")  # the optimizers that take a partition (one v per block)
