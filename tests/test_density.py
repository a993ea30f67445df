"""Gaussian-broadened spectral densities against closed forms and a naive dense evaluation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.integrate import trapezoid
from scipy.stats import norm

from hessian_blocks import density as density_module
from hessian_blocks.density import gaussian_density, grid_points, kth_largest_eigenvalue, spectral_grid


def naive_density(nodes, weights, grid, sigma2):
    """All nodes on all grid points: [..., K, n, G]."""
    pdf = norm.pdf(grid, loc=np.nan_to_num(nodes)[..., None], scale=np.sqrt(sigma2))
    pdf = np.where(np.isnan(nodes)[..., None], 0.0, pdf)
    dens = (weights[..., None] * pdf).sum(-2).mean(-2)
    return dens / trapezoid(dens, grid, axis=-1)[..., None]


def random_quadrature(shape, rng, pad=0):
    nodes = rng.uniform(-1.0, 3.0, size=shape)
    weights = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    if pad:
        nodes[..., -pad:] = np.nan
        weights[..., -pad:] = 0.0
    return nodes, weights


def test_spectral_grid_papers_convention():
    nodes = np.array([[[0.5, np.nan, 2.0]], [[-3.0, 1.0, np.nan]]])
    grid = spectral_grid(nodes)
    assert grid.size == 50_000 and grid[0] == -4.0 and grid[-1] == 3.0
    np.testing.assert_allclose(np.diff(grid), 7.0 / 49_999)
    with pytest.raises(ValueError, match="no finite nodes"):
        spectral_grid(np.full((2, 3), np.nan))


def test_matches_closed_form_mixture_on_coarse_grid():
    nodes = np.array([[0.0, 1.0, 2.5], [0.5, 1.5, np.nan]])  # K=2 probes
    weights = np.array([[0.2, 0.5, 0.3], [0.6, 0.4, 0.0]])
    grid = np.linspace(-2.0, 5.0, 141)  # spacing 0.05
    sigma2 = 0.01  # sigma = 2 grid spacings
    dens = gaussian_density(nodes, weights, grid, sigma2)
    sd = 0.1
    expected = 0.5 * (
        0.2 * norm.pdf(grid, 0.0, sd) + 0.5 * norm.pdf(grid, 1.0, sd) + 0.3 * norm.pdf(grid, 2.5, sd)
        + 0.6 * norm.pdf(grid, 0.5, sd) + 0.4 * norm.pdf(grid, 1.5, sd)
    )
    # the mixture lies well inside the grid and is resolved: the normalisation changes ~nothing
    np.testing.assert_allclose(dens, expected, rtol=1e-9, atol=1e-12)
    assert trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-12)


def test_integrates_to_one_per_leading_index():
    rng = np.random.default_rng(0)
    nodes, weights = random_quadrature((4, 3, 10), rng, pad=2)
    grid = spectral_grid(nodes, n_points=5000)
    dens = gaussian_density(nodes, weights, grid, sigma2=1e-4)
    assert dens.shape == (4, 5000)
    np.testing.assert_allclose(trapezoid(dens, grid, axis=-1), 1.0, atol=1e-12)
    assert (dens >= 0).all()


def test_windowed_evaluation_equals_naive(monkeypatch):
    rng = np.random.default_rng(1)
    nodes, weights = random_quadrature((2, 3, 4, 20), rng, pad=5)
    grid = spectral_grid(nodes, n_points=3000, margin=0.5)
    sigma2 = 4e-4
    expected = naive_density(nodes, weights, grid, sigma2)
    np.testing.assert_allclose(gaussian_density(nodes, weights, grid, sigma2), expected,
                               rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(density_module, "_CHUNK_ELEMENTS", 100)  # many small chunks
    np.testing.assert_allclose(gaussian_density(nodes, weights, grid, sigma2), expected,
                               rtol=1e-10, atol=1e-12)


def test_nodes_partly_outside_grid_are_cut_then_renormalised():
    nodes = np.array([[0.0, 10.0]])
    weights = np.array([[0.5, 0.5]])
    grid = np.linspace(-1.0, 1.0, 401)
    dens = gaussian_density(nodes, weights, grid, sigma2=0.01)
    np.testing.assert_allclose(dens, norm.pdf(grid, 0.0, 0.1), rtol=1e-9, atol=1e-12)


def test_papers_scale_is_memory_safe():
    # B=69 blocks x K=10 probes x m=100 nodes on 50,000 points: naive would need 27.6 GB
    rng = np.random.default_rng(2)
    nodes, weights = random_quadrature((69, 10, 100), rng)
    grid = spectral_grid(nodes)
    tracemalloc.start()
    try:
        dens = gaussian_density(nodes, weights, grid, sigma2=1e-5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert dens.shape == (69, 50_000)
    assert peak < 250e6, f"peak {peak / 1e6:.0f} MB"
    np.testing.assert_allclose(trapezoid(dens, grid, axis=-1), 1.0, atol=1e-10)


def test_sigma_below_grid_spacing_raises():
    nodes, weights = np.array([[0.0, 1000.0]]), np.array([[0.5, 0.5]])
    grid = spectral_grid(nodes)  # spacing 0.02 >> sigma 0.003
    with pytest.raises(ValueError, match="sigma2 >= .*finer grid"):
        gaussian_density(nodes, weights, grid, sigma2=1e-5)
    with pytest.raises(ValueError, match="sigma2 must be a positive"):
        gaussian_density(nodes, weights, grid, sigma2=0.0)


def test_all_nodes_outside_grid_raises():
    nodes = np.array([[[0.0, 0.1]], [[5.0, 6.0]]])
    weights = np.full((2, 1, 2), 0.5)
    grid = np.linspace(-1.0, 1.0, 1001)
    with pytest.raises(ValueError, match=r"inside the grid \[-1, 1\] for leading index\(es\) \[\(1,\)\]$"):
        gaussian_density(nodes, weights, grid, sigma2=1e-3)
    with pytest.raises(ValueError, match="inside the grid"):
        gaussian_density(np.full((1, 2), np.nan), np.zeros((1, 2)), grid, sigma2=1e-3)


def test_shape_errors():
    grid = np.linspace(0, 1, 11)
    with pytest.raises(ValueError, match="nodes and weights"):
        gaussian_density(np.zeros((2, 3)), np.zeros((2, 4)), grid, 0.1)
    with pytest.raises(ValueError, match="strictly increasing"):
        gaussian_density(np.zeros((1, 1)), np.ones((1, 1)), grid[::-1], 0.1)


def test_kth_largest_eigenvalue_of_an_exact_quadrature():
    # the nodes are all eigenvalues with weight 1/n (an exact quadrature): the k-th largest exactly,
    # whatever the order of the nodes, NaN padding and the number of probes
    eigenvalues = np.array([3.0, -1.0, 0.5, 2.0, 1.0])
    nodes = np.array([[eigenvalues, eigenvalues[::-1]],
                      [np.r_[eigenvalues[:4], np.nan], np.r_[eigenvalues[:4], np.nan]]])
    weights = np.where(np.isnan(nodes), 0.0, np.array([[[0.2] * 5], [[0.25] * 5]]))
    np.testing.assert_array_equal(kth_largest_eigenvalue(nodes, weights, [5, 4], k=1), [3.0, 3.0])
    np.testing.assert_array_equal(kth_largest_eigenvalue(nodes, weights, [5, 4], k=3), [1.0, 0.5])
    assert kth_largest_eigenvalue(nodes[0], weights[0], 5, k=2) == 2.0  # no leading axis: a 0-d array
    with pytest.raises(ValueError, match=r"matrix \(1,\) has dimension 4, fewer than k=5"):
        kth_largest_eigenvalue(nodes, weights, [5, 4], k=5)
    with pytest.raises(ValueError, match="<= 0"):
        kth_largest_eigenvalue(nodes, weights, [5, 4], k=4)
    with pytest.raises(ValueError, match="count 2.5 eigenvalues"):
        kth_largest_eigenvalue(nodes, weights / 2, [5, 4], k=3)


def test_kth_largest_eigenvalue_from_plain_lanczos_on_a_known_spectrum():
    import torch

    from hessian_blocks.lanczos import lanczos, make_probes

    # 12 separated top eigenvalues above a bulk in [0, 1]; 10 Rademacher probes, 60 plain steps:
    # the converged top eigenvalues come back several times per probe (ghosts)
    n = 400
    rng = np.random.default_rng(0)
    eigenvalues = np.r_[np.linspace(20.0, 9.0, 12), rng.uniform(0.0, 1.0, n - 12)]
    diagonal = torch.tensor(eigenvalues)
    probes = make_probes(10, n, kind="rademacher", seed=0, dtype=torch.float64)
    nodes, weights = lanczos(lambda v: v * diagonal, probes, torch.zeros(n, dtype=torch.long), 1, 60).ritz()
    tenth = np.sort(eigenvalues)[-10]
    assert kth_largest_eigenvalue(nodes, weights, n, k=10)[0] == pytest.approx(tenth, rel=1e-6)
    # the 10th-largest Ritz value pooled over the probes is the largest eigenvalue instead
    assert np.sort(nodes.ravel())[-10] == pytest.approx(eigenvalues.max(), rel=1e-6)


def test_grid_points_the_papers_50000_or_enough_for_sigma():
    narrow = np.array([[[-0.5, 2.0, np.nan]]])
    assert grid_points(narrow) == 50_000                     # the papers' grid when it is fine enough
    wide = np.array([[[0.0, 450.0]]])                        # width 452 with the margins; 2 sigma = 6.32e-3
    n = grid_points(wide, sigma2=1e-5)
    assert n == int(np.ceil(452.0 / (2 * np.sqrt(1e-5)))) + 2 == 71_470
    grid = spectral_grid(wide, n_points=n)
    assert np.diff(grid).max() <= 2 * np.sqrt(1e-5)          # gaussian_density accepts it
    dens = gaussian_density(wide, np.array([[[0.5, 0.5]]]), grid, sigma2=1e-5)
    assert trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="below half the grid spacing"):   # the papers' fixed grid would not do
        gaussian_density(wide, np.array([[[0.5, 0.5]]]), spectral_grid(wide), sigma2=1e-5)
    too_wide = np.array([[[0.0, 1e5 - 2]]])
    with pytest.raises(ValueError, match=r"span 1e\+05.*rescale_rank=10.*sigma2 \(>= 0.000631\)"):
        grid_points(too_wide, sigma2=1e-5)
    assert grid_points(too_wide, sigma2=0.000631) <= 2_000_000    # the suggested sigma2 fits
