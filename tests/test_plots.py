"""Plots: figures from synthetic densities, saved as PNG; axes, labels and log scales checked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from matplotlib.figure import Figure

from analysis.js import js_matrix
from analysis.plots import DENSITY_FLOOR, plot_block_densities, plot_js_heatmap, save_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class StandInDensity:
    """Duck-typed DensityResult."""

    grid: np.ndarray
    densities: np.ndarray
    names: list
    sigma2: float = 1e-5
    scales: np.ndarray | None = None
    full: np.ndarray | None = None


def synthetic_density(n_blocks=5, n_grid=3000, *, scales=False, full=False, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.linspace(-2.0, 12.0, n_grid)
    centres = rng.uniform(0.0, 10.0, (n_blocks, 1))
    z = (grid[None, :] - centres) / rng.uniform(0.05, 1.0, (n_blocks, 1))
    dens = np.where(np.abs(z) < 8, np.exp(-0.5 * z * z), 0.0)  # exact zeros off the bumps
    dens /= np.trapezoid(dens, grid, axis=1)[:, None]
    return StandInDensity(
        grid=grid,
        densities=dens,
        names=[f"h.{b}.mlp.fc.weight" for b in range(n_blocks)],
        scales=rng.uniform(1.0, 50.0, n_blocks) if scales else None,
        full=dens.mean(axis=0) if full else None,
    )


def assert_png(path):
    assert path.exists()
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_heatmap_saved_png(tmp_path):
    dens = synthetic_density(6)
    m = js_matrix(dens.densities)
    fig = plot_js_heatmap(m, dens.names, title="toy")
    assert isinstance(fig, Figure)
    heat, cbar = fig.axes  # heatmap + colour bar
    assert heat.get_title() == "toy"
    assert [t.get_text() for t in heat.get_xticklabels()] == dens.names
    assert [t.get_text() for t in heat.get_yticklabels()] == dens.names
    assert cbar.get_ylabel() == "JS distance"
    np.testing.assert_array_equal(heat.images[0].get_array(), m)
    out = save_figure(fig, tmp_path / "nested" / "dir" / "heat.png")
    assert out == tmp_path / "nested" / "dir" / "heat.png"
    assert_png(out)


def test_heatmap_70_blocks_readable():
    n = 70
    rng = np.random.default_rng(1)
    a = rng.random((n, n)) * 0.8
    m = np.triu(a, 1) + np.triu(a, 1).T
    names = [f"blocks.{i // 6}.attn.qkv.weight[rows {64 * i}:{64 * i + 64}]" for i in range(n)]
    fig = plot_js_heatmap(m, names)
    heat = fig.axes[0]
    labels = heat.get_xticklabels()
    assert len(labels) == n
    assert all(lab.get_rotation() == 90 for lab in labels)
    assert max(lab.get_fontsize() for lab in labels) < 6
    assert "JS0 =" in heat.get_title()
    fig.canvas.draw()  # lays out and renders 140 labels (saving is covered above)


def test_heatmap_on_given_axes_and_errors():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_js_heatmap(np.zeros((2, 2)), ["a", "b"], ax=ax) is fig
    with pytest.raises(ValueError, match="names"):
        plot_js_heatmap(np.zeros((2, 2)), ["a"])
    with pytest.raises(ValueError, match="square"):
        plot_js_heatmap(np.zeros((2, 3)), ["a", "b"])


def test_block_densities_panels_and_log_scale(tmp_path):
    dens = synthetic_density(5, full=True)
    fig = plot_block_densities(dens, title="blocks", ncols=3)
    axes = fig.axes
    assert len(axes) == 6  # 5 blocks + full model; the unused grid cell is removed
    assert [ax.get_title() for ax in axes] == dens.names + ["full model"]
    for ax in axes:
        assert ax.get_yscale() == "log"
        assert ax.get_xlabel() == "eigenvalue"
        assert "density" in ax.get_ylabel()
        y = ax.lines[0].get_ydata()
        assert y.min() >= DENSITY_FLOOR and np.all(np.isfinite(np.log(y)))
    # each panel zooms to where its density lives
    lo, hi = axes[0].get_xlim()
    assert hi - lo < dens.grid[-1] - dens.grid[0]
    assert fig._suptitle.get_text() == "blocks"
    assert_png(save_figure(fig, tmp_path / "densities.png"))


def test_block_densities_rescaled_and_selection(tmp_path):
    dens = synthetic_density(6, scales=True)
    fig = plot_block_densities(dens, blocks=[4, "h.1.mlp.fc.weight", -1], log=False, sharex=True)
    axes = fig.axes
    assert len(axes) == 3
    titles = [ax.get_title().splitlines()[0] for ax in axes]
    assert titles == [dens.names[4], dens.names[1], dens.names[5]]
    assert f"scale {dens.scales[4]:.3g}" in axes[0].get_title()
    for ax in axes:
        assert ax.get_xlabel() == "eigenvalue / scale"
        assert ax.get_yscale() == "linear"
        assert ax.get_ylabel() == "density"
        assert ax.get_xlim() == (dens.grid[0], dens.grid[-1])
    np.testing.assert_array_equal(axes[1].lines[0].get_ydata(), dens.densities[1])
    assert_png(save_figure(fig, tmp_path / "sel.png"))


def test_block_densities_with_real_density_result(tmp_path):
    results = pytest.importorskip("hessian_blocks.results")
    syn = synthetic_density(3, scales=True, full=True)
    dens = results.DensityResult(grid=syn.grid, densities=syn.densities, names=syn.names,
                                 sigma2=1e-5, scales=syn.scales, full=syn.full, full_scale=7.0)
    fig = plot_block_densities(dens, blocks="h.2.mlp.fc.weight")
    assert len(fig.axes) == 2
    assert fig.axes[1].get_title().startswith("full model") and "scale 7" in fig.axes[1].get_title()
    assert_png(save_figure(fig, tmp_path / "real.png"))


def test_block_densities_errors():
    dens = synthetic_density(3)
    with pytest.raises(ValueError, match=r"unknown block 'nope'.*h\.0\.mlp\.fc\.weight"):
        plot_block_densities(dens, blocks=["nope"])
    with pytest.raises(ValueError, match="out of range"):
        plot_block_densities(dens, blocks=[3])
    with pytest.raises(ValueError, match="indices or names"):
        plot_block_densities(dens, blocks=[1.5])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_block_densities(dens, blocks=[])
    with pytest.raises(ValueError, match="ncols"):
        plot_block_densities(dens, ncols=0)
    bad = StandInDensity(grid=dens.grid[:-1], densities=dens.densities, names=dens.names)
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        plot_block_densities(bad)


def test_save_figure_closes_pyplot_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plot_js_heatmap(np.array([[0.0, 0.5], [0.5, 0.0]]), ["a", "b"], ax=ax)
    assert plt.fignum_exists(fig.number)
    out = save_figure(fig, tmp_path / "py.png")
    assert_png(out)
    assert not plt.fignum_exists(fig.number)
