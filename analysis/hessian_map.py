"""The dense Hessian of a few parameter tensors, laid out block by block, as a heatmap.

This is the papers' "near block-diagonal Hessian" figure: the Hessian of a small model (or of one
tensor) with the blocks of a partition drawn on it. Coordinates are ordered block after block
(the layout of :class:`hessian_blocks.hvp.BlockHessian`), so every block - a row group, a column
group of a transposed Conv1D weight, a run of a fused q|k|v weight - is one contiguous square on
the diagonal::

    from analysis.hessian_map import hessian_map, plot_hessian_blocks
    hmap = hessian_map(spec.model, spec.loss_fn, batches, partition, params=["blocks.0.attn.q_proj.weight"])
    fig = plot_hessian_blocks(hmap.matrix, hmap.boundaries, major=hmap.tensor_boundaries, title="q_proj")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from hessian_blocks.blocks import Partition
from hessian_blocks.hvp import BlockHessian

__all__ = ["HessianMap", "hessian_map", "plot_hessian_blocks"]

# The dense matrix needs one Hessian-vector product per coordinate; beyond this it is refused.
MAX_COORDINATES = 8192


@dataclass
class HessianMap:
    """Dense Hessian on the coordinates of some blocks, in block layout order.

    ``boundaries`` are the offsets where each block starts (after the first), ``tensor_boundaries``
    where each parameter tensor starts; ``blocks`` names the blocks in order.
    """

    matrix: np.ndarray
    blocks: list[str]
    params: list[str]
    boundaries: list[int]
    tensor_boundaries: list[int]


def hessian_map(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[Any, torch.Tensor]],
    partition: Partition | None = None,
    params: Sequence[str] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    strategy: str = "auto",
    max_coordinates: int = MAX_COORDINATES,
) -> HessianMap:
    """Dense Hessian (cross-tensor terms included) of the tensors ``params`` (default: all).

    Blocks come from ``partition`` (default: one block per tensor). Computed with exact
    Hessian-vector products, one per coordinate.
    """
    partition = partition if partition is not None else Partition.per_tensor(model)
    chosen = list(partition.param_shapes) if params is None else list(params)
    unknown = [p for p in chosen if p not in partition.param_shapes]
    if unknown:
        raise ValueError(f"{unknown} are not parameters of the partition; it has {list(partition.param_shapes)[:6]} "
                         "...")
    order = {name: i for i, name in enumerate(chosen)}
    blocks = sorted((b for b in partition.blocks if b.param in order), key=lambda b: order[b.param])
    size = sum(b.numel for b in blocks)
    if size > max_coordinates:
        raise ValueError(
            f"the selected tensors have {size} coordinates; a dense map needs one Hessian-vector product per "
            f"coordinate and is limited to {max_coordinates}: select fewer tensors (params=...) or a smaller model"
        )
    hessian = BlockHessian(model, loss_fn, batches, blocks, dtype=dtype, device=device, strategy=strategy)
    matrix = hessian.matvec(torch.eye(size, dtype=dtype, device=hessian.device)).double().cpu().numpy()
    offsets = hessian.layout.offsets
    tensor_starts = [offsets[i] for i, b in enumerate(blocks) if i > 0 and b.param != blocks[i - 1].param]
    return HessianMap((matrix + matrix.T) / 2, [b.name for b in blocks], chosen, list(offsets[1:]), tensor_starts)


def plot_hessian_blocks(
    matrix: np.ndarray,
    boundaries: Sequence[int],
    *,
    major: Sequence[int] = (),
    title: str | None = None,
    log: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """Heatmap of |H| with every block drawn as a square on the diagonal.

    Args:
        matrix: square Hessian (any layout; boundaries are indices into it).
        boundaries: indices where a new block starts (thin white squares).
        major: indices where a new tensor starts (red squares around each tensor).
        log: logarithmic colour scale (entries below 1e-6 of the largest are clipped to it).
    Draws on ``ax`` when given and returns its figure.
    """
    m = np.abs(np.asarray(matrix, dtype=np.float64))
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square array, got shape {m.shape}")
    n = m.shape[0]
    bad = [b for b in list(boundaries) + list(major) if not 0 < b < n]
    if bad:
        raise ValueError(f"boundaries must lie strictly inside 0..{n}, got {bad[:5]}")
    if ax is None:
        fig = Figure(figsize=(6.4, 5.6), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    peak = m.max()
    if log and peak > 0:
        norm = LogNorm(vmin=peak * 1e-6, vmax=peak)
        image = ax.imshow(np.clip(m, peak * 1e-6, None), cmap="viridis", norm=norm, interpolation="nearest")
    else:
        image = ax.imshow(m, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="|Hessian entry|")
    thin = max(0.2, min(1.0, 40.0 / max(len(boundaries), 1)))
    for edges, colour, width in ((boundaries, "white", thin), (major, "red", 1.2)):
        corners = [0, *sorted(edges), n]
        for start, stop in zip(corners, corners[1:]):
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), stop - start, stop - start,
                                   fill=False, edgecolor=colour, linewidth=width))
    ax.set_xlabel("coordinate (white squares: blocks" + (", red: tensors)" if len(major) else ")"))
    ax.set_ylabel("coordinate")
    ax.set_title(title or f"Hessian ({n} coordinates, {len(boundaries) + 1} blocks)")
    return fig
