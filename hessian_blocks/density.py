"""Spectral densities from Lanczos quadrature: Gaussian broadening on a grid.

Conventions of the papers (SLQ): a uniform grid of 50,000 points over
``[min(nodes) - 1, max(nodes) + 1]``, Gaussians of variance ``sigma2 = 1e-5`` centred at the Ritz
nodes and weighted by the quadrature weights, averaged over probes, normalised to integrate to 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import trapezoid

__all__ = ["DEFAULT_GRID_POINTS", "MAX_GRID_POINTS", "gaussian_density", "grid_points", "kth_largest_eigenvalue",
           "spectral_grid"]

DEFAULT_GRID_POINTS = 50_000    # the papers' grid
MAX_GRID_POINTS = 2_000_000     # the most grid_points() chooses: ~16 MB per density

# Each Gaussian is evaluated on the grid points within this many standard deviations of its
# centre (the rest is below exp(-32) ~ 1e-14 of its peak).
_CUTOFF_SIGMAS = 8.0
# Upper bound on the number of (node, grid point) pairs evaluated at once.
_CHUNK_ELEMENTS = 1 << 20


def _lead_index(flat: int, lead: tuple[int, ...]) -> tuple[int, ...]:
    """Leading index (a tuple of ints) of row ``flat`` of a ``[prod(lead), ...]`` reshape."""
    return tuple(int(i) for i in np.unravel_index(flat, lead)) if lead else ()


def grid_points(nodes: np.ndarray, sigma2: float = 1e-5, margin: float = 1.0) -> int:
    """How many points a :func:`spectral_grid` over ``nodes`` needs for Gaussians of variance
    ``sigma2``: the papers' 50,000, more where the range is so wide that the spacing would exceed
    2 sigma (the Gaussians would fall between grid points).

    Raises ``ValueError`` when that is more than ``MAX_GRID_POINTS`` (the eigenvalues span too wide
    a range for this ``sigma2``: rescale them, or broaden more).
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    finite = nodes[np.isfinite(nodes)]
    if finite.size == 0:
        raise ValueError("no finite nodes to build a grid from")
    if not (np.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive number, got {sigma2}")
    width = float(finite.max() - finite.min()) + 2.0 * margin
    needed = max(DEFAULT_GRID_POINTS, math.ceil(width / (2.0 * math.sqrt(sigma2))) + 2)
    if needed > MAX_GRID_POINTS:
        enough = 1.01 * (width / (2.0 * (MAX_GRID_POINTS - 3))) ** 2   # a sigma2 that fits, rounded up
        raise ValueError(
            f"the eigenvalues span {width:.3g}: Gaussians with sigma2 = {sigma2:g} need {needed} grid points, "
            f"more than {MAX_GRID_POINTS}. Rescale each block's eigenvalues first (rescale_rank=10, as the "
            f"papers' figures do), or use a larger sigma2 (>= {enough:.3g})"
        )
    return needed


def spectral_grid(nodes: np.ndarray, n_points: int = DEFAULT_GRID_POINTS, margin: float = 1.0) -> np.ndarray:
    """Uniform grid of ``n_points`` over ``[min - margin, max + margin]`` of the finite ``nodes``."""
    nodes = np.asarray(nodes, dtype=np.float64)
    finite = nodes[np.isfinite(nodes)]
    if finite.size == 0:
        raise ValueError("no finite nodes to build a grid from")
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    lo, hi = finite.min() - margin, finite.max() + margin
    if lo == hi:
        raise ValueError("all nodes are equal and margin is 0: the grid would have zero width")
    return np.linspace(lo, hi, n_points)


def _check_grid(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError(f"grid must be 1-D with at least 2 points, got shape {grid.shape}")
    if not np.all(np.isfinite(grid)) or not np.all(np.diff(grid) > 0):
        raise ValueError("grid must be finite and strictly increasing")
    return grid


def gaussian_density(
    nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma2: float = 1e-5
) -> np.ndarray:
    """Probe-averaged Gaussian-broadened densities on ``grid``.

    ``nodes`` and ``weights`` are ``[..., K, n]`` (``K`` probes, ``n`` quadrature nodes each; NaN
    nodes are padding and ignored). Returns ``[..., G]``: for each leading index,
    ``mean_k sum_i w_ki N(x; theta_ki, sigma2)`` normalised to integrate to 1 on the grid
    (trapezoid rule).

    Memory: each node is evaluated only on the grid points within 8 sigma of it (found with
    ``searchsorted``), in chunks, so no ``[..., K, n, G]`` array is ever formed.

    Raises ``ValueError`` when sigma is below half the largest grid spacing (a Gaussian could
    fall between grid points and its mass would be lost or aliased), or when every node of some
    leading index lies outside the grid.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    grid = _check_grid(grid)
    if nodes.ndim < 2 or nodes.shape != weights.shape:
        raise ValueError(
            f"nodes and weights must both be [..., K, n], got {nodes.shape} and {weights.shape}"
        )
    if not (np.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive number, got {sigma2}")
    sigma = math.sqrt(sigma2)
    spacing = float(np.diff(grid).max())
    if sigma < 0.5 * spacing:
        raise ValueError(
            f"sigma = sqrt(sigma2) = {sigma:.3g} is below half the grid spacing {spacing:.3g}: "
            f"the Gaussians would fall between grid points. Use sigma2 >= {(0.5 * spacing) ** 2:.3g}, "
            f"or a finer grid (about {math.ceil((grid[-1] - grid[0]) / (2 * sigma)) + 1} points or "
            "more over this range), or rescale the eigenvalues (e.g. rescale_rank=10) first"
        )

    lead, (n_probes, n_nodes) = nodes.shape[:-2], nodes.shape[-2:]
    n_lead, n_grid = math.prod(lead), grid.size
    flat_nodes = nodes.reshape(n_lead, n_probes * n_nodes)
    flat_weights = weights.reshape(n_lead, n_probes * n_nodes)
    keep = np.isfinite(flat_nodes) & (flat_weights != 0)
    owner = np.broadcast_to(np.arange(n_lead)[:, None], keep.shape)[keep]
    theta, w = flat_nodes[keep], flat_weights[keep]
    lo = np.searchsorted(grid, theta - _CUTOFF_SIGMAS * sigma, side="left")
    hi = np.searchsorted(grid, theta + _CUTOFF_SIGMAS * sigma, side="right")

    out = np.zeros(n_lead * n_grid)
    width = int((hi - lo).max(initial=0))
    if width > 0:
        chunk = max(1, _CHUNK_ELEMENTS // width)
        offsets = np.arange(width)
        norm = 1.0 / math.sqrt(2.0 * math.pi * sigma2)
        for s in range(0, theta.size, chunk):
            sl = slice(s, s + chunk)
            idx = lo[sl, None] + offsets  # [c, width]
            valid = idx < hi[sl, None]
            idx = np.minimum(idx, n_grid - 1)
            vals = w[sl, None] * norm * np.exp(-0.5 * (grid[idx] - theta[sl, None]) ** 2 / sigma2)
            flat_idx = owner[sl, None] * n_grid + idx
            out += np.bincount(flat_idx[valid], vals[valid], minlength=n_lead * n_grid)
    out = out.reshape(n_lead, n_grid) / n_probes

    mass = trapezoid(out, grid, axis=-1)
    empty = np.flatnonzero(~(mass > 0))
    if empty.size:
        which = [_lead_index(i, lead) for i in empty[:5]]
        raise ValueError(
            f"no node with nonzero weight falls inside the grid [{grid[0]:.6g}, {grid[-1]:.6g}] "
            f"for leading index(es) {which}{' ...' if empty.size > 5 else ''}"
        )
    return (out / mass[:, None]).reshape(*lead, n_grid)


def kth_largest_eigenvalue(
    nodes: np.ndarray, weights: np.ndarray, dims: np.ndarray | int, k: int = 10, *, require_positive: bool = True
) -> np.ndarray:
    """SLQ estimate of the ``k``-th largest eigenvalue of each matrix (the papers' figures divide
    each block's eigenvalues by its 10th-largest).

    ``nodes`` and ``weights`` are ``[..., K, n]`` Ritz values and quadrature weights of K probes
    (each probe's weights sum to 1; NaN nodes are ignored), ``dims`` the matrices' dimensions
    (``[...]`` or one number); the result is ``[...]``. The quadrature counts the eigenvalues
    >= t as ``dims * mean over probes of sum_j w_j [node_j >= t]``; the estimate is the largest
    node at which that count reaches ``k``. (The k-th largest Ritz value is a poor estimate: plain
    Lanczos repeats converged extreme eigenvalues, and pooled over k or more probes the k-th
    largest node is about the largest eigenvalue.) Raises ``ValueError`` when a matrix has fewer
    than ``k`` eigenvalues or (unless ``require_positive=False``, which returns the estimates as they
    are) the estimate is not positive.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if nodes.ndim < 2 or nodes.shape != weights.shape:
        raise ValueError(f"nodes and weights must both be [..., K, n], got {nodes.shape} and {weights.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lead, probes = nodes.shape[:-2], nodes.shape[-2]
    dims = np.broadcast_to(np.asarray(dims, dtype=np.float64), lead).reshape(-1)
    short = np.flatnonzero(dims < k)
    if short.size:
        i = int(short[0])
        raise ValueError(f"matrix {_lead_index(i, lead)} has dimension {dims[i]:.0f}, fewer than k={k} eigenvalues")
    flat = nodes.reshape(dims.size, -1)
    mass = np.where(np.isfinite(flat), weights.reshape(dims.size, -1), 0.0) / probes
    order = np.argsort(np.where(np.isfinite(flat), -flat, np.inf), axis=1, kind="stable")  # descending, NaN last
    counts = dims[:, None] * np.cumsum(np.take_along_axis(mass, order, axis=1), axis=1)
    reached = counts >= k * (1 - 1e-9)
    missing = np.flatnonzero(~reached.any(axis=1))
    if missing.size:
        i = int(missing[0])
        raise ValueError(f"the weights of matrix {_lead_index(i, lead)} count {counts[i, -1]:.3g} eigenvalues, "
                         f"fewer than k={k}: they must sum to 1 per probe")
    kth = np.take_along_axis(flat, np.take_along_axis(order, reached.argmax(axis=1)[:, None], axis=1), axis=1)[:, 0]
    bad = np.flatnonzero(~(kth > 0))
    if require_positive and bad.size:
        i = int(bad[0])
        raise ValueError(
            f"the estimated {k}-th largest eigenvalue of matrix {_lead_index(i, lead)} "
            f"is {kth[i]:.6g} <= 0: cannot rescale by it"
        )
    return kth.reshape(lead)
