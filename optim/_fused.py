"""The fused CUDA path of AdamMini: the update of all parameters compiled into one graph.

``torch.compile`` (Inductor) turns the per-parameter update of :mod:`optim.update` into Triton
kernels, fusing each segment's block reduction with its pointwise update and batching the
elementwise work, instead of one eager kernel launch per operation and tensor. The graph is traced
once per list of layouts (once per optimizer); learning rates, betas and bias corrections enter as a
float64 tensor, so schedulers and the step count never trigger a recompile.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Sequence

import torch

from .layout import BlockLayout
from .update import update_param

# Inductor options for the compiled update, read when an optimizer compiles (its first fused step),
# e.g. {"combo_kernels": True} to batch the per-tensor kernels into fewer launches. A tuning hook for
# CUDA measurements (benchmarks/optim_step.py --compile-option); empty means Inductor's defaults.
COMPILE_OPTIONS: dict[str, object] = {}


def unavailable_reason(params: Sequence[torch.Tensor]) -> str:
    """Why the fused path cannot run on ``params`` ("" when it can)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if any(p.device.type != "cuda" for p in params):
        return "not every parameter is on a CUDA device"
    if not _has_triton():
        return "Triton is not installed"
    return ""


def available(params: Sequence[torch.Tensor]) -> bool:
    """Whether the fused path can run on ``params``."""
    return unavailable_reason(params) == ""


@functools.cache
def _has_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from torch.utils._triton import has_triton

    return has_triton()


class FusedStep:
    """The compiled update for one fixed list of parameter layouts."""

    def __init__(self, layouts: Sequence[BlockLayout]):
        self.layouts = tuple(layouts)
        self.ran = False  # whether a call has completed (so the graph compiled)
        self._compiled = torch.compile(self._update, fullgraph=True, dynamic=False,
                                       options=dict(COMPILE_OPTIONS) or None)

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        block_avgs: list[torch.Tensor],
        coefficients: torch.Tensor,
    ) -> None:
        """Update in place; ``coefficients`` holds one :meth:`StepScalars.as_row` row per parameter."""
        coefficients = coefficients.to(params[0].device, non_blocking=True)
        self._compiled(params, grads, exp_avgs, block_avgs, coefficients)
        self.ran = True

    def _update(self, params, grads, exp_avgs, block_avgs, coefficients) -> None:
        for i, layout in enumerate(self.layouts):
            update_param(layout, params[i], grads[i], exp_avgs[i], block_avgs[i], coefficients[i])
