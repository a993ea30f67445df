"""Heterogeneity vs gap on the small zoo: JS0 ordering (the papers' Table 1) and the SGD-AdamW gap."""

import numpy as np
import pandas as pd
import pytest

from analysis.experiments.heterogeneity import HeterogeneityConfig, heterogeneity_experiment
from analysis.experiments.spectra import measure_spectrum
from analysis.experiments.store import ResultStore
from analysis.experiments.training import best_runs
from analysis.experiments.zoo import FAMILIES
from hessian_blocks import build_model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    store = tmp_path_factory.getbasetemp() / "experiments-small"  # shared with the notebook tests
    return heterogeneity_experiment(HeterogeneityConfig.preset("small"), out=store, progress=False)


def test_js0_of_every_transformer_exceeds_every_cnn(small):
    table, _ = small
    js = table.set_index("model")["JS0"]
    transformers = [m for m, f in FAMILIES.items() if f == "Transformer"]
    cnns = [m for m, f in FAMILIES.items() if f == "CNN"]
    # measured at small size: gpt2 0.374, vit 0.368, bert 0.305 vs resnet18 0.220, vgg16 0.174:
    # min ratio 1.38 (bert-mini / resnet18), 1.75 to VGG-style. At medium and paper size bert-mini falls
    # below resnet18 (README).
    assert js[transformers].min() > js[cnns].max()
    assert js[transformers].min() / js["vgg16"] > 1.5


def test_js0_is_the_mean_pairwise_distance_of_the_measured_spectra(small, tmp_path_factory):
    from scipy.special import rel_entr

    table, _ = small
    config = HeterogeneityConfig.preset("small")
    spectrum = measure_spectrum("vgg16", config.models["vgg16"], batch_size=config.slq_batch_size,
                                steps=config.slq_steps, probes=config.slq_probes,
                                store=ResultStore(tmp_path_factory.getbasetemp() / "experiments-small"))
    model = build_model("vgg16", **config.models["vgg16"]).model
    assert len(spectrum.names) == len(list(model.parameters()))  # one block per tensor
    d = spectrum.density().densities
    p = d / d.sum(axis=1, keepdims=True)

    def distance(a, b):  # scipy's jensenshannon, clipped at 0 (it takes sqrt of -1e-17 for twin densities)
        m = (a + b) / 2
        return np.sqrt(max(0.5 * rel_entr(a, m).sum() + 0.5 * rel_entr(b, m).sum(), 0.0))

    pairs = [distance(p[i], p[j]) for i in range(len(p)) for j in range(i + 1, len(p))]
    assert table.set_index("model").loc["vgg16", "JS0"] == pytest.approx(np.mean(pairs), rel=1e-6)


def test_gap_is_best_sgd_minus_best_adamw(small):
    table, runs = small
    for model in table["model"]:
        finals = runs[runs["model"] == model].groupby(["optimizer", "lr"])["train_loss"].mean()
        expected = finals["sgd"].min() - finals["adamw"].min()
        assert table.set_index("model").loc[model, "gap"] == pytest.approx(expected, rel=1e-12)


def test_gap_larger_on_transformers_on_average_not_on_every_one(small):
    # measured at small size (40 steps, every best lr inside its grid): gaps gpt2 0.212, vit 0.967, bert 0.662
    # vs resnet18 0.003, vgg16 0.327. SGD falls behind AdamW on every Transformer and not on ResNet; the family
    # means follow the papers (0.61 vs 0.16), but the VGG-style model's gap exceeds gpt2-nano's (a deviation
    # from the papers, reported in the README; asserted so that a change to it is noticed).
    table, _ = small
    gap = table.set_index("model")["gap"]
    transformers = [m for m, f in FAMILIES.items() if f == "Transformer"]
    cnns = [m for m, f in FAMILIES.items() if f == "CNN"]
    assert gap[transformers].min() > 0.1 and abs(gap["resnet18"]) < 0.05
    assert gap[transformers].mean() > 2 * gap[cnns].mean()
    assert gap["vgg16"] > gap["gpt2-nano"]


def test_js0_vs_gap_colours_each_family_the_same_in_every_figure():
    from matplotlib.colors import to_rgba

    from analysis.experiments.heterogeneity import plot_js0_vs_gap

    table = pd.DataFrame({"model": ["a", "b", "c", "d"], "family": ["CNN", "Transformer", "mine", "CNN"],
                          "JS0": [0.1, 0.3, 0.2, 0.05], "gap": [0.0, 0.5, 0.1, 0.2]})
    for order in (table, table.iloc[::-1]):
        ax = plot_js0_vs_gap(order).axes[0]
        colours = {c.get_label(): to_rgba(c.get_facecolor()[0]) for c in ax.collections}
        assert colours == {"Transformer": to_rgba("C0"), "CNN": to_rgba("C2"), "mine": to_rgba("C3")}
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Transformer", "CNN", "mine"]
        assert sorted(t.get_text() for t in ax.texts) == ["a", "b", "c", "d"]


def test_best_runs_ignores_diverged_runs():
    runs = pd.DataFrame({"model": "m", "optimizer": "sgd", "lr": [0.1, 1.0], "seed": 0, "train_loss": [2.0, np.nan],
                         "val_loss": [2.1, np.nan], "state_bytes": 8, "seconds_per_step": 0.1,
                         "diverged": [False, True], "unstable": False})
    assert best_runs(runs)["lr"].tolist() == [0.1]
