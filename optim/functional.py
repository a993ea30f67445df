"""Functional Adam-mini, shaped like ``torch.optim.adam.adam``: one call updates one param group's
tensors in place, dispatching to the plain, foreach or compiled implementation.

    from optim import BlockLayout
    from optim.functional import adam_mini   # like torch.optim.adam.adam: the package name optim.adam_mini is the module

    layouts = [BlockLayout.from_rule(rule, p.shape) for rule, p in zip(rules, params)]
    adam_mini(params, grads, exp_avgs, block_exp_avg_sqs, state_steps, layouts,
              lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

:class:`~optim.AdamMini` runs every step through the same functions (:func:`advance_steps`,
:func:`choose_implementation`, :func:`run_updates`), with all its param groups in one call.
"""  # noqa: E501 (docstring text: splitting the long line would change it)

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from . import _fused
from .distributed import ShardedBlockLayout, reduce_block_mean_squares
from .layout import BlockLayout
from .update import Batch, StepScalars, foreach_update, reference_update

__all__ = ["IMPLEMENTATIONS", "adam_mini", "advance_steps", "choose_implementation", "run_updates"]

IMPLEMENTATIONS = ("reference", "foreach", "fused")  # plain loop, foreach, compiled
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
        state_steps: 0-d float32 CPU tensors, the steps taken so far; each is incremented.
        layouts: each parameter's :class:`~optim.layout.BlockLayout` (from its partition rule).
        lr, beta1, beta2, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        maximize: ascend instead of descend (the gradients are negated).
        foreach, fused: the implementation, as in ``torch.optim.adam.adam``: ``foreach=False`` the
            plain loop, ``foreach=True`` the foreach path, ``fused=True`` the compiled one; by
            default compiled on CUDA, foreach elsewhere. ``fused=True`` where it cannot compile
            warns and uses foreach.
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
        warnings.warn(f"adam_mini(fused=True): {fallback}; using the foreach path", stacklevel=2)
    batch = Batch()
    for param, grad, exp_avg, block_avg, step, layout in zip(params, grads, exp_avgs, block_exp_avg_sqs, state_steps,
                                                             layouts):
        batch.add(param, -grad if maximize else grad, {"exp_avg": exp_avg, "block_exp_avg_sq": block_avg, "step": step},
                  layout)
    advance_steps(batch, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    run_updates({kind: [batch]})


def advance_steps(batch: Batch, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Increment the batch's step counters and append each parameter's :class:`StepScalars`."""
    torch._foreach_add_(batch.steps, _ONE, alpha=1.0)  # a tensor 1, wrapped once (torch's AdamW trick)
    by_step: dict[float, StepScalars] = {}
    for t in torch.stack(batch.steps).tolist():
        if t not in by_step:
            by_step[t] = StepScalars(
                decay=1.0 - lr * weight_decay,
                beta1=beta1,
                beta2=beta2,
                inv_bias_correction2=1.0 / (1.0 - beta2**t),
                step_size=lr / (1.0 - beta1**t),
                eps=eps,
            )
        batch.scalars.append(by_step[t])


def choose_implementation(params: Sequence[torch.Tensor], *, foreach: bool | None,
                          fused: bool | None) -> tuple[str, str]:
    """The implementation (one of :data:`IMPLEMENTATIONS`) for these flags and parameters, and why
    ``fused=True`` fell back to foreach ("" when it did not)."""
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True: pick one implementation")
    if fused is None and foreach is None:  # torch's choice: compiled on CUDA (compiling on CPU takes long)
        return ("fused" if all(p.device.type == "cuda" for p in params) and _fused.available(params) else "foreach"), ""
    if fused:
        reason = _fused.unavailable_reason(params)
        return ("foreach", reason) if reason else ("fused", "")
    return ("foreach" if foreach or foreach is None else "reference"), ""


def run_updates(batches: dict[str, list[Batch]]) -> None:
    """Run every batch with its implementation. Sharded parameters' block means are reduced over
    ranks first (collective); they are never compiled. All compiled batches run as one graph."""
    batches = {kind: list(batches.get(kind, ())) for kind in IMPLEMENTATIONS}
    for batch in list(batches["fused"]):
        if any(isinstance(layout, ShardedBlockLayout) for layout in batch.layouts):
            batches["fused"].remove(batch)
            batches["foreach"].append(batch)
    reduce_block_mean_squares(batch for kind in batches.values() for batch in kind)
    for batch in batches["reference"]:
        reference_update(batch)
    for batch in batches["foreach"]:
        foreach_update(batch)
    if batches["fused"]:
        fused = Batch.concatenate(batches["fused"])
        coefficients = torch.tensor([s.as_row() for s in fused.scalars], dtype=torch.float64)
        if not _fused.compiled_update(fused.layouts)(fused.params, fused.grads, fused.exp_avgs, fused.block_avgs,
                                                     coefficients):
            for batch in batches["fused"]:
                foreach_update(batch)
