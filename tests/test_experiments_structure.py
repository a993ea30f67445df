"""Near-block-diagonal Hessian maps and the man-made MLP with controlled heterogeneity."""

import numpy as np
import pytest
import torch

from analysis.experiments.hessian_structure import StructureConfig, block_mass, structure_experiment
from analysis.experiments.manmade_mlp import FACTORY, ManmadeConfig, manmade_experiment, scaled_mlp
from hessian_blocks import build_model, make_batches


def test_block_mass_by_hand():
    m = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    inside, entries = block_mass(m, [2])
    assert inside == pytest.approx((9 + 1 + 1 + 4 + 16) / (9 + 1 + 1 + 4 + 16))
    inside, entries = block_mass(m, [1])
    assert inside == pytest.approx((9 + 4 + 16) / 31) and entries == pytest.approx(5 / 9)


def test_small_hessians_concentrate_on_the_partition_blocks(tmp_path_factory):
    store = tmp_path_factory.getbasetemp() / "experiments-small"
    table, maps = structure_experiment(StructureConfig.preset("small"), out=store, progress=False)
    row = table.set_index("model")
    # measured: MLP hidden weights (8 neurons) 52% of |H|_F^2 in the per-neuron blocks, which hold 12.5%
    # of the entries (4.2x); GPT-2 q/k/v (20 blocks) 23% in blocks holding 12% (1.9x): the q-k
    # cross terms (per head) carry much of the rest
    assert row.loc["mlp", "concentration"] > 3
    assert row.loc["gpt2-nano", "concentration"] > 1.5
    hmap = maps["mlp"]
    assert hmap.matrix.shape == (128, 128) and np.allclose(hmap.matrix, hmap.matrix.T)
    assert hmap.boundaries == list(range(16, 128, 16))  # one block per hidden neuron (a row of 16)


def test_scaled_mlp_same_function_scaled_gradients():
    x, _ = make_batches(build_model(FACTORY, seed=0), "digits", batch_size=4, n_batches=1)[0]
    plain = build_model(FACTORY, seed=3, level=1.0)
    scaled = build_model(FACTORY, seed=3, level=10.0)
    torch.testing.assert_close(plain.model(x), scaled.model(x), rtol=1e-5, atol=1e-6)
    scales = scaled.model.scales
    assert scales[0].item() == pytest.approx(0.1) and scales[-1].item() == pytest.approx(10.0)
    for spec in (plain, scaled):
        spec.model(x).square().sum().backward()
    for layer_plain, layer_scaled, s in zip(plain.model.layers, scaled.model.layers, scales):
        # w' = w / s: the gradient of the scaled parameter is s times the plain one
        torch.testing.assert_close(layer_scaled.weight.grad, s * layer_plain.weight.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="level must be >= 1"):
        scaled_mlp(level=0.5)


def test_js0_grows_with_the_level_and_sgd_degrades(tmp_path_factory):
    store = tmp_path_factory.getbasetemp() / "experiments-small"
    table = manmade_experiment(ManmadeConfig.preset("small"), out=store, progress=False).set_index("level")
    # measured at small size (40 steps, every best lr inside its grid): JS0 0.410 (level 1) -> 0.446
    # (level 10); SGD's best final training loss 0.594 (lr 0.1) -> 1.048 (lr 0.01), AdamW's 0.504 -> 0.269
    # (lr 0.03 both): the gap grows 0.09 -> 0.78
    assert table["JS0"].is_monotonic_increasing and table.loc[10.0, "JS0"] > table.loc[1.0, "JS0"] + 0.01
    assert table.loc[10.0, "sgd_loss"] > table.loc[1.0, "sgd_loss"] + 0.3
    assert table.loc[10.0, "adamw_loss"] <= table.loc[1.0, "adamw_loss"]
    assert table.loc[10.0, "gap"] > table.loc[1.0, "gap"] + 0.5
    assert table.loc[10.0, "sgd_lr"] < table.loc[1.0, "sgd_lr"]  # the stiffest block sets SGD's lr
