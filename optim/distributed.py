"""Adam-mini on parameters sharded over ranks (FSDP2 ``fully_shard``, DTensor ``Shard(0)``), and checkpoints.

FSDP2 keeps each parameter as a DTensor whose local tensor is a contiguous range of rows (dim 0)
on every rank of a mesh dimension. Adam-mini needs, per block, the mean of the squared gradient over
the *whole* block. :class:`ShardedBlockLayout` cuts the parameter's blocks (a
:class:`~optim.layout.BlockLayout` of the full shape) at this rank's rows:

* blocks of rows (heads, neurons, tokens: groups along dim 0) that lie inside the local rows are
  summed locally; a group that straddles a shard boundary appears on both ranks as a partial piece;
* blocks along another axis (columns) and whole-tensor blocks get a partial sum from every rank.

Each step, :func:`reduce_block_mean_squares` sums the local per-block sums of squares of every
sharded parameter with *one* ``all_reduce`` per process group and divides by the blocks' full
element counts (whose per-rank pieces were summed over ranks once, when the layout was built, and
checked against the full sizes), and hands them to the update (``StepTensors.mean_squares``: the
update uses them instead of reducing its local gradient). Every rank then holds the same per-block means and updates the
same full vector of per-block second moments, so that state is replicated: a small plain tensor
that torch.distributed.checkpoint saves once and loads into any world size. The first moment and
the parameter update stay local, on the rank's rows. The result equals single-process Adam-mini.

Low-precision options work on the local rows too. An 8-bit first moment keeps int8 codes as a
DTensor like the parameter and quantizes each rank's shard on its own grid of 256-coordinate runs;
the scales are a DTensor with one row per rank (:func:`sharded_scales`), which checkpoints save and
load exactly, and which another number of ranks refuses (its shape differs). Stochastic rounding
rounds the local shard with draws seeded also by where the shard starts (:func:`shard_offset`).

Rank and world size come from the DTensor's device mesh (``torch.distributed``), never from the
number of visible GPUs. :func:`save_checkpoint` / :func:`load_checkpoint` save and resume a model
and its optimizer with torch.distributed.checkpoint (sharded or not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard

from hessian_blocks.blocks import Rule

from .layout import BlockLayout, Segment
from .update import StepTensors

__all__ = [
    "LocalSegment", "ShardedBlockLayout", "block_layout", "load_checkpoint", "local_tensor",
    "reduce_block_mean_squares", "save_checkpoint", "shard_offset", "sharded_scales",
]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (shares its storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_offset(param: torch.Tensor) -> int:
    """Flat index, in the whole tensor, of the first coordinate this rank holds of ``param`` (0 for a
    plain or replicated tensor). A DTensor sharded on dim 0 holds rows as ``torch.chunk`` cuts them."""
    if not isinstance(param, DTensor):
        return 0
    offset = 0
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            rows = param.shape[placement.dim]
            chunk = -(-rows // param.device_mesh.size(dim))
            start = min(rows, chunk * param.device_mesh.get_local_rank(dim))
            offset += start * math.prod(param.shape[placement.dim + 1 :])
    return offset


def sharded_scales(param: DTensor, block: int) -> DTensor:
    """Zero float32 scales of an 8-bit first moment of the DTensor ``param``, one per run of ``block``
    coordinates of each rank's local shard.

    Sharded on dim 0: every rank of the shard group holds the same number of scales (those of the
    largest shard: ``torch.chunk``'s first), as a DTensor of global shape ``[shard ranks, runs]``
    placed like ``param`` (row ``r`` on rank ``r``). torch.distributed.checkpoint saves and loads that
    layout exactly, and its shape records the number of ranks the quantization grid was made for.
    Replicated: the scales of the whole tensor, replicated.
    """
    device = param.to_local().device
    shards = [dim for dim, p in enumerate(param.placements) if isinstance(p, Shard)]
    if not shards:
        count = max(1, -(-param.numel() // block))
        return DTensor.from_local(torch.zeros(count, dtype=torch.float32, device=device), param.device_mesh,
                                  param.placements, run_check=False, shape=torch.Size((count,)), stride=(1,))
    ranks, dim = param.device_mesh.size(shards[0]), param.placements[shards[0]].dim
    largest = -(-param.shape[dim] // ranks) * math.prod(param.shape[dim + 1 :])
    runs = max(1, -(-largest // block))
    local = torch.zeros(1, runs, dtype=torch.float32, device=device)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size((ranks, runs)), stride=(runs, 1))


def block_layout(rule: Rule, param: torch.Tensor, name: str | None = None) -> BlockLayout | ShardedBlockLayout:
    """How ``rule`` cuts ``param`` into blocks, on the tensor this rank holds.

    A plain tensor (or a DTensor replicated everywhere) gets a :class:`BlockLayout`; a DTensor
    sharded on dim 0 (what FSDP2 makes) a :class:`ShardedBlockLayout` (building it is collective
    over the shard group: every rank must build the layouts of the same parameters in the same order).
    """
    shape = tuple(param.shape)
    layout = BlockLayout.from_rule(rule, shape)
    if not isinstance(param, DTensor) or all(isinstance(p, Replicate) for p in param.placements):
        return layout
    return ShardedBlockLayout.build(layout, param, name or rule.param)


@dataclass(frozen=True)
class LocalSegment:
    """A run of equal blocks as seen on this rank; a :class:`~optim.update.BlockRun` like
    :class:`~optim.layout.Segment`.

    ``piece`` is the run's part of the local tensor (a :class:`Segment` in local coordinates), or
    None for blocks with no rows here: their per-block state is still updated, from the reduced
    means, and their view of any tensor is empty.
    """

    piece: Segment | None
    first_block: int
    groups: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The local ``tensor`` as ``[outer, groups, size * inner]`` (empty for blocks not held here)."""
        if self.piece is None:
            return tensor.new_empty(0, self.groups, 1)
        return self.piece.view(tensor)

    def blocks(self, per_block: torch.Tensor) -> torch.Tensor:
        """This run's entries of the parameter's (full) per-block vector."""
        return per_block[self.first_block : self.first_block + self.groups]


@dataclass(eq=False)
class ShardedBlockLayout:
    """The blocks of one parameter sharded on dim 0, cut at this rank's rows (module docstring).

    ``segments`` cover every block of the parameter once, in block order (as a
    :class:`BlockLayout`'s do), so an update written for :class:`BlockLayout` updates the whole
    replicated per-block state.
    """

    name: str
    shape: tuple[int, ...]
    n_blocks: int
    rows: tuple[int, int]                  # this rank's rows [start, stop) of dim 0
    group: dist.ProcessGroup
    block_numels: torch.Tensor             # [n_blocks] float64, full element count of each block
    segments: tuple[LocalSegment, ...] = ()

    @classmethod
    def build(cls, layout: BlockLayout, param: DTensor, name: str) -> ShardedBlockLayout:
        """Cut ``layout`` (of the full shape) at the rows ``param`` holds here. Collective."""
        group = _shard_group(param, name)
        local_rows = param.to_local().shape[0]
        device = param.to_local().device
        rows_per_rank = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows_per_rank, torch.tensor([local_rows], device=device), group=group)
        counts = [int(r) for r in rows_per_rank]
        if sum(counts) != layout.shape[0]:
            raise ValueError(f"parameter '{name}': the ranks hold {sum(counts)} rows of dim 0, the tensor has "
                             f"{layout.shape[0]}")
        start = sum(counts[: dist.get_rank(group)])
        numels = torch.tensor(
            [seg.block_numel for seg in layout.segments for _ in range(seg.groups)], dtype=torch.float64
        )
        sharded = cls(name, layout.shape, layout.n_blocks, (start, start + local_rows), group, numels)
        sharded.segments = tuple(sharded._local_segments(layout))
        sharded._check_counts(device)
        return sharded

    def partial_square_sums(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[n_blocks] sums of ``grad**2`` over the rows held here (``grad``: the local tensor)."""
        sums = torch.zeros(self.n_blocks, dtype=dtype, device=grad.device)
        for segment in self.segments:
            if segment.piece is not None:
                segment.blocks(sums).add_(segment.view(grad).to(dtype).square().sum(dim=(0, 2)))
        return sums

    # -- construction ----------------------------------------------------------------------------

    def _local_segments(self, layout: BlockLayout) -> Iterable[LocalSegment]:
        """The local pieces of the runs, between the blocks with no rows here, in block order."""
        outer, length, inner = (layout.segments[0].outer, layout.segments[0].length, layout.segments[0].inner)
        row = math.prod(self.shape[1:])
        start, stop = self.rows[0] * row, self.rows[1] * row     # local range of the flattened tensor
        if row % (length * inner) == 0:                          # rows hold whole runs: blocks along another axis
            local_outer = (stop - start) // (length * inner)
            for seg in layout.segments:
                piece = Segment(local_outer, length, inner, seg.start, seg.groups, seg.size, seg.first_block)
                yield LocalSegment(piece, seg.first_block, seg.groups)
            return
        if outer == 1 and length == 1:                           # one whole-tensor block
            yield LocalSegment(Segment(1, 1, stop - start, 0, 1, 1, 0), 0, 1)
            return
        if outer != 1 or row % inner:
            raise ValueError(
                f"parameter '{self.name}': its blocks (outer {outer}, length {length}, inner {inner}) do not align "
                "with rows of dim 0; shard it on dim 0 with Shard(0) (the FSDP2 default)"
            )
        low, high = start // inner, stop // inner                # local range along the blocks' axis
        held = []
        for seg in layout.segments:
            for first, last, size in _pieces(seg, low, high):
                block = seg.first_block + (first - seg.start) // seg.size
                groups = (last - first) // size
                piece = Segment(1, high - low, inner, first - low, groups, size, block)
                held.append(LocalSegment(piece, block, groups))
        first_held = held[0].first_block if held else self.n_blocks
        last_held = held[-1].first_block + held[-1].groups if held else self.n_blocks
        if first_held > 0:
            yield LocalSegment(None, 0, first_held)
        yield from held
        if last_held < self.n_blocks:
            yield LocalSegment(None, last_held, self.n_blocks - last_held)

    def _check_counts(self, device: torch.device) -> None:
        """Sum the element counts of the local pieces over ranks; they must be the full block sizes."""
        counts = torch.zeros(self.n_blocks, dtype=torch.float64)
        for segment in self.segments:
            if segment.piece is not None:
                piece = segment.piece
                segment.blocks(counts).add_(piece.outer * piece.size * piece.inner)
        counts = counts.to(device)
        dist.all_reduce(counts, group=self.group)
        if not torch.equal(counts.cpu(), self.block_numels):
            raise ValueError(
                f"parameter '{self.name}': its shards cover the blocks with {counts.tolist()} elements, the blocks "
                f"have {self.block_numels.tolist()}; every rank must hold a contiguous range of rows, in rank order"
            )


def _pieces(seg: Segment, low: int, high: int) -> list[tuple[int, int, int]]:
    """Runs of ``seg``'s groups inside ``[low, high)`` along the blocks' axis, as ``(first, last, size)``.

    The whole groups inside form one run of pieces of ``seg.size``; a group cut by ``low`` or
    ``high`` (straddling a shard boundary) is a run of its own: one piece of the part held here.
    """
    begin, end = max(seg.start, low), min(seg.start + seg.groups * seg.size, high)
    if begin >= end:
        return []
    up = seg.start - (seg.start - begin) // seg.size * seg.size     # first group boundary >= begin
    down = seg.start + (end - seg.start) // seg.size * seg.size     # last group boundary <= end
    if up > down:                                                   # begin and end inside one group
        return [(begin, end, end - begin)]
    runs = []
    if begin < up:
        runs.append((begin, up, up - begin))
    if up < down:
        runs.append((up, down, seg.size))
    if down < end:
        runs.append((down, end, end - down))
    return runs


def _shard_group(param: DTensor, name: str) -> dist.ProcessGroup:
    """The process group over which ``param`` is sharded on dim 0 (other mesh dims replicate)."""
    shards = [dim for dim, placement in enumerate(param.placements) if isinstance(placement, Shard)]
    others_replicate = all(isinstance(p, (Shard, Replicate)) for p in param.placements)
    if len(shards) != 1 or param.placements[shards[0]].dim != 0 or not others_replicate:
        raise ValueError(
            f"parameter '{name}' is a DTensor placed as {param.placements}: AdamMini supports parameters sharded on "
            "dim 0 over one mesh dimension (FSDP2's fully_shard; HSDP replicates over another), replicated, or plain"
        )
    return param.device_mesh.get_group(shards[0])


def reduce_block_mean_squares(steps: Iterable[StepTensors]) -> None:
    """The per-block mean squares of the sharded parameters' gradients, summed over ranks: the stage
    before the update. Collective.

    For every parameter of ``steps`` (one :class:`~optim.update.StepTensors` per param group, local
    gradients) with a :class:`ShardedBlockLayout`, sets ``step.mean_squares[i]`` to the means over
    the whole blocks; plain layouts are left to the update. One ``all_reduce`` per process group and
    dtype carries every sharded parameter's per-block sums. Every rank of a group must pass the same
    parameters in the same order (as the same optimizer on every rank does).
    """
    buckets: dict[tuple, list[tuple[StepTensors, int, torch.Tensor]]] = {}
    for step in steps:
        for index, (layout, grad, block_avg) in enumerate(zip(step.layouts, step.grads, step.block_avgs)):
            if isinstance(layout, ShardedBlockLayout):
                key = (layout.group, block_avg.dtype, grad.device)
                buckets.setdefault(key, []).append((step, index, layout.partial_square_sums(grad, block_avg.dtype)))
    for (group, _, _), items in buckets.items():
        flat = torch.cat([sums for _, _, sums in items])
        dist.all_reduce(flat, group=group)
        for (step, index, _), totals in zip(items, flat.split([len(sums) for _, _, sums in items])):
            layout = step.layouts[index]
            step.mean_squares[index] = totals / layout.block_numels.to(totals)


# ----------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Save ``model`` and ``optimizer`` with torch.distributed.checkpoint into the folder ``path``.

    Collective when a process group exists: every rank calls it. Works for plain, DDP-wrapped and
    FSDP2-sharded models; sharded tensors are written by the ranks that hold them.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_checkpoint` wrote into ``model`` and ``optimizer`` (built as when saved,
    possibly with another sharding or world size). Collective when a process group exists; without
    one, torch.distributed.checkpoint warns that it loads in a single process, which is intended."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:
        causes = [str(exc) for exc, _ in err.failures.values()] if isinstance(err, CheckpointException) else [str(err)]
        mismatch = next((cause for cause in causes if "exp_avg_scale" in cause and "ize mismatch" in cause), None)
        if mismatch is not None:
            raise ValueError(
                f"checkpoint '{path}' holds 8-bit first-moment scales that do not fit this sharding: under FSDP2 "
                "they are quantized per run of each rank's shard (one row of scales per rank), so such a state "
                "resumes only with the number of shard ranks it was saved with, and an unsharded one only "
                "unsharded: resume it with the world size it was saved with. "
                f"torch.distributed.checkpoint: {mismatch}"
            ) from err
        raise
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
