"""How a partition rule lays one parameter tensor out as blocks, in a form tensor ops can use.

A rule of a :class:`~hessian_blocks.blocks.Partition` cuts a tensor along one axis (or a merged
run of consecutive axes) into contiguous groups (or takes it whole, or element by element). Seen
around that axis, a tensor of shape ``shape`` is a 3-D array ``[outer, length, inner]`` (merged
axes: ``length`` is their product); a run of equal groups of ``size`` indices is
then the view ``[outer, groups, size * inner]`` in which every block is one slice ``[:, b, :]``.
A :class:`BlockLayout` is the list of such uniform runs (*segments*): one for "whole", "elements"
and groups of one size, several for run-length groups. Per-block reductions become one
``vector_norm`` over dims (0, 2) of each segment, and per-block scalars broadcast back as
``[1, groups, 1]``: no index tensors, no Python loop over blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hessian_blocks.blocks import Rule, runs_of

__all__ = ["BlockLayout", "Segment"]


@dataclass(frozen=True)
class Segment:
    """A run of equal blocks: the view ``t.view(outer, length, inner)[:, start:start + groups * size]``
    reshaped to ``[outer, groups, size * inner]``; its blocks are entries ``first_block ...`` of the
    parameter's per-block state."""

    outer: int
    length: int
    inner: int
    start: int
    groups: int
    size: int
    first_block: int

    @property
    def block_numel(self) -> int:
        """Number of coordinates in each block of the segment."""
        return self.outer * self.size * self.inner

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the parameter's shape, contiguous) as ``[outer, groups, size * inner]``."""
        flat = tensor.view(self.outer, self.length, self.inner)
        if self.start or self.groups * self.size != self.length:
            flat = flat[:, self.start : self.start + self.groups * self.size]
        return flat.view(self.outer, self.groups, self.size * self.inner)

    def blocks(self, per_block: torch.Tensor) -> torch.Tensor:
        """This segment's entries of a parameter's per-block vector."""
        return per_block[self.first_block : self.first_block + self.groups]

    def mean_square(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Mean of ``grad**2`` over each block of the segment, ``[groups]`` in ``dtype``."""
        view = self.view(grad)
        if self.block_numel == 1:  # one coordinate per block: plain Adam's g*g, exactly
            return view.reshape(-1).to(dtype).square()
        norms = torch.linalg.vector_norm(view, dim=(0, 2), dtype=dtype)
        return norms.square_().div_(self.block_numel)


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of one parameter tensor, as uniform segments (see the module docstring)."""

    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def n_blocks(self) -> int:
        """Number of blocks, i.e. of second-moment scalars the parameter keeps."""
        last = self.segments[-1]
        return last.first_block + last.groups

    @classmethod
    def from_rule(cls, rule: Rule, shape: tuple[int, ...]) -> BlockLayout:
        """The layout of ``rule`` on a tensor of ``shape`` (the rule checks that it fits)."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if rule.split == "whole":
            return cls(shape, (Segment(1, 1, numel, 0, 1, 1, 0),))
        if rule.split == "elements":
            return cls(shape, (Segment(1, numel, 1, 0, numel, 1, 0),))
        sizes = rule.group_sizes(shape)  # raises a clear error when the groups do not fit the axis
        axes = rule.axes(shape)  # one axis, or a merged run of consecutive axes: its length is their product
        first, last = axes[0], axes[-1]
        outer, inner = math.prod(shape[:first]), math.prod(shape[last + 1 :])
        length = math.prod(shape[first : last + 1])
        segments, start, first_block = [], 0, 0
        for size, count in runs_of(sizes):
            segments.append(Segment(outer, length, inner, start, count, size, first_block))
            start += size * count
            first_block += count
        return cls(shape, tuple(segments))
