"""SpectrumResult / DensityResult: statistics against dense numbers, exact save/load round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

from hessian_blocks.density import gaussian_density, kth_largest_eigenvalue
from hessian_blocks.lanczos import lanczos, make_probes
from hessian_blocks.results import DensityResult, SpectrumResult
from tests.test_lanczos import block_operator, random_sym, sym_with_spectrum


def spectrum(blocks, steps, n_probes, *, seed=0, reorth=False, full=False, kind="rademacher"):
    matvec, block_ids = block_operator(blocks)
    start = make_probes(n_probes, block_ids.numel(), kind=kind, seed=seed)
    res = lanczos(matvec, start, block_ids, len(blocks), steps, reorthogonalize=reorth)
    full_res = None
    if full:
        full_res = lanczos(matvec, start, torch.zeros_like(block_ids), 1, steps, reorthogonalize=reorth)
    n = len(blocks)
    return SpectrumResult(
        names=[f"layer.{b}.weight[rows 0:{a.shape[0]}]" for b, a in enumerate(blocks)],
        params=[f"layer.{b}.weight" for b in range(n)],
        shapes=[(a.shape[0],) for a in blocks],
        sizes=np.array([a.shape[0] for a in blocks]),
        lanczos=res,
        settings={"model": "dense-test", "steps": steps, "probes": n_probes, "seed": seed,
                  "dtype": "float64", "grid": (1, 2)},
        full=full_res,
    ), start


@pytest.fixture(scope="module")
def blocks():
    rng = np.random.default_rng(0)
    return [random_sym(6, rng) + 2 * np.eye(6), sym_with_spectrum(np.linspace(0.5, 9.0, 15), rng),
            random_sym(24, rng)]


def test_lambda_min_max_match_eigvalsh_with_m_equal_dim(blocks):
    res, _ = spectrum(blocks, steps=24, n_probes=2, reorth=True)
    exact = [np.linalg.eigvalsh(a) for a in blocks]
    np.testing.assert_allclose(res.lambda_min(), [e[0] for e in exact], atol=1e-8)
    np.testing.assert_allclose(res.lambda_max(), [e[-1] for e in exact], atol=1e-8)


def test_trace_estimate_is_hutchinson(blocks):
    n_probes = 4000
    res, start = spectrum(blocks, steps=2, n_probes=n_probes, seed=3)
    est = res.trace_estimate()
    offset = 0
    for b, a in enumerate(blocks):
        n = a.shape[0]
        v = start[:, offset : offset + n].numpy()
        offset += n
        # exactly the Hutchinson estimator (v^T v = n for Rademacher) and the quadrature's 1st moment
        hutchinson = np.einsum("ki,ij,kj->k", v, a, v).mean()
        assert est[b] == pytest.approx(hutchinson, rel=1e-12)
        nodes, weights = res.ritz()
        first_moment = np.nansum(nodes[b] * weights[b], axis=-1).mean()
        assert est[b] == pytest.approx(n * first_moment, rel=1e-12, abs=1e-12)
        # Rademacher variance: Var(v^T A v) = 2 (||A||_F^2 - sum_i A_ii^2); allow 5 standard errors
        stderr = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / n_probes)
        assert abs(est[b] - np.trace(a)) < 5 * stderr, (b, est[b], np.trace(a), stderr)


def test_save_load_round_trip_is_exact(tmp_path, blocks):
    res, _ = spectrum(blocks, steps=10, n_probes=3, full=True)
    path = res.save(tmp_path / "sub" / "spectrum")
    assert path.name == "spectrum.npz" and path.exists()
    back = SpectrumResult.load(path)
    assert back == res
    assert back.settings["grid"] == [1, 2]  # JSON-normalised at construction, so saving loses nothing
    assert back.shapes == [(6,), (15,), (24,)]
    for a, b in zip(back.ritz(), res.ritz()):
        np.testing.assert_array_equal(a, b)
    # without the full run too
    res.full = None
    assert SpectrumResult.load(res.save(tmp_path / "nofull.npz")) == res
    assert SpectrumResult.load(tmp_path / "nofull.npz").full is None


def test_settings_must_be_json(blocks):
    res, _ = spectrum(blocks, steps=3, n_probes=1)
    with pytest.raises(TypeError):
        SpectrumResult(res.names, res.params, res.shapes, res.sizes, res.lanczos, {"bad": object()})


def test_inconsistent_metadata_raises(blocks):
    res, _ = spectrum(blocks, steps=3, n_probes=1)
    with pytest.raises(ValueError, match="3 blocks"):
        SpectrumResult(res.names[:2], res.params, res.shapes, res.sizes, res.lanczos, {})
    with pytest.raises(ValueError, match="do not match"):
        SpectrumResult(res.names, res.params, res.shapes, res.sizes + 1, res.lanczos, {})


def test_density_common_grid_and_full(blocks):
    res, _ = spectrum(blocks, steps=20, n_probes=4, full=True)
    dens = res.density(n_points=20_000)
    nodes, weights = res.ritz()
    full_nodes = res.full.ritz()[0]
    finite = np.concatenate([nodes[np.isfinite(nodes)], full_nodes[np.isfinite(full_nodes)]])
    assert dens.grid[0] == finite.min() - 1 and dens.grid[-1] == finite.max() + 1
    assert dens.densities.shape == (3, 20_000) and dens.full.shape == (20_000,)
    np.testing.assert_allclose(trapezoid(dens.densities, dens.grid, axis=-1), 1.0, atol=1e-10)
    assert trapezoid(dens.full, dens.grid) == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(dens.densities, gaussian_density(nodes, weights, dens.grid, 1e-5))
    assert dens.scales is None and dens.full_scale is None and dens.names == res.names


def test_density_grid_grows_with_the_eigenvalue_range():
    """The default grid is the papers' 50,000 points, more when the eigenvalues span so wide a range
    that 50,000 would leave sigma below half the spacing; the densities equal those on that grid."""
    rng = np.random.default_rng(1)
    narrow, _ = spectrum([sym_with_spectrum(np.linspace(-1.0, 3.0, 12), rng)], steps=12, n_probes=2)
    assert narrow.density().grid.size == 50_000
    wide_blocks = [sym_with_spectrum(np.linspace(0.0, 500.0, 12), rng),
                   sym_with_spectrum(np.linspace(0.5, 2.0, 8), rng)]
    wide, _ = spectrum(wide_blocks, steps=12, n_probes=2)
    dens = wide.density()
    nodes, weights = wide.ritz()
    width = np.nanmax(nodes) - np.nanmin(nodes) + 2.0
    assert dens.grid.size == int(np.ceil(width / (2 * np.sqrt(1e-5)))) + 2 > 50_000
    np.testing.assert_allclose(dens.densities, gaussian_density(nodes, weights, dens.grid, 1e-5))
    np.testing.assert_allclose(trapezoid(dens.densities, dens.grid, axis=-1), 1.0, atol=1e-10)
    with pytest.raises(ValueError, match="below half the grid spacing"):
        wide.density(n_points=50_000)   # an explicit size is taken as given, and checked


def test_density_rescaled_by_kth_largest(blocks, tmp_path):
    res, _ = spectrum(blocks, steps=20, n_probes=4, full=True)
    with pytest.raises(ValueError,
                       match=r"rescale_rank=10: 1 of 3 blocks cannot be divided by their 10-th largest eigenvalue: "
                             r"'layer.0.weight\[rows 0:6\]' \(6 coordinates, fewer than 10\)"):
        res.density(rescale_rank=10)
    dens = res.density(rescale_rank=3, n_points=10_000)
    nodes, weights = res.ritz()
    scales = kth_largest_eigenvalue(nodes, weights, res.sizes, 3)
    np.testing.assert_array_equal(dens.scales, scales)
    assert dens.full_scale == kth_largest_eigenvalue(*res.full.ritz(), res.sizes.sum(), 3)[0]
    rescaled = nodes / scales[:, None, None]
    top = max(np.nanmax(rescaled), np.nanmax(res.full.ritz()[0]) / dens.full_scale)
    assert dens.grid[-1] == pytest.approx(top + 1)
    np.testing.assert_allclose(dens.densities, gaussian_density(rescaled, weights, dens.grid, 1e-5))
    # given grid is used as is
    grid = np.linspace(-3, 3, 5001)
    assert np.array_equal(res.density(grid=grid, sigma2=1e-3).grid, grid)
    # DensityResult round trip
    assert DensityResult.load(dens.save(tmp_path / "dens")) == dens
    plain = res.density(n_points=5000, sigma2=1e-3)
    plain.full = None
    back = DensityResult.load(plain.save(tmp_path / "plain.npz"))
    assert back == plain and back.full is None and back.scales is None


def test_load_rejects_other_format(tmp_path, blocks):
    res, _ = spectrum(blocks, steps=3, n_probes=1)
    path = res.density(n_points=2000, sigma2=1e-3).save(tmp_path / "d.npz")
    with pytest.raises(ValueError, match="expected a 'hessian-blocks/spectrum' file"):
        SpectrumResult.load(path)


def mixed_blocks_spectrum() -> SpectrumResult:
    """Five blocks, two of which can be rescaled by their 10th-largest eigenvalue: 15 and 12 positive
    eigenvalues; then 6 coordinates, rank 5 of 15 (10th-largest exactly 0) and negative definite."""
    rng = np.random.default_rng(3)
    blocks = [sym_with_spectrum(np.linspace(0.5, 9.0, 15), rng), sym_with_spectrum(np.linspace(1.0, 4.0, 12), rng),
              random_sym(6, rng) + 4 * np.eye(6),
              sym_with_spectrum(np.concatenate([np.linspace(1.0, 2.0, 5), np.zeros(10)]), rng),
              sym_with_spectrum(np.linspace(-3.0, -1.0, 12), rng)]
    result, _ = spectrum(blocks, steps=15, n_probes=4, reorth=True)
    result.settings["model"] = "mixed"
    return result


def test_unrescalable_names_small_round_off_and_negative_blocks_and_select_leaves_them_out():
    res = mixed_blocks_spectrum()
    names = res.names
    nodes, weights = res.ritz()
    kth = kth_largest_eigenvalue(nodes[[0, 1, 3, 4]], weights[[0, 1, 3, 4]], res.sizes[[0, 1, 3, 4]], 10,
                                 require_positive=False)
    assert kth[0] > 0.5 and kth[1] > 0.9 and abs(kth[2]) < 1e-12 and kth[3] < -1.5  # 0 of rank 5 is round-off
    left_out = res.unrescalable(10)
    assert list(left_out) == names[2:]
    assert left_out[names[2]] == "6 coordinates, fewer than 10"
    assert left_out[names[3]] == f"estimate {kth[2]:.2g}, {'round-off level' if kth[2] > 0 else 'not positive'}"
    assert left_out[names[4]] == f"estimate {kth[3]:.2g}, not positive"
    third = res.unrescalable(3)  # 6 coordinates and rank 5 are enough for the 3rd largest
    assert list(third) == [names[4]] and third[names[4]].endswith("not positive")
    with pytest.raises(ValueError, match=r"rescale_rank=10: 3 of 5 blocks cannot be divided by their 10-th largest "
                                         r"eigenvalue: 'layer.2.weight\[rows 0:6\]' \(6 coordinates, fewer than 10\), "
                                         r"'layer.3.weight\[rows 0:15\]' \(estimate"):
        res.density(rescale_rank=10)
    kept = res.select([0, 1])
    assert kept.names == names[:2] and kept.unrescalable(10) == {} and kept.settings == res.settings
    np.testing.assert_array_equal(kept.lanczos.alpha, res.lanczos.alpha[:2])
    dens = kept.density(rescale_rank=10, n_points=10_000)
    np.testing.assert_allclose(dens.scales, kth[:2])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        res.unrescalable(0)


@pytest.mark.parametrize("dtype, flagged", [("float64", [1]), ("float32", [1, 2])])
def test_a_kth_largest_eigenvalue_within_100_eps_of_the_largest_magnitude_is_round_off(dtype, flagged):
    from hessian_blocks.lanczos import LanczosResult

    # one Lanczos step per probe: each block's spectrum is one node of weight 1 (20 equal eigenvalues)
    values = np.array([5.0, 1e-20, 1e-12])  # floor 100 eps * 5: 1.1e-13 (float64), 6.0e-5 (float32)
    alpha = np.broadcast_to(values[:, None, None], (3, 2, 1)).copy()
    res = SpectrumResult(names=["big", "zero", "small"], params=["big", "zero", "small"], shapes=[(20,)] * 3,
                         sizes=[20] * 3, lanczos=LanczosResult(alpha, np.zeros_like(alpha), np.ones((3, 2), int)),
                         settings={"dtype": dtype})
    np.testing.assert_allclose(kth_largest_eigenvalue(*res.ritz(), res.sizes, 10), values)
    assert res.unrescalable(10) == {res.names[i]: f"estimate {values[i]:.2g}, round-off level" for i in flagged}
