"""The Adam-mini update rule on a param group's tensors, in its plain and foreach forms.

For every block b of a parameter (Adam-mini paper, decoupled weight decay lambda)::

    p   <- p * (1 - lr * lambda)
    m   <- beta1 * m + (1 - beta1) * g                       (one entry per coordinate)
    v_b <- beta2 * v_b + (1 - beta2) * mean(g_b ** 2)         (one scalar per block)
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v_b / (1 - beta2^t)) + eps)

A step is staged like torch's Adam hands ``state_steps`` to its update: :class:`StepTensors` holds a
param group's parallel lists, its :class:`Hyperparameters`, and ``mean_squares``, the per-block
means of ``g**2`` computed *before* the update where they need more than the local gradient (a
sharded parameter's blocks span ranks: :func:`optim.distributed.reduce_block_mean_squares`); for
the others the update reduces its gradient itself. :func:`update_param` is the update of one
parameter (the plain path, and what the compiled path compiles); :func:`foreach_update` does the
same arithmetic, in the same order, batched over tensors; :mod:`optim.kernels` the same in Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union

import torch

from .layout import BlockLayout

__all__ = ["BlockRun", "Hyperparameters", "StepScalars", "StepTensors", "foreach_update", "reference_update",
           "update_param"]


class BlockRun(Protocol):
    """A run of equal blocks of one parameter, as the update sees it (:class:`~optim.layout.Segment`,
    or a sharded parameter's :class:`~optim.distributed.LocalSegment`)."""

    first_block: int
    groups: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the parameter's shape, as held here) as ``[outer, groups, block coordinates / outer]``."""

    def blocks(self, per_block: torch.Tensor) -> torch.Tensor:
        """This run's entries of a parameter's per-block vector."""


class Layout(Protocol):
    """The blocks of one parameter as runs (:class:`~optim.layout.BlockLayout` or a sharded one)."""

    n_blocks: int
    segments: Sequence[BlockRun]


@dataclass(frozen=True)
class Hyperparameters:
    """A param group's numbers of one step."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False

    def row(self) -> tuple[float, float, float, float, float, float]:
        """The kernels' row: lr, beta1, beta2, eps, weight decay and the gradient's sign."""
        return (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, -1.0 if self.maximize else 1.0)

    def scalars(self, step: float) -> StepScalars:
        """The numbers of step ``step`` (counted from 1) of a parameter."""
        return StepScalars(
            decay=1.0 - self.lr * self.weight_decay,
            beta1=self.beta1,
            beta2=self.beta2,
            inv_bias_correction2=1.0 / (1.0 - self.beta2**step),
            step_size=self.lr / (1.0 - self.beta1**step),
            eps=self.eps,
        )


@dataclass(frozen=True)
class StepScalars:
    """Per-parameter numbers of one step."""

    decay: float
    beta1: float
    beta2: float
    inv_bias_correction2: float
    step_size: float
    eps: float

    def as_row(self) -> list[float]:
        return [self.decay, self.beta1, self.beta2, self.inv_bias_correction2, self.step_size, self.eps]


@dataclass
class StepTensors:
    """One param group's step: parallel lists of tensors, the group's hyperparameters, the block
    mean squares computed ahead (None where the update reduces the gradient itself) and, for the
    plain, foreach and compiled paths, each parameter's :class:`StepScalars` (set by
    :func:`optim.functional.advance_steps`). Gradients are as the optimizer sees them: ``maximize``
    negates them in the update."""

    hyper: Hyperparameters
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    block_avgs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    layouts: list[Layout] = field(default_factory=list)
    mean_squares: list[torch.Tensor | None] = field(default_factory=list)
    scalars: list[StepScalars] = field(default_factory=list)

    def add(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, block_avg: torch.Tensor,
            step: torch.Tensor, layout: Layout) -> None:
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(exp_avg)
        self.block_avgs.append(block_avg)
        self.steps.append(step)
        self.layouts.append(layout)
        self.mean_squares.append(None)

    def signed_grads(self) -> list[torch.Tensor]:
        """The gradients the update descends: negated under ``maximize``."""
        return torch._foreach_neg(self.grads) if self.hyper.maximize else self.grads


def update_param(
    layout: Layout,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    block_avg: torch.Tensor,
    scalars: Union[StepScalars, torch.Tensor],
    mean_squares: torch.Tensor | None = None,
) -> None:
    """The update of one parameter, in place (``grad`` already signed). ``scalars`` is a
    :class:`StepScalars` or, for the compiled path, a float64 tensor row in :meth:`StepScalars.as_row`
    order; ``mean_squares`` the block means of ``grad**2`` when computed ahead."""
    row = scalars.as_row() if isinstance(scalars, StepScalars) else scalars.unbind()
    decay, beta1, beta2, inv_bc2, step_size, eps = row
    if not isinstance(decay, float) or decay != 1.0:
        param.mul_(_as(decay, param))
    exp_avg.lerp_(grad, _as(1 - beta1, exp_avg))
    for segment in layout.segments:
        blocks = segment.blocks(block_avg)
        means = (segment.blocks(mean_squares).to(blocks.dtype) if mean_squares is not None
                 else segment.mean_square(grad, blocks.dtype))
        blocks.mul_(_as(beta2, blocks)).add_(means * _as(1 - beta2, blocks))
        scale = blocks.mul(_as(inv_bc2,
                               blocks)).sqrt_().add_(_as(eps, blocks)).reciprocal_().mul_(_as(step_size, blocks))
        segment.view(param).addcmul_(segment.view(exp_avg), scale.view(1, -1, 1), value=-1)


def _as(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scalar as a Python float, or (compiled path) a 0-d tensor of at least float32 precision:
    low-precision tensors compute in float32, as eager ops do with Python scalars."""
    return value if isinstance(value, float) else value.to(torch.promote_types(like.dtype, torch.float32))


def reference_update(step: StepTensors) -> None:
    """The plain path: one parameter at a time."""
    for i, (layout, grad) in enumerate(zip(step.layouts, step.signed_grads())):
        update_param(layout, step.params[i], grad, step.exp_avgs[i], step.block_avgs[i], step.scalars[i],
                     step.mean_squares[i])


def foreach_update(step: StepTensors) -> None:
    """The foreach path on the parameters of one param group: elementwise work batched over all
    tensors, one reduction per segment. Group constants (decay, betas, eps) come as plain scalars,
    per-parameter bias corrections as scalar lists."""
    group = step.scalars[0]
    grads = step.signed_grads()
    if group.decay != 1.0:
        torch._foreach_mul_(step.params, group.decay)
    torch._foreach_lerp_(step.exp_avgs, grads, 1 - group.beta1)
    means = [_block_means(layout, grad, v.dtype) if ahead is None else ahead.to(v.dtype)
             for layout, grad, v, ahead in zip(step.layouts, grads, step.block_avgs, step.mean_squares)]
    torch._foreach_mul_(step.block_avgs, group.beta2)
    torch._foreach_mul_(means, 1 - group.beta2)
    torch._foreach_add_(step.block_avgs, means)
    scales = torch._foreach_mul(step.block_avgs, [s.inv_bias_correction2 for s in step.scalars])
    torch._foreach_sqrt_(scales)
    torch._foreach_add_(scales, group.eps)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, [s.step_size for s in step.scalars])
    params, exp_avgs, segment_scales = [], [], []
    for layout, param, exp_avg, scale in zip(step.layouts, step.params, step.exp_avgs, scales):
        for segment in layout.segments:
            params.append(segment.view(param))
            exp_avgs.append(segment.view(exp_avg))
            segment_scales.append(segment.blocks(scale).view(1, -1, 1))
    torch._foreach_addcmul_(params, exp_avgs, segment_scales, value=-1)


def _block_means(layout: BlockLayout, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    means = [segment.mean_square(grad, dtype) for segment in layout.segments]
    return means[0] if len(means) == 1 else torch.cat(means)
