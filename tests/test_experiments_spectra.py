"""Block-spectra helpers: the sampled blocks, subsets of a spectrum, the density figure, the store."""

import numpy as np

from analysis import js0, js_matrix
from analysis.experiments.spectra import (
    measure_spectrum,
    plot_sampled_densities,
    sampled_blocks,
    spectra_table,
)
from analysis.experiments.store import ResultStore
from analysis.experiments.zoo import zoo_models


def test_sampled_blocks_subset_and_figure(tmp_path):
    overrides = zoo_models("small", ("vgg16",))["vgg16"]
    store = ResultStore(tmp_path)
    spectrum = measure_spectrum("vgg16", overrides, steps=12, probes=2, store=store)
    again = measure_spectrum("vgg16", overrides, steps=12, probes=2, store=store)  # read back from the .npz
    assert again == spectrum and len(list(tmp_path.glob("*.npz"))) == 1
    chosen = sampled_blocks(spectrum, 4)
    assert len(chosen) == 4 and chosen[0] == 0 and all(len(spectrum.shapes[i]) >= 2 for i in chosen)
    assert chosen == sorted(chosen) and chosen[-1] == max(i for i, s in enumerate(spectrum.shapes) if len(s) >= 2)
    part = spectrum.select(chosen)
    np.testing.assert_array_equal(part.ritz()[0], spectrum.ritz()[0][chosen])
    assert part.names == [spectrum.names[i] for i in chosen]
    fig = plot_sampled_densities({"vgg16": spectrum}, panels=4, rescale_rank=3)
    assert len(fig.axes) == 4 and fig.axes[0].get_yscale() == "log"
    assert "3rd-largest" in fig.axes[0].get_xlabel()
    table = spectra_table({"vgg16": spectrum, "vgg16 again": part}).set_index("model")
    assert table["family"].tolist() == ["CNN", "other"] and table.loc["vgg16", "blocks"] == len(spectrum.names)
    assert table.loc["vgg16", "JS0"] == js0(js_matrix(spectrum.density().densities))
    assert table.loc["vgg16 again",
                     "JS0_ratio_to_max_CNN"] == table.loc["vgg16 again", "JS0"] / table.loc["vgg16", "JS0"]
