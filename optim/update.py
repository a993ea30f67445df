"""The Adam-mini update rule on a batch of parameters, in its plain and foreach forms.

For every block b of a parameter (Adam-mini paper, decoupled weight decay lambda)::

    p   <- p * (1 - lr * lambda)
    m   <- beta1 * m + (1 - beta1) * g                       (one entry per coordinate)
    v_b <- beta2 * v_b + (1 - beta2) * mean(g_b ** 2)         (one scalar per block)
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v_b / (1 - beta2^t)) + eps)

:func:`update_param` is the update of one parameter (the plain path, and what the fused path
compiles); :func:`foreach_update` does the same arithmetic, in the same order, batched over tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import BlockLayout

__all__ = ["Batch", "foreach_update", "reference_update", "StepScalars", "update_param"]


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
class Batch:
    """Parallel lists of the tensors and numbers one step works on."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    block_avgs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    layouts: list[BlockLayout] = field(default_factory=list)
    scalars: list[StepScalars] = field(default_factory=list)

    def add(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], layout: BlockLayout) -> None:
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(state["exp_avg"])
        self.block_avgs.append(state["block_exp_avg_sq"])
        self.steps.append(state["step"])
        self.layouts.append(layout)

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        out = cls()
        for batch in batches:
            for name in ("params", "grads", "exp_avgs", "block_avgs", "steps", "layouts", "scalars"):
                getattr(out, name).extend(getattr(batch, name))
        return out


def update_param(
    layout: BlockLayout,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    block_avg: torch.Tensor,
    scalars: StepScalars | torch.Tensor,
) -> None:
    """The update of one parameter, in place. ``scalars`` is a :class:`StepScalars` or, for the compiled
    path, a float64 tensor row in :meth:`StepScalars.as_row` order."""
    row = scalars.as_row() if isinstance(scalars, StepScalars) else scalars.unbind()
    decay, beta1, beta2, inv_bc2, step_size, eps = row
    if not isinstance(decay, float) or decay != 1.0:
        param.mul_(_as(decay, param))
    exp_avg.lerp_(grad, _as(1 - beta1, exp_avg))
    for segment in layout.segments:
        blocks = segment.blocks(block_avg)
        blocks.mul_(_as(beta2, blocks)).add_(segment.mean_square(grad, blocks.dtype) * _as(1 - beta2, blocks))
        scale = blocks.mul(_as(inv_bc2,
                               blocks)).sqrt_().add_(_as(eps, blocks)).reciprocal_().mul_(_as(step_size, blocks))
        segment.view(param).addcmul_(segment.view(exp_avg), scale.view(1, -1, 1), value=-1)


def _as(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A scalar as a Python float, or (compiled path) a 0-d tensor of at least float32 precision:
    low-precision tensors compute in float32, as eager ops do with Python scalars."""
    return value if isinstance(value, float) else value.to(torch.promote_types(like.dtype, torch.float32))


def reference_update(batch: Batch) -> None:
    """The plain path: one parameter at a time."""
    for i, layout in enumerate(batch.layouts):
        update_param(layout, batch.params[i], batch.grads[i], batch.exp_avgs[i], batch.block_avgs[i], batch.scalars[i])


def foreach_update(batch: Batch) -> None:
    """The foreach path on the parameters of one param group: elementwise work batched over all
    tensors, one reduction per segment. Group constants (decay, betas, eps) come as plain scalars,
    per-parameter bias corrections as scalar lists."""
    group = batch.scalars[0]
    if group.decay != 1.0:
        torch._foreach_mul_(batch.params, group.decay)
    torch._foreach_lerp_(batch.exp_avgs, batch.grads, 1 - group.beta1)
    means = [_block_means(layout, grad, v.dtype) for layout, grad,
             v in zip(batch.layouts, batch.grads, batch.block_avgs)]
    torch._foreach_mul_(batch.block_avgs, group.beta2)
    torch._foreach_mul_(means, 1 - group.beta2)
    torch._foreach_add_(batch.block_avgs, means)
    scales = torch._foreach_mul(batch.block_avgs, [s.inv_bias_correction2 for s in batch.scalars])
    torch._foreach_sqrt_(scales)
    torch._foreach_add_(scales, group.eps)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, [s.step_size for s in batch.scalars])
    params, exp_avgs, segment_scales = [], [], []
    for layout, param, exp_avg, scale in zip(batch.layouts, batch.params, batch.exp_avgs, scales):
        for segment in layout.segments:
            params.append(segment.view(param))
            exp_avgs.append(segment.view(exp_avg))
            segment_scales.append(segment.blocks(scale).view(1, -1, 1))
    torch._foreach_addcmul_(params, exp_avgs, segment_scales, value=-1)


def _block_means(layout: BlockLayout, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    means = [segment.mean_square(grad, dtype) for segment in layout.segments]
    return means[0] if len(means) == 1 else torch.cat(means)
