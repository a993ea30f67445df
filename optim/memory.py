"""How many bytes an optimizer's state takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = ["state_memory", "StateMemory"]


@dataclass(frozen=True)
class StateMemory:
    """Optimizer-state bytes (all tensors in ``optimizer.state``) against the parameters it updates."""

    total_bytes: int
    n_params: int
    by_key: dict[str, int] = field(default_factory=dict)  # bytes per state key, e.g. {"exp_avg": ...}

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / self.n_params if self.n_params else 0.0


def state_memory(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> StateMemory:
    """Bytes of optimizer state (counted after the first step: state is created lazily), of all the
    optimizer's parameters or of ``params`` only (e.g. the matrices GaLore-mini projects)."""
    selected = [p for group in optimizer.param_groups for p in group["params"]]
    if params is not None:
        wanted = {id(p) for p in params}
        selected = [p for p in selected if id(p) in wanted]
        if len(selected) != len(wanted):
            raise ValueError("state_memory: some of the given params are not parameters of the optimizer")
    by_key: dict[str, int] = {}
    for param in selected:
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                by_key[key] = by_key.get(key, 0) + value.numel() * value.element_size()
    n_params = sum(p.numel() for p in selected)
    return StateMemory(sum(by_key.values()), n_params, by_key)
