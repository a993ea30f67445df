"""SLQ on real model blocks against the exact spectra of dense Hessian blocks."""

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn

from hessian_blocks.blocks import Partition, Rule
from hessian_blocks.hvp import BlockHessian
from hessian_blocks.slq import block_spectra
from tests.oracles import dense_hessian


def small_mlp(hidden=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
               for n in (9, 4)]
    return model, nn.functional.cross_entropy, batches


def exact_block_spectra(dense, blocks):
    return [np.linalg.eigvalsh(dense.restrict([b], False).numpy()) for b in blocks]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_lanczos_with_m_equal_to_the_block_dimension_is_exact(strategy):
    model, loss_fn, batches = small_mlp()
    partition = Partition.from_rules(model, [
        Rule("0.weight", "groups", axis=0, size=2), Rule("0.bias", "whole"),
        Rule("2.weight", "groups", axis=1, size=3), Rule("2.bias", "elements"),
    ])
    hessian = BlockHessian(model, loss_fn, batches, partition, strategy=strategy)
    steps = max(b.numel for b in hessian.blocks)
    result = block_spectra(hessian, steps=steps, probes=2, reorthogonalize=True)
    nodes, weights = result.ritz()
    dense = dense_hessian(model, loss_fn, batches)
    for b, exact in enumerate(exact_block_spectra(dense, hessian.blocks)):
        for k in range(2):
            found = nodes[b, k][weights[b, k] > 1e-14]
            assert result.lanczos.steps[b, k] <= len(exact)
            # every Ritz value is an eigenvalue, and with m = dim every eigenvalue the probe sees is found
            assert np.abs(found[:, None] - exact[None, :]).min(1).max() < 1e-8
    generic = [b for b, block in enumerate(hessian.blocks) if block.numel == 10]
    for b in generic:  # 0.weight rows: 10 distinct eigenvalues, all recovered
        np.testing.assert_allclose(np.sort(nodes[b, 0][: result.lanczos.steps[b, 0]]),
                                   exact_block_spectra(dense, [hessian.blocks[b]])[0], atol=1e-8)
    full_exact = np.linalg.eigvalsh(dense.restrict(hessian.blocks, False).numpy())
    full = block_spectra(hessian, steps=hessian.size, probes=1, reorthogonalize=True, full_model=True).full
    nodes, weights = full.ritz()
    found = nodes[0, 0][weights[0, 0] > 1e-14]
    assert np.abs(found[:, None] - full_exact[None, :]).min(1).max() < 1e-8
    # the softmax's shift invariance repeats the zero eigenvalue: the Krylov space ends before 57 steps
    assert abs(found.max() - full_exact.max()) < 1e-8 and abs(found.min() - full_exact.min()) < 1e-8


def test_slq_density_at_100_steps_is_close_to_the_exact_block_spectrum():
    model, loss_fn, batches = small_mlp(hidden=40)
    hessian = BlockHessian(model, loss_fn, batches)
    result = block_spectra(hessian, steps=100, probes=10, seed=3)
    nodes, weights = result.ritz()
    dense = dense_hessian(model, loss_fn, batches)
    exact = exact_block_spectra(dense, hessian.blocks)
    for b, block in enumerate(hessian.blocks):
        if block.numel <= 100:
            continue
        keep = np.isfinite(nodes[b])
        distance = wasserstein_distance(nodes[b][keep], exact[b], u_weights=weights[b][keep])
        assert distance <= 0.01 * (exact[b].max() - exact[b].min()), block.name


def test_same_seed_same_numbers_and_progress_is_reported():
    model, loss_fn, batches = small_mlp()
    calls = []
    first = block_spectra(BlockHessian(model, loss_fn, batches), steps=5, probes=3, seed=7, progress=calls.append)
    second = block_spectra(BlockHessian(model, loss_fn, batches), steps=5, probes=3, seed=7)
    other = block_spectra(BlockHessian(model, loss_fn, batches), steps=5, probes=3, seed=8)
    assert first.lanczos == second.lanczos
    assert not np.array_equal(first.lanczos.alpha, other.lanczos.alpha)
    assert calls == [1] * 5
    assert first.settings["seed"] == 7 and first.settings["n_samples"] == 13
    assert first.names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_bad_settings_raise():
    model, loss_fn, batches = small_mlp()
    with pytest.raises(ValueError, match="steps and probes must be >= 1"):
        block_spectra(BlockHessian(model, loss_fn, batches), steps=0)


def _leave_one_probe_out_se(spectrum) -> float:
    """Jackknife standard error of JS0 over the probes (the SLQ sampling error of JS0)."""
    from analysis import js0, js_matrix
    from hessian_blocks import LanczosResult, SpectrumResult

    runs, count = spectrum.lanczos, spectrum.lanczos.n_probes
    values = []
    for left_out in range(count):
        keep = [k for k in range(count) if k != left_out]
        part = SpectrumResult(names=spectrum.names, params=spectrum.params, shapes=spectrum.shapes,
                              sizes=spectrum.sizes, settings={},
                              lanczos=LanczosResult(runs.alpha[:, keep], runs.beta[:, keep], runs.steps[:, keep]))
        values.append(js0(js_matrix(part.density().densities)))
    values = np.array(values)
    return float(np.sqrt((count - 1) / count * ((values - values.mean()) ** 2).sum()))


@pytest.mark.parametrize("name", ["gpt2-nano", "vit-tiny", "vgg16"])
def test_float32_products_keep_js0_and_every_blocks_extremes_within_the_sampling_error(name):
    """The lever of the fast path: products in float32, Lanczos recurrences in float64. JS0 within two
    jackknife standard errors (over probes) of the float64 run's; each block's lambda_min and lambda_max
    within the spread of the float64 run's per-probe extremes, or, where the probes agree to better than
    float32 can resolve, within 1e-4 of the model's largest |eigenvalue|."""
    import warnings

    from analysis import js0, js_matrix
    from analysis.experiments.zoo import zoo_models
    from hessian_blocks import build_model, make_batches

    spec = build_model(name, seed=0, **zoo_models("small", (name,))[name])
    spectra = {}
    for dtype in (torch.float64, torch.float32):
        batches = make_batches(spec, "auto", batch_size=4, n_batches=1, dtype=dtype)
        spectra[dtype] = block_spectra(BlockHessian(spec.model, spec.loss_fn, batches, dtype=dtype), steps=30, probes=5)
    exact, fast = spectra[torch.float64], spectra[torch.float32]
    assert fast.settings["dtype"] == "float32" and fast.lanczos.alpha.dtype == np.float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blocks narrower than the broadening (a key bias: exactly zero)
        difference = abs(js0(js_matrix(fast.density().densities)) - js0(js_matrix(exact.density().densities)))
        assert difference <= 2 * _leave_one_probe_out_se(exact)
    nodes = exact.ritz()[0]
    floor = 1e-4 * max(np.abs(exact.lambda_max()).max(), np.abs(exact.lambda_min()).max())
    for extreme, per_probe in (("lambda_max", np.nanmax(nodes, axis=2)), ("lambda_min", np.nanmin(nodes, axis=2))):
        spread = np.maximum(per_probe.max(axis=1) - per_probe.min(axis=1), floor)
        error = np.abs(getattr(fast, extreme)() - getattr(exact, extreme)())
        assert (error <= spread).all(), (extreme, [exact.names[b] for b in np.flatnonzero(error > spread)])
