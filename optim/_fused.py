"""The compiled path of AdamMini on the CPU (``fused=True`` there): the update of all parameters
compiled into one graph.

``torch.compile`` (Inductor) turns the per-parameter update of :mod:`optim.update` into C++/OpenMP
loops (Inductor's C++ backend, built with the system's C++ compiler), fusing each segment's block
reduction with its pointwise update, instead of one eager operation per tensor: 1.3-3x faster than
the foreach path on a 2-core CPU (benchmarks/optim_step.py --compiled), after a compile of minutes
(seconds with Inductor's on-disk cache). On CUDA, ``fused=True`` is the
hand-written Triton kernels of :mod:`optim.kernels` instead (no compile wait, fewer launches).

One graph is traced per list of parameter layouts (:func:`compiled_update` keeps one
:class:`CompiledUpdate` per list, shared by every optimizer whose parameters have those layouts);
learning rates, betas and bias corrections enter as a float64 tensor, so schedulers and the step
count never trigger a recompile.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections import OrderedDict
from typing import Sequence

import torch

from .layout import BlockLayout
from .update import update_param

__all__ = ["CompiledUpdate", "available", "compiled_update", "unavailable_reason"]

# Distinct layout lists whose compiled update is kept per process (least recently used dropped).
MAX_COMPILED_LAYOUTS = 64


def unavailable_reason(params: Sequence[torch.Tensor]) -> str:
    """Why the compiled path cannot run on ``params`` ("" when it can)."""
    devices = sorted({p.device.type for p in params})
    if devices != ["cpu"]:
        return f"the compiled update runs on CPU parameters, not on {', '.join(devices)} (CUDA: the Triton kernels)"
    return "" if _has_cpp_compiler() else "Inductor finds no C++ compiler (install g++, or set CXX)"


def available(params: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled path can run on ``params``."""
    return unavailable_reason(params) == ""


@functools.cache
def _has_cpp_compiler() -> bool:
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError):
        return False
    return True


class CompiledUpdate:
    """The compiled update for one fixed list of parameter layouts.

    Dynamo keeps its compiled graphs on the Python *code object* of the compiled function and
    allows ``torch._dynamo.config.recompile_limit`` (8) of them per code object; a process that
    builds optimizers for more than 8 different parameter lists would then fail. So every
    instance compiles its own copy of the update's code: its graphs are its own (one per
    dtype/device of the tensors it sees), however many other lists a process compiles.
    """

    def __init__(self, layouts: Sequence[BlockLayout]):
        self.layouts = tuple(layouts)
        self.ran = False  # whether a call has completed (so the graph compiled)
        self.failed = False  # whether compiling failed (the caller then uses the foreach path)
        update = types.FunctionType(_update_all.__code__.replace(), _update_all.__globals__, _update_all.__name__)
        self._compiled = torch.compile(update, fullgraph=True, dynamic=False)

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        block_avgs: list[torch.Tensor],
        coefficients: torch.Tensor,
    ) -> bool:
        """Update in place; ``coefficients`` holds one :meth:`StepScalars.as_row` row per parameter.

        Returns False, having changed nothing, when the update could not be compiled (warned once:
        the caller should use the foreach path); compilation fails before any kernel runs.
        """
        if self.failed:
            return False
        coefficients = coefficients.to(params[0].device, non_blocking=True)
        try:
            self._compiled(self.layouts, params, grads, exp_avgs, block_avgs, coefficients)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as err:
            if self.ran:  # compiled and ran before: not a compilation problem
                raise
            warnings.warn(
                f"AdamMini(fused): compiling the update failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "using the foreach path for these parameters from now on",
                stacklevel=2,
            )
            self.failed = True
            return False
        self.ran = True
        return True


def _update_all(layouts, params, grads, exp_avgs, block_avgs, coefficients) -> None:
    for i, layout in enumerate(layouts):
        update_param(layout, params[i], grads[i], exp_avgs[i], block_avgs[i], coefficients[i])


def compiled_update(layouts: Sequence[BlockLayout]) -> CompiledUpdate:
    """The compiled update of ``layouts``: built and compiled once per process and list; the
    :data:`MAX_COMPILED_LAYOUTS` last used are kept."""
    key = tuple(layouts)
    update = _COMPILED.pop(key, None) or CompiledUpdate(key)
    _COMPILED[key] = update  # now the most recently used
    while len(_COMPILED) > MAX_COMPILED_LAYOUTS:
        _COMPILED.popitem(last=False)
    return update


_COMPILED: OrderedDict[tuple[BlockLayout, ...], CompiledUpdate] = OrderedDict()
