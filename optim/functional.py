"""Functional Adam-mini, shaped like ``torch.optim.adam.adam``: one call updates one param group's
tensors in place, dispatching to the plain, foreach, Triton-kernel or compiled implementation.

    from optim import BlockLayout
    from optim.functional import adam_mini   # like torch.optim.adam.adam: the package name optim.adam_mini is the module

    layouts = [BlockLayout.from_rule(rule, p.shape) for rule, p in zip(rules, params)]
    adam_mini(params, grads, exp_avgs, block_exp_avg_sqs, state_steps, layouts,
              lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

:class:`~optim.AdamMini` runs every step through the same functions (:func:`choose_implementation`,
:func:`run_updates`), with all its param groups in one call.
"""  # noqa: E501 (docstring text: splitting the long line would change it)

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from . import _fused, kernels
from .distributed import ShardedBlockLayout, reduce_block_mean_squares
from .layout import BlockLayout
from .update import Hyperparameters, StepTensors, foreach_update, reference_update

__all__ = ["IMPLEMENTATIONS", "adam_mini", "advance_steps", "choose_implementation", "run_updates"]

# plain loop, foreach, the Triton kernels (fused=True on CUDA), torch.compile (fused=True on CPU)
IMPLEMENTATIONS = ("reference", "foreach", "kernel", "compiled")
_ONE = torch.tensor(1.0)


def adam_mini(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    layouts: Sequence[BlockLayout | ShardedBlockLayout],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """One Adam-mini step of one param group, in place (the update: :mod:`optim.update`).

    Args:
        params, grads: the parameters and their gradients (contiguous, the first moment's dtype).
        exp_avgs: first moments, the parameters' shapes.
        block_exp_avg_sqs: second moments, one entry per block of each parameter's layout
            (float32, or float64 for float64 parameters).
        state_steps: 0-d float32 tensors, the steps taken so far; each is incremented. On the CPU
            (as torch keeps them) or, for the Triton kernels, on the parameters' device, where they
            are incremented without a host synchronisation.
        layouts: each parameter's :class:`~optim.layout.BlockLayout` (from its partition rule).
        lr, beta1, beta2, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        maximize: ascend instead of descend (the gradients are negated).
        foreach, fused: the implementation, as in ``torch.optim.adam.adam``: ``foreach=False`` the
            plain loop, ``foreach=True`` the foreach path, ``fused=True`` the Triton kernels on CUDA
            (:mod:`optim.kernels`) and the compiled update on CPU (:mod:`optim._fused`); by default the
            kernels on CUDA, foreach elsewhere. What the chosen path cannot run (see
            :func:`choose_implementation`) takes the foreach path with a warning.
    """
    lists = dict(grads=grads, exp_avgs=exp_avgs, block_exp_avg_sqs=block_exp_avg_sqs, state_steps=state_steps,
                 layouts=layouts)
    wrong = [f"{name} ({len(items)})" for name, items in lists.items() if len(items) != len(params)]
    if wrong:
        raise ValueError(f"adam_mini needs one entry per parameter ({len(params)}): got {', '.join(wrong)}")
    kind, fallback = choose_implementation(params, foreach=foreach, fused=fused)
    if not params:
        return
    if fallback:
        warnings.warn(f"adam_mini: {fallback}", stacklevel=2)
    step = StepTensors(Hyperparameters(lr, beta1, beta2, eps, weight_decay, maximize))
    for tensors in zip(params, grads, exp_avgs, block_exp_avg_sqs, state_steps, layouts):
        step.add(*tensors)
    run_updates({kind: [step]})


def advance_steps(step: StepTensors) -> None:
    """Increment the step counters and set each parameter's :class:`~optim.update.StepScalars`
    (the plain, foreach and compiled paths; the kernels count on the device)."""
    torch._foreach_add_(step.steps, _ONE, alpha=1.0)  # a tensor 1, wrapped once (torch's AdamW trick)
    by_step = {}
    step.scalars = [by_step.setdefault(t, step.hyper.scalars(t)) for t in torch.stack(step.steps).tolist()]


def choose_implementation(params: Sequence[torch.Tensor], *, foreach: bool | None,
                          fused: bool | None) -> tuple[str, str]:
    """The implementation (one of :data:`IMPLEMENTATIONS`) for these flags and parameters, and,
    when it is the foreach path instead of the one asked for or the CUDA default, why ("" otherwise).

    By default the Triton kernels when every parameter is on CUDA, else foreach; ``fused=True`` the
    kernels on CUDA (and on the CPU under Triton's interpreter, ``TRITON_INTERPRET=1``) and the
    compiled update on the CPU; ``foreach=True`` foreach; ``foreach=False`` the plain loop.
    """
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True: pick one implementation")
    if foreach is not None and not fused:
        return ("foreach" if foreach else "reference"), ""
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    if fused is None and not on_cuda:  # torch's choice: foreach off CUDA (compiling on CPU takes long)
        return "foreach", ""
    if on_cuda or kernels.interpreted():
        reason = kernels.unavailable_reason(params)
        return ("foreach", f"{reason}; using the foreach path") if reason else ("kernel", "")
    reason = _fused.unavailable_reason(params)
    return ("foreach", f"fused=True: {reason}; using the foreach path") if reason else ("compiled", "")


def run_updates(steps: dict[str, list[StepTensors]]) -> None:
    """Run every param group's step with its implementation. Sharded parameters' block means are
    reduced over ranks first (collective) and handed to the update; they take the foreach path
    (the kernels and the compiled update reduce each block's gradient themselves). All
    compiled groups run as one graph; the kernel groups as one launch per tile size and dtype."""
    steps = {kind: list(steps.get(kind, ())) for kind in IMPLEMENTATIONS}
    for kind in ("kernel", "compiled"):
        for step in list(steps[kind]):
            if any(isinstance(layout, ShardedBlockLayout) for layout in step.layouts):
                steps[kind].remove(step)
                steps["foreach"].append(step)
    reduce_block_mean_squares(step for kind in ("reference", "foreach") for step in steps[kind])
    for kind in ("reference", "foreach", "compiled"):
        for step in steps[kind]:
            if not step.scalars:  # else counted already (AdamMini's transformed parameters)
                advance_steps(step)
    for step in steps["reference"]:
        reference_update(step)
    for step in steps["foreach"]:
        foreach_update(step)
    if steps["kernel"]:
        _kernel_updates(steps["kernel"])
    if steps["compiled"]:
        _compiled_update(steps)


def _kernel_updates(steps: list[StepTensors]) -> None:
    """Every kernel group's parameters, one :func:`optim.kernels.kernel_update` per device and dtypes."""
    buckets: dict[tuple, tuple[list, list, list, list, list, list, list]] = {}
    hyper_rows = [step.hyper.row() for step in steps]
    for group, step in enumerate(steps):
        keys = [(p.device, p.dtype, g.dtype, m.dtype) for p, g, m in zip(step.params, step.grads, step.exp_avgs)]
        columns = (step.params, step.grads, step.exp_avgs, step.block_avgs, step.steps, step.layouts)
        if len(set(keys)) == 1:  # the usual case: one device and dtype per group
            lists = buckets.setdefault(keys[0], ([], [], [], [], [], [], []))
            for items, values in zip(lists, (*columns, [group] * len(keys))):
                items.extend(values)
            continue
        for index, key in enumerate(keys):
            lists = buckets.setdefault(key, ([], [], [], [], [], [], []))
            for items, values in zip(lists, (*columns, [group] * len(keys))):
                items.append(values[index])
    for params, grads, exp_avgs, block_avgs, state_steps, layouts, groups in buckets.values():
        device = params[0].device
        if all(s.device == device for s in state_steps):
            kernels.kernel_update(params, grads, exp_avgs, block_avgs, state_steps, layouts, groups, hyper_rows)
            continue
        # steps kept elsewhere (torch keeps them on the CPU): counted there, read by the kernels from a copy
        torch._foreach_add_(state_steps, _ONE, alpha=1.0)
        copies = list(torch.stack(state_steps).to(device, non_blocking=True).sub_(1.0).unbind())
        kernels.kernel_update(params, grads, exp_avgs, block_avgs, copies, layouts, groups, hyper_rows)


def _compiled_update(steps: dict[str, list[StepTensors]]) -> None:
    compiled = steps["compiled"]
    params = [p for step in compiled for p in step.params]
    grads = [g for step in compiled for g in step.signed_grads()]
    coefficients = torch.tensor([s.as_row() for step in compiled for s in step.scalars], dtype=torch.float64)
    update = _fused.compiled_update([layout for step in compiled for layout in step.layouts])
    if not update(params, grads, [m for step in compiled for m in step.exp_avgs],
                  [v for step in compiled for v in step.block_avgs], coefficients):
        for step in compiled:
            foreach_update(step)
