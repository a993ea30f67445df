"""Figures: JS-distance heatmaps and blockwise spectral densities (matplotlib).

Figures are built with ``matplotlib.figure.Figure`` directly, never through pyplot's global state,
so the functions work under any backend (Agg on headless machines) and never open a window;
each returns its Figure. In a notebook, a returned Figure displays as the cell's value;
``save_figure`` writes it to disk and closes it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .js import js0

__all__ = ["plot_js_heatmap", "plot_block_densities", "save_figure"]


class DensityLike(Protocol):
    """What plot_block_densities reads of a hessian_blocks.results.DensityResult
    (``full_scale``, the full model's divisor, is read when present)."""

    grid: np.ndarray
    densities: np.ndarray
    names: Sequence[str]
    scales: np.ndarray | None
    full: np.ndarray | None


# Densities are clipped below at this value so a log y-axis works where a density is exactly 0.
DENSITY_FLOOR = 1e-12


def plot_js_heatmap(matrix: np.ndarray, names: Sequence[str], *, title: str | None = None,
                    ax: Axes | None = None) -> Figure:
    """Labelled heatmap of a ``[B, B]`` JS distance matrix with a colour bar.

    Tick labels shrink with the number of blocks (about 4 pt at 70 blocks) and the x labels are
    rotated, so 70 block names stay readable; beyond 150 blocks only every k-th name is shown.
    Without ``title`` the figure is titled with the matrix's JS0. Draws on ``ax`` when given
    (and returns its figure).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix must be square [B, B], got shape {m.shape}")
    labels = [str(n) for n in names]
    n = m.shape[0]
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} names for a {n}x{n} matrix")
    if n == 0:
        raise ValueError("matrix is empty")

    if ax is None:
        side = float(np.clip(4.0 + 0.12 * n, 5.0, 16.0))
        fig = Figure(figsize=(side + 1.2, side), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure

    vmax = float(np.nanmax(m)) if np.any(np.isfinite(m)) else 1.0
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax if vmax > 0 else 1.0,
                   interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label("JS distance")

    fontsize = float(np.clip(300.0 / n, 3.5, 10.0))
    step = max(1, math.ceil(n / 150))
    ticks = np.arange(0, n, step)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=fontsize)
    ax.tick_params(length=2)
    if title is None:
        title = "JS distance between blocks"
        if n >= 2 and np.all(np.isfinite(m)):
            title += f" (JS0 = {js0(m):.3g})"
    ax.set_title(title)
    return fig


def _select_blocks(names: list[str], blocks: Sequence[int | str] | int | str | None) -> list[int]:
    if blocks is None:
        return list(range(len(names)))
    if isinstance(blocks, (str, int, np.integer)):
        blocks = [blocks]
    index_of = {name: i for i, name in enumerate(names)}
    chosen = []
    for b in blocks:
        if isinstance(b, str):
            if b not in index_of:
                raise ValueError(f"unknown block {b!r}; the blocks are: {names}")
            chosen.append(index_of[b])
        elif isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)):
            i = int(b)
            if not -len(names) <= i < len(names):
                raise ValueError(f"block index {i} out of range for {len(names)} blocks")
            chosen.append(i % len(names))
        else:
            raise ValueError(f"blocks must be indices or names, got {b!r}")
    return chosen


def _support_xlim(grid: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """x-range where a density is above the floor, padded by 5% (None: use the whole grid)."""
    above = np.flatnonzero(y > DENSITY_FLOOR)
    if above.size == 0:
        return None
    lo, hi = grid[above[0]], grid[above[-1]]
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * (grid[-1] - grid[0])
    return max(lo - pad, grid[0]), min(hi + pad, grid[-1])


def plot_block_densities(
    density: DensityLike,
    *,
    blocks: Sequence[int | str] | None = None,
    log: bool = True,
    title: str | None = None,
    ncols: int = 4,
    sharex: bool = False,
) -> Figure:
    """One panel per block's spectral density (the papers' style), plus the full model's if present.

    ``density`` is a DensityResult (duck-typed: grid, densities, names, scales, full). The x axis
    is the eigenvalue, or "eigenvalue / scale" when the densities were computed on rescaled
    eigenvalues (``density.scales`` is set; each panel's title shows its scale); the y axis is
    the density, on a log scale when ``log`` (values clipped below at 1e-12). ``blocks`` selects
    panels by index or name (an unknown name raises ValueError listing the names). Each panel
    shows the range where its density is above the floor, or the whole common grid with
    ``sharex=True``.
    """
    grid = np.asarray(density.grid, dtype=np.float64).reshape(-1)
    dens = np.asarray(density.densities, dtype=np.float64)
    names = [str(n) for n in density.names]
    if dens.ndim != 2 or dens.shape != (len(names), grid.size):
        raise ValueError(
            f"densities must be [B, G] = [{len(names)}, {grid.size}], got {dens.shape}"
        )
    if not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
    scales = getattr(density, "scales", None)
    full = getattr(density, "full", None)
    full_scale = getattr(density, "full_scale", None)

    panels: list[tuple[str, np.ndarray, float | None]] = []
    for i in _select_blocks(names, blocks):
        scale = None if scales is None else float(np.asarray(scales).reshape(-1)[i])
        panels.append((names[i], dens[i], scale))
    if full is not None:
        panels.append(("full model", np.asarray(full, dtype=np.float64).reshape(-1),
                       None if full_scale is None else float(full_scale)))
    if not panels:
        raise ValueError("nothing to plot: no blocks selected and no full-model density")

    n = len(panels)
    cols = min(int(ncols), n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()

    rescaled = scales is not None
    xlabel = "eigenvalue / scale" if rescaled else "eigenvalue"
    for ax, (name, y, scale) in zip(axes, panels):
        if y.shape != grid.shape:
            raise ValueError(f"density of {name!r} has shape {y.shape}, grid has {grid.shape}")
        yy = np.clip(y, DENSITY_FLOOR, None) if log else y
        ax.plot(grid, yy, linewidth=0.8)
        if log:
            ax.set_yscale("log")
        lim = (grid[0], grid[-1]) if sharex else _support_xlim(grid, y)
        if lim is not None and lim[1] > lim[0]:
            ax.set_xlim(*lim)
        label = name if scale is None else f"{name}\n(scale {scale:.3g})"
        ax.set_title(label, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("density (log scale)" if log else "density", fontsize=8)
        ax.tick_params(labelsize=7)
    if title is not None:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` at 150 dpi (format from the suffix; parent folders created).

    Closes the figure (releases it from pyplot when it was made there). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    if "matplotlib.pyplot" in sys.modules:  # a figure made through pyplot: release it there too
        sys.modules["matplotlib.pyplot"].close(fig)
    return path
