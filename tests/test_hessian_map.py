"""Dense Hessian maps in block layout and the heatmap with block boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from analysis.hessian_map import hessian_map, plot_hessian_blocks
from analysis.plots import save_figure
from hessian_blocks import Partition, Rule, build_model, make_batches
from tests.oracles import dense_hessian


@pytest.fixture(scope="module")
def tiny():
    spec = build_model("gpt2-nano", dtype=torch.float64, n_layer=1, n_embd=4, n_head=2, vocab_size=8, context=3)
    return spec, make_batches(spec, "synthetic", batch_size=2, n_batches=2, dtype=torch.float64)


def test_hessian_map_matches_the_dense_oracle_in_block_order(tiny):
    spec, batches = tiny
    q, w = "blocks.0.attn.q_proj.weight", "lm_head.weight"
    rules = [Rule(q, "groups", axis=1, size=2) if n == q else Rule(n, "whole") for n,
             _ in spec.model.named_parameters()]
    partition = Partition.from_rules(spec.model, rules)
    hmap = hessian_map(spec.model, spec.loss_fn, batches, partition, params=[q, w])
    oracle = dense_hessian(spec.model, spec.loss_fn, batches)
    blocks = [b for b in partition.blocks if b.param in (q, w)]
    np.testing.assert_allclose(hmap.matrix, oracle.restrict(blocks, block_diagonal=False).numpy(), atol=1e-10)
    assert hmap.boundaries == [8, 16] and hmap.tensor_boundaries == [16]  # two column groups of q, then lm_head
    assert hmap.blocks[0] == f"{q}[cols 0:2]"


def test_hessian_map_refuses_too_many_coordinates(tiny):
    spec, batches = tiny
    with pytest.raises(ValueError, match="limited to 10"):
        hessian_map(spec.model, spec.loss_fn, batches, max_coordinates=10)


def test_plot_hessian_blocks_draws_the_boundaries(tmp_path):
    matrix = np.kron(np.eye(3), np.ones((4, 4))) + 1e-3
    fig = plot_hessian_blocks(matrix, [4, 8], major=[8], title="planted")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "planted"
    squares = [(p.get_xy(), p.get_width(), p.get_edgecolor()) for p in ax.patches]
    white = [(xy, w) for xy, w, colour in squares if colour[:3] == (1.0, 1.0, 1.0)]
    red = [(xy, w) for xy, w, colour in squares if colour[:3] == (1.0, 0.0, 0.0)]
    assert white == [((-0.5, -0.5), 4), ((3.5, 3.5), 4), ((7.5, 7.5), 4)]  # one square per block
    assert red == [((-0.5, -0.5), 8), ((7.5, 7.5), 4)]                       # one per tensor
    path = save_figure(fig, tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="boundaries"):
        plot_hessian_blocks(matrix, [12])
    with pytest.raises(ValueError, match="square"):
        plot_hessian_blocks(np.ones((2, 3)), [])
