"""Quadratic experiment: GD against its closed form, Adam-mini against the per-block rule, and the
papers' claim at small size (heterogeneous blocks: GD far behind Adam; homogeneous: comparable)."""

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.experiments.quadratics import (
    BlockQuadratic,
    QuadraticConfig,
    heterogeneous_eigenvalues,
    homogeneous_eigenvalues,
    quadratic_experiment,
    run_quadratic,
    spectrum_eigenvalues,
    summarize_quadratics,
)
from analysis.experiments.spectra import measure_spectrum
from analysis.experiments.zoo import zoo_models


def test_eigenvalue_cases():
    het = heterogeneous_eigenvalues(4, 10, 5000.0, seed=3)
    pooled = np.concatenate(het)
    assert pooled.min() == 1.0 and pooled.max() == 5000.0
    assert all(a.max() <= b.min() for a, b in zip(het[:-1], het[1:]))  # disjoint bands, increasing
    hom = homogeneous_eigenvalues(het, seed=3)
    assert [len(b) for b in hom] == [10] * 4
    assert np.array_equal(np.sort(np.concatenate(hom)), np.sort(pooled))  # same spectrum, shuffled
    spectrum = measure_spectrum("gpt2-nano", zoo_models("small", ("gpt2-nano",))["gpt2-nano"], steps=10, probes=1)
    sampled, names = spectrum_eigenvalues(spectrum, 4, 12, 5000.0)
    values = np.concatenate(sampled)
    assert len(names) == 4 and values.min() > 0
    assert values.max() / values.min() == pytest.approx(5000.0, rel=1e-12)


def test_gd_matches_closed_form():
    eigs = heterogeneous_eigenvalues(3, 6, 100.0, seed=1)
    lr, steps = 0.015, 40
    norms = run_quadratic(eigs, "gd", lr, steps, seed=2)
    problem = BlockQuadratic(eigs, seed=2)
    h = problem.hessian.numpy()
    lam, q = np.linalg.eigh(h)
    c = q.T @ problem.w.detach().numpy()
    expected = [np.linalg.norm(lam * (1 - lr * lam) ** t * c) for t in range(steps + 1)]
    np.testing.assert_allclose(norms, expected, rtol=1e-10)
    np.testing.assert_allclose(np.sort(lam), np.sort(np.concatenate(eigs)), rtol=1e-12)


def test_adam_is_the_registrys_adamw_without_decay_and_equals_torch_adam():
    """The quadratics take their optimizers from optim.make: 'adam' is AdamW with no weight decay,
    step for step the same numbers as torch.optim.Adam written out here."""
    eigs = heterogeneous_eigenvalues(3, 5, 50.0, seed=6)
    lr, betas, steps = 0.03, (0.9, 0.99), 25
    norms = run_quadratic(eigs, "adam", lr, steps, seed=7, betas=betas)
    problem = BlockQuadratic(eigs, seed=7)
    adam = torch.optim.Adam([problem.w], lr=lr, betas=betas, eps=1e-12)
    expected = []
    for _ in range(steps):
        expected.append(problem.set_gradient())
        adam.step()
    expected.append(problem.set_gradient())
    np.testing.assert_array_equal(norms, expected)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd': choose one of gd, adam, adam-mini"):
        run_quadratic(eigs, "sgd", lr, 1)


def test_adam_mini_is_one_learning_rate_per_quadratic_block():
    eigs = heterogeneous_eigenvalues(3, 5, 50.0, seed=4)
    lr, beta1, beta2, steps = 0.05, 0.9, 0.99, 6
    norms = run_quadratic(eigs, "adam-mini", lr, steps, seed=5, betas=(beta1, beta2))
    # reference: the per-block rule written out (one second moment per quadratic block)
    problem = BlockQuadratic(eigs, seed=5)
    h, w = problem.hessian.numpy(), problem.w.detach().numpy().copy()
    edges = np.cumsum([0] + problem.block_sizes)
    m, v = np.zeros_like(w), np.zeros(len(eigs))
    expected = []
    for t in range(1, steps + 1):
        g = h @ w
        expected.append(np.linalg.norm(g))
        m = beta1 * m + (1 - beta1) * g
        for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            v[b] = beta2 * v[b] + (1 - beta2) * np.mean(g[lo:hi] ** 2)
            w[lo:hi] -= lr * (m[lo:hi] / (1 - beta1**t)) / (np.sqrt(v[b] / (1 - beta2**t)) + 1e-12)
    expected.append(np.linalg.norm(h @ w))
    np.testing.assert_allclose(norms, expected, rtol=1e-9)


@pytest.fixture(scope="module")
def small_summary():
    config = QuadraticConfig.preset("small", gpt2_case=False)
    curves = quadratic_experiment(config, progress=False)
    return summarize_quadratics(curves, config.target).set_index(["case", "optimizer"])


def test_heterogeneous_blocks_gd_far_behind_adam(small_summary):
    # measured at small size: GD 1595 iterations, Adam 165, Adam-mini 172 (about 9-10x)
    first = small_summary["iterations_to_target"]
    gd = first[("heterogeneous", "gd")]
    for adam in ("adam", "adam-mini"):
        assert np.isfinite(gd) and gd >= 5 * first[("heterogeneous", adam)]


def test_homogeneous_blocks_gd_comparable(small_summary):
    # measured at small size: GD 1758, Adam 786 (2.2x), Adam-mini 509 (3.5x). Not "equal": with
    # constant lr Adam stalls (~1e-4) and GD overtakes it at deeper targets; the figure shows both.
    first = small_summary["iterations_to_target"]
    het = first[("heterogeneous", "gd")] / first[("heterogeneous", "adam")]
    hom = first[("homogeneous", "gd")] / first[("homogeneous", "adam")]
    assert hom <= 3.0 and hom < het / 2


def test_constant_lr_adam_dips_below_the_target_long_before_it_stays_there(small_summary):
    # Reported, not hidden: Adam's 165 iterations count its first dip below 1e-4 of the start's
    # gradient norm; with a constant lr it oscillates back above and ends at 2e-3, while GD, once
    # below, stays there (measured: GD 1595 / 1595, Adam at lr 0.1 165 / never).
    gd, adam = small_summary.loc[("heterogeneous", "gd")], small_summary.loc[("heterogeneous", "adam")]
    assert gd["iterations_to_stay"] == gd["iterations_to_target"]
    assert adam["iterations_to_stay"] == np.inf and adam["final_rel_grad_norm"] > 1e-3


def test_iterations_to_stay_is_the_first_index_of_the_last_run_below_the_target():
    curves = pd.DataFrame({"case": "c", "optimizer": "o", "lr": 1.0, "iteration": np.arange(7),
                           "rel_grad_norm": [1.0, 1e-5, 1e-3, 1e-5, 1e-6, np.nan, 1e-6]})
    row = summarize_quadratics(curves, 1e-4).iloc[0]
    assert row["iterations_to_target"] == 1 and row["iterations_to_stay"] == 6
    ends_above = curves.assign(rel_grad_norm=[1.0, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-3])
    assert summarize_quadratics(ends_above, 1e-4).iloc[0]["iterations_to_stay"] == np.inf


def test_block_quadratic_rejects_bad_eigenvalues():
    with pytest.raises(ValueError, match="positive eigenvalues"):
        BlockQuadratic([np.array([1.0, -2.0])])
    with pytest.raises(ValueError, match="unknown optimizer"):
        run_quadratic([np.ones(2)], "lbfgs", 0.1, 1)
    assert torch.equal(BlockQuadratic([np.ones(2)], seed=1).w, BlockQuadratic([np.ones(2)], seed=1).w)
