"""How many bytes an optimizer's state takes, before its first step too."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = ["state_memory", "StateMemory"]


@dataclass(frozen=True)
class StateMemory:
    """Optimizer-state bytes (all tensors in ``optimizer.state``) against the parameters it updates.

    ``planned_bytes`` is the part of ``total_bytes`` that does not exist yet: the state the next step
    creates for parameters that have none (all of it before the first step; 0 after it)."""

    total_bytes: int
    n_params: int
    by_key: dict[str, int] = field(default_factory=dict)  # bytes per state key, e.g. {"exp_avg": ...}
    planned_bytes: int = 0

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / self.n_params if self.n_params else 0.0


def state_memory(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> StateMemory:
    """Bytes of optimizer state of all the optimizer's parameters, or of ``params`` only (e.g. the
    matrices GaLore-mini projects). Optimizers create their state lazily, at the first step; a parameter
    without state yet is counted with the state that step will create for it (as if it gets a gradient),
    found by running one step of a copy of the optimizer on the meta device: shapes and dtypes only, so
    nothing is allocated, neither the optimizer nor the parameters change, and no step hook runs. Only the
    existing state is counted (with a warning) where that copy cannot step (an optimizer that reads values
    during its step), and under torch.distributed with several processes (a step may wait for the others).
    ``planned_bytes`` says how much of the count does not exist yet."""
    everything = [p for group in optimizer.param_groups for p in group["params"]]
    selected = everything
    if params is not None:
        wanted = {id(p) for p in params}
        selected = [p for p in everything if id(p) in wanted]
        if len(selected) != len(wanted):
            raise ValueError("state_memory: some of the given params are not parameters of the optimizer")
    existing = _bytes_by_key(optimizer.state, selected)
    planned: dict[str, int] = {}
    if any(not optimizer.state.get(p) for p in selected):
        after = _state_after_a_dry_step(optimizer, everything)
        if after is not None:
            planned = _bytes_by_key(after, [p for p in selected if not optimizer.state.get(p)])
    by_key = {key: existing.get(key, 0) + planned.get(key, 0) for key in {**existing, **planned}}
    n_params = sum(p.numel() for p in selected)
    return StateMemory(sum(by_key.values()), n_params, by_key, sum(planned.values()))


def _distributed() -> bool:
    """Several processes: a dry step could wait in a collective for ranks that do not take it."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _bytes_by_key(state: dict, selected: list[torch.Tensor]) -> dict[str, int]:
    by_key: dict[str, int] = {}
    for param in selected:
        for key, value in state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                by_key[key] = by_key.get(key, 0) + value.numel() * value.element_size()
    return by_key


def _state_after_a_dry_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict | None:
    """{parameter: its state after one step} of a copy of ``optimizer`` whose parameters (and existing state
    tensors but scalars) are meta tensors with meta gradients; None (with a warning) when it cannot step, or
    must not (several processes)."""
    if _distributed():
        warnings.warn(f"state_memory: under torch.distributed with {torch.distributed.get_world_size()} processes the "
                      "state that the first step creates is not counted (a dry step could wait for the other "
                      "processes in a collective); count after the first step", stacklevel=3)
        return None
    twins: dict[int, torch.Tensor] = {}
    for param in params:
        twin = torch.empty_like(param, device="meta").requires_grad_(param.requires_grad)
        twin.grad = torch.empty_like(param, device="meta")
        twins[id(param)] = twin
    memo = dict(twins)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # step counters stay numbers: steps read them
                memo[id(value)] = torch.empty_like(value, device="meta")
    dry = object.__new__(type(optimizer))  # copied attribute by attribute: torch's pickling keeps only a few
    step = type(optimizer).step
    step = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step  # no step hooks
    try:
        dry.__dict__.update(copy.deepcopy(optimizer.__dict__, memo))
        with warnings.catch_warnings():  # the copy's own fallbacks (meta tensors take no kernel) are not the user's
            warnings.simplefilter("ignore")
            step(dry)
    except Exception as err:  # noqa: BLE001 - any optimizer, any way of failing: the count says what it has
        warnings.warn(f"state_memory: a dry step of {type(optimizer).__name__} on the meta device failed "
                      f"({type(err).__name__}: {err}); only the state that exists is counted (before the first "
                      "step: none)", stacklevel=3)
        return None
    return {param: dry.state.get(twins[id(param)], {}) for param in params}
