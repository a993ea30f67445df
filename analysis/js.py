"""Jensen-Shannon distances between spectral densities.

Each density (a non-negative vector sampled on a grid shared by all blocks) is turned into a
probability vector by dividing by its sum; the Jensen-Shannon *distance* is the square root of
the JS divergence with natural logarithms,

    JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),   m = (p + q) / 2,

so it lies in [0, sqrt(ln 2)]. Terms with p_i = 0 contribute 0 (0 log 0 = 0). The value equals
``scipy.spatial.distance.jensenshannon(p, q)`` (natural base) but is computed here, and the
matrix form is vectorised over blocks.

JS0 (the papers' heterogeneity measure) is the mean of the distances over unordered pairs of
blocks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["js_distance", "js_matrix", "js0"]

# Grid points per chunk in js_matrix: temporaries are [blocks, _CHUNK] float64, small enough to
# stay in cache for ~70 blocks.
_CHUNK = 4096
_TINY = np.finfo(np.float64).tiny
_LOG2 = float(np.log(2.0))
# Probabilities below this are set to 0 (changes a divergence by < 1e-270): subnormal numbers
# make every arithmetic pass many times slower, and halving them underflows to 0.
_FLUSH = 1e-280
# js_matrix's fast pass computes KL(p||m) + KL(q||m) as  sum p log p + q log q - 2 m log m (one
# logarithm per point and pair), whose rounding error is a few ulps of the entropies (~1e-14
# absolute). Pairs whose value falls below this threshold (distance below ~7e-4) are recomputed
# with the accurate formula, so every distance keeps a relative error of about 1e-8 or better.
_REFINE_BELOW = 1e-6


def _check_vector(x: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or infinite entries")
    if np.any(a < 0):
        raise ValueError(f"{what} has negative entries (min {a.min():.3g})")
    total = a.sum()
    if not total > 0:
        raise ValueError(f"{what} has zero total mass")
    a = a / total
    a[a < _FLUSH] = 0.0
    return a


def _as_probability_rows(densities: np.ndarray) -> np.ndarray:
    """Check a [B, G] stack of densities and return each row divided by its sum."""
    d = getattr(densities, "densities", densities)  # accept a DensityResult too
    a = np.asarray(d, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"densities must be a 2-D array [blocks, grid], got shape {a.shape}")
    if a.shape[1] == 0:
        raise ValueError("densities have an empty grid")
    finite = np.all(np.isfinite(a), axis=1)
    if not np.all(finite):
        bad = np.flatnonzero(~finite)
        raise ValueError(f"densities contain NaN or infinite entries (rows {bad[:10].tolist()})")
    negative = np.any(a < 0, axis=1)
    if np.any(negative):
        bad = np.flatnonzero(negative)
        raise ValueError(f"densities have negative entries (rows {bad[:10].tolist()})")
    totals = a.sum(axis=1)
    if np.any(~(totals > 0)):
        bad = np.flatnonzero(~(totals > 0))
        raise ValueError(f"densities have zero total mass (rows {bad[:10].tolist()})")
    a = a / totals[:, None]
    a[a < _FLUSH] = 0.0
    return a


# Taylor coefficients of f(u) = (1+u) log(1+u) + (1-u) log(1-u) = sum_k u^(2k) / (k (2k-1)),
# highest first (k = 9..1); for |u| <= _SERIES_BELOW the truncation error is below 1e-18 * u^2.
_SERIES = tuple(1.0 / (k * (2 * k - 1)) for k in range(9, 0, -1))
_SERIES_BELOW = 0.1


def _divergence_accurate(p: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """KL(p || m) + KL(q || m) (= 2 * JS divergence) for p [G] against each row q of Q [k, G].

    With s = p + q and u = (p - q) / s in [-1, 1], the pointwise term is
        p log(p/m) + q log(q/m) = (s/2) f(u),   f(u) = (1+u) log1p(u) + (1-u) log1p(-u),
    and f is evaluated by its Taylor series (a polynomial in u^2) for |u| <= 0.1, where the two
    log terms would cancel, and by the logarithms elsewhere (f(+-1) = 2 log 2). Each point's term
    thus has full relative accuracy, so nearly equal densities get an accurate, non-negative
    divergence (more accurate than summing x log(x/m)). Points with p = q = 0 contribute 0.
    """
    s = Q + p
    u = np.subtract(p, Q)
    u /= np.maximum(s, _TINY)  # u = 0 where p = q = 0
    w = np.square(u)
    f = np.full_like(w, _SERIES[0])
    for c in _SERIES[1:]:
        f *= w
        f += c
    f *= w
    big = np.abs(u) > _SERIES_BELOW
    if np.any(big):
        ub = u[big]
        with np.errstate(divide="ignore", invalid="ignore"):
            fb = (1.0 + ub) * np.log1p(ub) + (1.0 - ub) * np.log1p(-ub)
        fb[np.abs(ub) == 1.0] = 2.0 * _LOG2  # one side zero: 0 * log 0 = 0
        f[big] = fb
    f *= s
    return 0.5 * f.sum(axis=-1)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (natural log) between two densities on a common grid.

    Both inputs are normalised to sum to one first, so unnormalised densities (e.g. values of a
    density function on a uniform grid) are fine. The result lies in [0, sqrt(ln 2)] and equals
    scipy.spatial.distance.jensenshannon(p, q). Raises ValueError on a shape mismatch, negative,
    NaN or infinite entries, or a vector with zero mass.
    """
    p_arr = np.asarray(p)
    q_arr = np.asarray(q)
    if p_arr.shape != q_arr.shape:
        raise ValueError(f"shape mismatch: p has shape {p_arr.shape}, q has shape {q_arr.shape}")
    pp = _check_vector(p_arr, "p")
    qq = _check_vector(q_arr, "q")
    div = float(_divergence_accurate(pp, qq[None, :])[0])
    return float(np.sqrt(min(max(0.5 * div, 0.0), _LOG2)))


def js_matrix(densities: np.ndarray) -> np.ndarray:
    """Pairwise JS distances between the rows of a [B, G] array of densities -> [B, B].

    The result is symmetric with a zero diagonal; entry (i, j) equals
    ``js_distance(densities[i], densities[j])`` to a relative 1e-8 or better. A DensityResult
    (anything with a ``densities`` attribute) is accepted as well.

    Each row is compared with all later rows at once, only on the grid points where it is
    non-zero when that is less than half the grid (spectral densities are narrow Gaussian bumps
    that vanish on most of a wide grid), with one logarithm per point and pair; 69 dense rows on a
    50,000-point grid take about a second on one core.
    """
    probs = _as_probability_rows(densities)
    n_blocks, n_grid = probs.shape
    dist = np.zeros((n_blocks, n_blocks), dtype=np.float64)
    if n_blocks < 2:
        return dist

    # Rows with the smallest support first: row i is compared with rows i+1.. on its own support.
    support = probs > 0
    order = np.argsort(support.sum(axis=1), kind="stable")
    P = probs[order]
    S = support[order]
    L = P * np.log(np.maximum(P, _TINY))  # x log x with 0 log 0 = 0
    row_mass = P.sum(axis=1)

    div = np.zeros((n_blocks, n_blocks), dtype=np.float64)
    for i in range(n_blocks - 1):
        cols = np.flatnonzero(S[i])
        sparse = 2 * cols.size < n_grid
        n_cols = cols.size if sparse else n_grid
        acc = np.zeros(n_blocks - i - 1, dtype=np.float64)
        q_mass = np.zeros(n_blocks - i - 1, dtype=np.float64)
        lp_sum = 0.0
        for start in range(0, n_cols, _CHUNK):
            if sparse:
                idx = cols[start:start + _CHUNK]
            else:
                idx = slice(start, start + _CHUNK)
            p, lp, Q, LQ = P[i, idx], L[i, idx], P[i + 1:, idx], L[i + 1:, idx]
            s = Q + p
            # -(p+q) log((p+q)/2) = -s log s + s log 2
            t = np.log(np.maximum(s, _TINY))
            t -= _LOG2
            t *= s
            np.subtract(LQ, t, out=t)
            acc += t.sum(axis=1)
            lp_sum += lp.sum()
            if sparse:
                q_mass += Q.sum(axis=1)
        acc += lp_sum
        if sparse:
            # Off p's support the term is q log(q / (q/2)) = q log 2.
            acc += np.maximum(row_mass[i + 1:] - q_mass, 0.0) * _LOG2
        div[i, i + 1:] = acc

    # Recompute nearly identical pairs with the accurate formula (see _REFINE_BELOW).
    flagged = np.triu(div < _REFINE_BELOW, k=1)
    for i in np.flatnonzero(flagged.any(axis=1)):
        js = np.flatnonzero(flagged[i])
        total = np.zeros(js.size, dtype=np.float64)
        for start in range(0, n_grid, _CHUNK):
            sl = slice(start, start + _CHUNK)
            total += _divergence_accurate(P[i, sl], P[js, sl])
        div[i, js] = total

    iu = np.triu_indices(n_blocks, k=1)
    upper = np.zeros_like(div)
    upper[iu] = np.sqrt(np.clip(0.5 * div[iu], 0.0, _LOG2))  # rounding can leave [0, ln 2]
    # Undo the support ordering.
    dist[np.ix_(order, order)] = upper + upper.T
    return dist


def js0(matrix: np.ndarray) -> float:
    """Mean JS distance over unordered pairs i < j of a [B, B] matrix (the papers' JS0).

    Only the strict upper triangle is read. Raises ValueError for a non-square matrix, B < 2, or
    non-finite entries.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square [B, B] matrix, got shape {a.shape}")
    n_blocks = a.shape[0]
    if n_blocks < 2:
        raise ValueError(f"JS0 needs at least 2 blocks, got {n_blocks}")
    values = a[np.triu_indices(n_blocks, k=1)]
    if not np.all(np.isfinite(values)):
        raise ValueError("JS matrix contains NaN or infinite entries")
    return float(values.mean())
