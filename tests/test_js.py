"""JS distances: against scipy's jensenshannon, closed forms, matrix/JS0 consistency, errors."""

from __future__ import annotations

import time
from itertools import combinations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from analysis.js import js0, js_distance, js_matrix

SQRT_LN2 = float(np.sqrt(np.log(2.0)))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_matches_scipy_random(rng):
    for _ in range(20):
        n = int(rng.integers(2, 500))
        p, q = rng.random(n), rng.random(n)
        assert js_distance(p, q) == pytest.approx(jensenshannon(p, q), rel=1e-12, abs=1e-15)


def test_matches_scipy_with_zeros(rng):
    for _ in range(20):
        p, q = rng.random(300), rng.random(300)
        p[rng.random(300) < 0.4] = 0.0
        q[rng.random(300) < 0.4] = 0.0
        q[:5] = 0.0
        p[:5] = 0.0  # some points zero in both
        assert js_distance(p, q) == pytest.approx(jensenshannon(p, q), rel=1e-12, abs=1e-15)


def test_unnormalised_densities(rng):
    grid = np.linspace(-3, 3, 2001)
    p = np.exp(-0.5 * (grid - 0.3) ** 2) * 17.0  # arbitrary total mass
    q = np.exp(-0.5 * (grid + 0.4) ** 2 / 0.5) * 0.01
    expected = jensenshannon(p, q)
    assert js_distance(p, q) == pytest.approx(expected, rel=1e-12)
    # scale invariance
    assert js_distance(3.0 * p, q / 7.0) == pytest.approx(expected, rel=1e-12)
    # accepts lists and 2-D arrays of the same shape (flattened)
    expected10 = jensenshannon(p[:10], q[:10])
    assert js_distance(list(p[:10]), list(q[:10])) == pytest.approx(expected10, rel=1e-12)
    P, Q = rng.random((4, 5)), rng.random((4, 5))
    assert js_distance(P, Q) == pytest.approx(jensenshannon(P.ravel(), Q.ravel()), rel=1e-12)


def test_identity_symmetry_bounds(rng):
    p = rng.random(1000)
    assert js_distance(p, p) == 0.0
    assert js_distance(p, 5.0 * p) == pytest.approx(0.0, abs=1e-8)
    for _ in range(20):
        p, q = rng.random(50) ** 4, rng.random(50) ** 4
        d = js_distance(p, q)
        assert d == js_distance(q, p)
        assert 0.0 <= d <= SQRT_LN2


def test_disjoint_supports_give_sqrt_ln2(rng):
    p = np.zeros(100)
    q = np.zeros(100)
    p[:40] = rng.random(40) + 0.1
    q[60:] = rng.random(40) + 0.1
    assert js_distance(p, q) == pytest.approx(SQRT_LN2, rel=1e-14)
    assert js_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(SQRT_LN2, rel=1e-15)


def test_closed_form_two_point():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4);
    # KL(p||m) = log(4/3), KL(q||m) = 1/2 log(2/3) + 1/2 log 2
    expected = np.sqrt(0.5 * (np.log(4 / 3) + 0.5 * np.log(2 / 3) + 0.5 * np.log(2)))
    assert js_distance([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected, rel=1e-14)


def test_nearly_identical_is_accurate():
    # u = (p - q) / (p + q) = +-eps everywhere: JS divergence = 1/2 sum m f(u), f(u) ~ u^2
    eps = 1e-6
    p = np.array([1 + eps, 1 - eps]) / 2
    q = np.array([1 - eps, 1 + eps]) / 2
    f = (1 + eps) * np.log1p(eps) + (1 - eps) * np.log1p(-eps)
    expected = np.sqrt(0.5 * f)  # sum over both points of (s/2) f, halved
    assert js_distance(p, q) == pytest.approx(expected, rel=1e-9)
    assert js_matrix(np.stack([p, q]))[0, 1] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "p, q, match",
    [
        (np.ones(3), np.ones(4), "shape"),
        (np.array([1.0, -0.1, 1.0]), np.ones(3), "negative"),
        (np.array([1.0, np.nan, 1.0]), np.ones(3), "NaN"),
        (np.ones(3), np.array([1.0, np.inf, 1.0]), "NaN or infinite"),
        (np.zeros(3), np.ones(3), "zero total mass"),
        (np.ones(3), np.zeros(3), "zero total mass"),
        (np.ones(0), np.ones(0), "empty"),
    ],
)
def test_js_distance_errors(p, q, match):
    with pytest.raises(ValueError, match=match):
        js_distance(p, q)


def _random_densities(rng, n_blocks, n_grid, zero_frac=0.3):
    d = rng.random((n_blocks, n_grid)) ** 3
    d[rng.random((n_blocks, n_grid)) < zero_frac] = 0.0
    return d * rng.uniform(0.1, 10.0, (n_blocks, 1))


def _narrow_bumps(rng, n_blocks, n_grid):
    """Spectral-like rows: sums of narrow Gaussians, exactly zero on most of the grid."""
    grid = np.linspace(-1.0, 10.0, n_grid)
    d = np.zeros((n_blocks, n_grid))
    for b in range(n_blocks):
        for c in rng.exponential(rng.uniform(0.2, 4.0), size=8):
            z = (grid - c) / 0.02
            d[b] += np.where(np.abs(z) < 8, np.exp(-0.5 * z * z), 0.0)
    return d


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_js_matrix_matches_pairwise(rng, kind):
    d = _random_densities(rng, 9, 400) if kind == "dense" else _narrow_bumps(rng, 9, 4000)
    d[3] = 2.5 * d[1]  # a duplicate (scaled) row: distance exactly 0 after refinement
    m = js_matrix(d)
    assert m.shape == (9, 9)
    assert np.array_equal(m, m.T)
    assert np.all(np.diag(m) == 0.0)
    assert m[1, 3] == pytest.approx(0.0, abs=1e-9)
    for i, j in combinations(range(9), 2):
        assert m[i, j] == pytest.approx(js_distance(d[i], d[j]), rel=1e-9, abs=1e-12)
        if (i, j) != (1, 3):  # scipy gives NaN there (sqrt of a rounding-negative divergence)
            assert m[i, j] == pytest.approx(jensenshannon(d[i], d[j]), rel=1e-9, abs=1e-9)
    assert np.all((m >= 0) & (m <= SQRT_LN2 + 1e-15))


def test_js_matrix_close_rows_refined(rng):
    base = rng.random(500) + 0.5
    d = base[None, :] * (1.0 + 1e-4 * rng.standard_normal((5, 500)))
    m = js_matrix(d)
    for i, j in combinations(range(5), 2):
        assert m[i, j] == pytest.approx(js_distance(d[i], d[j]), rel=1e-8)
        assert 0 < m[i, j] < 1e-4


def test_js_matrix_accepts_density_result_and_small_cases(rng):
    class Stand:
        densities = _random_densities(rng, 3, 50)

    np.testing.assert_array_equal(js_matrix(Stand()), js_matrix(Stand.densities))
    assert js_matrix(np.ones((1, 7))).tolist() == [[0.0]]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 0)), "empty"),
        (np.array([[1.0, 2.0], [0.0, 0.0]]), r"zero total mass \(rows \[1\]\)"),
        (np.array([[1.0, -2.0], [1.0, 1.0]]), r"negative entries \(rows \[0\]\)"),
        (np.array([[1.0, 2.0], [np.nan, 1.0]]), "NaN"),
    ],
)
def test_js_matrix_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        js_matrix(bad)


def test_js0_is_mean_over_pairs(rng):
    d = _random_densities(rng, 7, 200)
    m = js_matrix(d)
    explicit = np.mean([js_distance(d[i], d[j]) for i, j in combinations(range(7), 2)])
    assert js0(m) == pytest.approx(explicit, rel=1e-10)
    # only the strict upper triangle is read
    m2 = m.copy()
    m2[np.tril_indices(7)] = 99.0
    assert js0(m2) == pytest.approx(js0(m), rel=1e-15)
    assert js0(np.array([[0.0, 0.3], [0.3, 0.0]])) == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [np.zeros((1, 1)), np.zeros((0, 0)), np.zeros((2, 3)), np.zeros(4)])
def test_js0_errors(bad):
    with pytest.raises(ValueError):
        js0(bad)


def test_js_matrix_speed_papers_size(rng):
    """69 blocks on the papers' 50,000-point grid: dense rows (the worst case for the support
    trick) finish in a few seconds even on a loaded CI core; spectral-like sparse rows faster."""
    d = rng.random((69, 50_000))
    start = time.perf_counter()
    m = js_matrix(d)
    elapsed = time.perf_counter() - start
    assert elapsed < 8.0, f"js_matrix took {elapsed:.2f}s"
    for i, j in [(0, 1), (5, 68), (33, 34)]:
        assert m[i, j] == pytest.approx(jensenshannon(d[i], d[j]), rel=1e-9)
