"""Batched Lanczos against dense eigendecompositions (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from hessian_blocks.lanczos import LanczosResult, lanczos, make_probes


def block_operator(blocks: list[np.ndarray]):
    """``(matvec, block_ids)`` of the block-diagonal operator diag(blocks) on [K, P] tensors."""
    mats = [torch.as_tensor(a, dtype=torch.float64) for a in blocks]
    sizes = [m.shape[0] for m in mats]
    block_ids = torch.repeat_interleave(torch.arange(len(mats)), torch.tensor(sizes))
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def matvec(v: torch.Tensor) -> torch.Tensor:
        assert torch.isfinite(v).all(), "matvec received a non-finite vector"
        out = torch.empty_like(v)
        for m, lo, hi in zip(mats, bounds[:-1], bounds[1:]):
            out[:, lo:hi] = v[:, lo:hi] @ m.to(v).T
        return out

    return matvec, block_ids


def sym_with_spectrum(eigs, rng: np.random.Generator) -> np.ndarray:
    eigs = np.asarray(eigs, dtype=np.float64)
    q, _ = np.linalg.qr(rng.standard_normal((eigs.size, eigs.size)))
    a = (q * eigs) @ q.T
    return (a + a.T) / 2


def random_sym(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, n))
    return (x + x.T) / np.sqrt(2 * n)


def run(blocks, steps, n_probes=3, seed=0, kind="gaussian", **kw) -> LanczosResult:
    matvec, block_ids = block_operator(blocks)
    start = make_probes(n_probes, block_ids.numel(), kind=kind, seed=seed)
    return lanczos(matvec, start, block_ids, len(blocks), steps, **kw)


def distinct(values: np.ndarray, tol: float) -> np.ndarray:
    values = np.sort(values)
    keep = np.concatenate([[True], np.diff(values) > tol])
    return values[keep]


def test_full_reorth_reproduces_every_block_spectrum():
    rng = np.random.default_rng(0)
    low_rank_factor = rng.standard_normal((30, 3))
    blocks = [
        np.array([[2.5]]),
        random_sym(5, rng),
        random_sym(17, rng),
        random_sym(40, rng),
        sym_with_spectrum([1, 1, 1, 2, 2, 3, -1, -1, 4, 4, 4, 4], rng),  # 5 distinct
        low_rank_factor @ low_rank_factor.T,  # rank 3: distinct eigenvalues {0, l1, l2, l3}
    ]
    res = run(blocks, steps=40, n_probes=3, reorthogonalize=True)
    nodes, weights = res.ritz()
    expected_steps = [1, 5, 17, 40, 5, 4]
    assert (res.steps == np.array(expected_steps)[:, None]).all(), res.steps
    for b, a in enumerate(blocks):
        exact = np.linalg.eigvalsh(a)
        for k in range(3):
            theta = nodes[b, k][weights[b, k] > 1e-12]
            # every Ritz value with weight is an eigenvalue, every distinct eigenvalue is found
            assert np.abs(theta[:, None] - exact[None, :]).min(axis=1).max() < 1e-8
            found = np.abs(distinct(exact, 1e-6)[:, None] - theta[None, :]).min(axis=1)
            assert found.max() < 1e-8
        if expected_steps[b] == a.shape[0]:  # generic block: all d Ritz values are the spectrum
            np.testing.assert_allclose(np.sort(nodes[b, :, : a.shape[0]], axis=-1),
                                       np.broadcast_to(exact, (3, exact.size)), atol=1e-8)


def test_plain_recurrence_exact_on_small_well_conditioned_blocks():
    rng = np.random.default_rng(1)
    spectra = [[3.0], [-1.0, 0.5, 2.0], [1, 2, 3, 4, 5], np.linspace(-2, 2, 8)]
    blocks = [sym_with_spectrum(s, rng) for s in spectra]
    res = run(blocks, steps=8, n_probes=4)
    nodes, _ = res.ritz()
    for b, s in enumerate(spectra):
        d = len(s)
        assert (res.steps[b] == d).all()
        np.testing.assert_allclose(nodes[b, :, :d], np.broadcast_to(np.sort(s), (4, d)), atol=1e-8)
        assert np.isnan(nodes[b, :, d:]).all()


def test_quadrature_matches_moments():
    rng = np.random.default_rng(2)
    a = sym_with_spectrum(rng.uniform(-1, 2, size=30), rng)
    m = 6
    matvec, block_ids = block_operator([a])
    start = make_probes(2, 30, kind="gaussian", seed=3)
    res = lanczos(matvec, start, block_ids, 1, m)
    nodes, weights = res.ritz()
    for k in range(2):
        v = start[k].numpy()
        for p in range(2 * m):
            exact = v @ np.linalg.matrix_power(a, p) @ v / (v @ v)
            quad = np.sum(weights[0, k] * nodes[0, k] ** p)
            assert quad == pytest.approx(exact, rel=1e-9, abs=1e-12), (k, p)
        assert weights[0, k].sum() == pytest.approx(1.0, abs=1e-13)


def test_slq_density_close_to_exact_spectrum():
    rng = np.random.default_rng(4)
    # semicircle bulk plus a few outliers: a Hessian-like spectrum
    a = random_sym(400, rng) + sym_with_spectrum(np.r_[np.zeros(396), 5.0, 8.0, -3.0, 12.0], rng)
    exact = np.linalg.eigvalsh(a)
    res = run([a], steps=100, n_probes=10, kind="rademacher", seed=5)  # the papers' settings
    assert (res.steps == 100).all()
    nodes, weights = res.ritz()
    distance = wasserstein_distance(nodes.ravel(), exact, u_weights=weights.ravel() / 10)
    width = exact.max() - exact.min()
    assert distance <= 0.01 * width, (distance, width)


def test_breakdown_is_clean_and_counted():
    rng = np.random.default_rng(6)
    u = rng.standard_normal((20, 2))
    blocks = [np.zeros((7, 7)), np.eye(6) * 3.0, u @ u.T, random_sym(9, rng)]
    res = run(blocks, steps=12, n_probes=2)
    assert np.isfinite(res.alpha).all() and np.isfinite(res.beta).all()
    assert res.steps.tolist() == [[1, 1], [1, 1], [3, 3], [9, 9]]
    # zeros past the completed steps
    for b in range(4):
        for k in range(2):
            s = res.steps[b, k]
            assert (res.alpha[b, k, s:] == 0).all() and (res.beta[b, k, s:] == 0).all()
    nodes, weights = res.ritz()
    assert nodes[0, :, 0].tolist() == [0.0, 0.0] and nodes[1, :, 0] == pytest.approx([3.0, 3.0])
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-12)
    exact = np.linalg.eigvalsh(u @ u.T)[[0, -2, -1]]  # {0, l1, l2}
    np.testing.assert_allclose(nodes[2, :, :3], np.broadcast_to(exact, (2, 3)), atol=1e-8)


def test_batched_equals_each_problem_alone():
    rng = np.random.default_rng(7)
    blocks = [random_sym(n, rng) for n in (4, 11, 25)]
    steps = 15
    matvec, block_ids = block_operator(blocks)
    start = make_probes(3, block_ids.numel(), kind="gaussian", seed=8)
    for reorth in (False, True):
        batched = lanczos(matvec, start, block_ids, 3, steps, reorthogonalize=reorth)
        offset = 0
        for b, a in enumerate(blocks):
            n = a.shape[0]
            solo_matvec, solo_block_ids = block_operator([a])
            for k in range(3):
                solo = lanczos(solo_matvec, start[k : k + 1, offset : offset + n], solo_block_ids, 1,
                               steps, reorthogonalize=reorth)
                assert solo.steps[0, 0] == batched.steps[b, k]
                for got, want in zip(batched.tridiagonal(b, k), solo.tridiagonal(0, 0)):
                    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
                # the last residual is rounding noise where the block was exhausted
                s = solo.steps[0, 0]
                assert batched.beta[b, k, s - 1] == pytest.approx(solo.beta[0, 0, s - 1], abs=1e-11)
            offset += n


def test_start_is_normalised_per_block():
    rng = np.random.default_rng(9)
    blocks = [random_sym(5, rng), random_sym(3, rng)]
    matvec, block_ids = block_operator(blocks)
    start = make_probes(2, 8, kind="gaussian", seed=1)
    scaled = start * torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1e3, 1e3, 1e3])
    a = lanczos(matvec, start, block_ids, 2, 3)
    b = lanczos(matvec, scaled, block_ids, 2, 3)
    np.testing.assert_allclose(a.alpha, b.alpha, rtol=1e-12, atol=1e-14)
    v = start[0, :5].numpy()
    assert a.alpha[0, 0, 0] == pytest.approx(v @ blocks[0] @ v / (v @ v), rel=1e-12)


def test_zero_block_part_raises():
    matvec, block_ids = block_operator([np.eye(2), np.eye(3)])
    start = torch.ones(2, 5, dtype=torch.float64)
    start[1, 2:] = 0.0
    with pytest.raises(ValueError, match="start vector 1 is zero on block 1"):
        lanczos(matvec, start, block_ids, 2, 3)


def test_bad_arguments_raise():
    matvec, block_ids = block_operator([np.eye(2), np.eye(3)])
    start = torch.ones(1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="blocks \\[2\\] have no coordinates"):
        lanczos(matvec, start, block_ids, 3, 2)
    with pytest.raises(ValueError, match="block_ids must lie"):
        lanczos(matvec, start, block_ids, 1, 2)
    with pytest.raises(ValueError, match="steps"):
        lanczos(matvec, start, block_ids, 2, 0)
    with pytest.raises(ValueError, match="block_ids must be"):
        lanczos(matvec, start[:, :4], block_ids, 2, 2)


def test_non_finite_matvec_raises():
    start = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="step 1"):
        lanczos(lambda v: v * float("nan"), start, torch.zeros(3, dtype=torch.long), 1, 2)


def test_callback_and_early_stop():
    rng = np.random.default_rng(10)
    calls = []
    n_matvecs = []
    matvec, block_ids = block_operator([random_sym(2, rng), random_sym(3, rng)])

    def counting(v):
        n_matvecs.append(1)
        return matvec(v)

    start = make_probes(2, 5, seed=2)
    res = lanczos(counting, start, block_ids, 2, 50, callback=calls.append)
    assert calls == [1, 2, 3] and len(n_matvecs) == 3
    assert res.steps.tolist() == [[2, 2], [3, 3]] and res.max_steps == 50


def test_float32_input_gives_float64_result():
    rng = np.random.default_rng(11)
    a = sym_with_spectrum([1.0, 2.0, 3.0, 4.0], rng)
    matvec, block_ids = block_operator([a])
    start = make_probes(2, 4, dtype=torch.float32)
    res = lanczos(matvec, start, block_ids, 1, 4)
    assert res.alpha.dtype == np.float64
    nodes, _ = res.ritz()
    np.testing.assert_allclose(nodes[0, :, :4], [[1, 2, 3, 4]] * 2, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(12)
    blocks = [random_sym(n, rng) for n in (3, 30, 64)]
    matvec, block_ids = block_operator(blocks)
    start = make_probes(4, block_ids.numel(), seed=3)
    cpu = lanczos(matvec, start, block_ids, 3, 20, reorthogonalize=True)
    gpu = lanczos(matvec, start.cuda(), block_ids.cuda(), 3, 20, reorthogonalize=True)
    assert (gpu.steps == cpu.steps).all()
    np.testing.assert_allclose(gpu.ritz()[0], cpu.ritz()[0], atol=1e-10)


def test_tridiagonal_and_ritz_padding():
    res = LanczosResult(
        alpha=np.array([[[1.0, 2.0, 0.0], [5.0, 0.0, 0.0]]]),
        beta=np.array([[[0.5, 1e-20, 0.0], [0.0, 0.0, 0.0]]]),
        steps=np.array([[2, 1]]),
    )
    diag, off = res.tridiagonal(0, 0)
    assert diag.tolist() == [1.0, 2.0] and off.tolist() == [0.5]
    nodes, weights = res.ritz()
    t = np.array([[1.0, 0.5], [0.5, 2.0]])
    theta, vecs = np.linalg.eigh(t)
    np.testing.assert_allclose(nodes[0, 0, :2], theta)
    np.testing.assert_allclose(weights[0, 0, :2], vecs[0] ** 2)
    assert nodes[0, 1, 0] == 5.0 and weights[0, 1, 0] == 1.0
    assert np.isnan(nodes[0, 0, 2]) and np.isnan(nodes[0, 1, 1:]).all()
    assert (weights[0, 1, 1:] == 0).all()


def test_make_probes():
    r1 = make_probes(3, 100, seed=4)
    r2 = make_probes(3, 100, seed=4)
    assert torch.equal(r1, r2) and r1.dtype == torch.float64
    assert set(r1.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(r1, make_probes(3, 100, seed=5))
    g = make_probes(2, 10_000, kind="gaussian", seed=4, dtype=torch.float32)
    assert g.dtype == torch.float32 and abs(float(g.std()) - 1.0) < 0.05
    with pytest.raises(ValueError, match="unknown probe kind"):
        make_probes(1, 3, kind="uniform")
