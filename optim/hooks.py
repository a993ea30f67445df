"""The declared extension point of AdamMini: an :class:`UpdateHook` passed as ``AdamMini(hook=...)``.

A hook may add param-group options (with defaults, checked when a group is added) and give any
parameter a :class:`ParamTransform`: Adam-mini's update then runs on another tensor than the
parameter (its state and blocks laid out on ``transform.shape``) and the transform applies the
result to the parameter. Each step, for a transformed parameter with gradient ``g``, AdamMini

1. asks ``transform.gradient(...)`` for the gradient Adam-mini sees (``R``);
2. runs Adam-mini's update, without weight decay, on a zero tensor ``D`` of ``R``'s shape, so that
   ``D`` becomes the step (plain loop or foreach path; never compiled: ``R`` is new every step);
3. calls ``transform.apply(param, state, D, decay, group)`` (decay: ``1 - lr * weight_decay``).

The transform's extra state tensors (:meth:`ParamTransform.extra_state`) live in the optimizer state
beside ``step``, ``exp_avg`` and ``block_exp_avg_sq``, are saved and restored with it (shapes
checked), and each parameter's :meth:`ParamTransform.key` (None: not transformed) is recorded in its
param group under :attr:`UpdateHook.group_key`, so a checkpoint made with other transforms is refused.
GaLore-mini (:mod:`optim.galore_mini`) is AdamMini with such a hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from hessian_blocks.blocks import Rule

__all__ = ["ParamTransform", "UpdateHook"]


class ParamTransform(ABC):
    """How Adam-mini's update of one parameter runs on another tensor and reaches the parameter."""

    shape: tuple[int, ...]  # the shape of the tensor Adam-mini updates (first moment, blocks)

    @abstractmethod
    def key(self) -> Any:
        """Plain data identifying the transform (recorded in state dicts and compared on load)."""

    @abstractmethod
    def extra_state(self, param: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The transform's own state tensors, freshly initialised (``dtype``: the first moment's)."""

    @abstractmethod
    def gradient(self, group: dict[str, Any], name: str, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """The gradient Adam-mini sees, of :attr:`shape` (``state["step"]`` already counts this step)."""

    @abstractmethod
    def apply(self, param: torch.Tensor, state: dict[str, Any], step: torch.Tensor, decay: float,
              group: dict[str, Any]) -> None:
        """Apply Adam-mini's ``step`` (of :attr:`shape`) and the weight decay factor to ``param``."""


class UpdateHook:
    """AdamMini's extension point (module docstring); this base class changes nothing."""

    group_key: str | None = None  # the param-group key recording each parameter's transform key (None: not recorded)

    def __init__(self, defaults: dict[str, Any] | None = None):
        self.defaults = dict(defaults or {})  # extra param-group options and their defaults

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for bad values of this hook's options in ``group`` (defaults filled in)."""

    def transform(self, group: dict[str, Any], name: str, param: torch.Tensor, rule: Rule) -> ParamTransform | None:
        """The transform of ``param`` in ``group`` (None: Adam-mini on the parameter itself)."""
        return None
