"""Training runs of the experiments: bad models and data are refused, randomness is seeded per run,
stored runs follow the contents of the files they used, diverged runs are never averaged away."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from matplotlib.colors import to_rgba

from analysis.experiments.comparison import (
    ComparisonConfig,
    comparison_experiment,
    comparison_summary,
    plot_loss_curves,
    plot_lr_sweep,
    plot_state_memory,
)
from analysis.experiments.store import ResultStore
from analysis.experiments.training import TrainSetup, best_runs, train_grid, train_run
from hessian_blocks import ModelSpec
from hessian_blocks.models import cross_entropy_loss

# ---- user factories, imported by build_model("tests.test_experiments_training:...")


def _spec(model: nn.Module) -> ModelSpec:
    return ModelSpec("test-net", model, cross_entropy_loss, "vector", {"in_features": 64, "num_classes": 10}, None)


def dropout_net(p: float = 0.5) -> ModelSpec:
    return _spec(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 10)))


def plain_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def unseeded_net() -> ModelSpec:
    model = nn.Linear(64, 10)
    with torch.no_grad():
        model.weight.copy_(torch.randn(10, 64, generator=torch.Generator().manual_seed(torch.seed())))
    return _spec(model)


def _setup(model: str, data: str = "digits", **changes) -> TrainSetup:
    return TrainSetup(model, {}, data, **{"batch_size": 16, "train_batches": 4, "val_batches": 1, **changes})


def _digits_file(path, *, labels_offset: int = 0, nan: bool = False, reverse: bool = False):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data[:400].astype(np.float32) / 16.0, digits.target[:400].astype(np.int64) + labels_offset
    if nan:
        x[0, 0] = np.nan
    if reverse:
        x, y = x[::-1], y[::-1]
    np.savez(path, x=x, y=y)
    return str(path)


def test_dropout_runs_are_seeded_per_run_and_evaluated_without_dropout():
    setup = _setup("tests.test_experiments_training:dropout_net")
    first = train_run(setup, "adamw", 1e-3, 6, seed=1)
    torch.rand(1000)  # whatever ran before must not change a run
    again = train_run(setup, "adamw", 1e-3, 6, seed=1)
    assert first["losses"] == again["losses"] and first["val_loss"] == again["val_loss"]
    assert train_run(setup, "adamw", 1e-3, 6, seed=2)["losses"] != first["losses"]
    # the final losses are the dropout-free ones: the same as with the dropout layer removed
    spec, _, val = setup.build(1)
    spec.model[2].p = 0.0
    rerun = train_run(setup, "sgd", 0.0, 2, seed=1)
    with torch.no_grad():
        expected = sum(float(spec.loss_fn(spec.model(x), y)) * len(x) for x, y in val) / sum(len(x) for x, _ in val)
    assert rerun["val_loss"] == pytest.approx(expected, rel=1e-6)  # lr 0: the model is the initial one


def test_a_model_that_does_not_fit_its_data_fails_before_training(tmp_path):
    bad_labels = _digits_file(tmp_path / "labels.npz", labels_offset=5)  # labels up to 14 for 10 classes
    with pytest.raises(ValueError, match=r"fails on .*: training batch 1 of 4 .*labels fit its output"):
        train_run(_setup("tests.test_experiments_training:plain_net", data=bad_labels), "adamw", 1e-3, 3)
    with_nan = _digits_file(tmp_path / "nan.npz", nan=True)
    with pytest.raises(ValueError,
                       match=r"the data hold NaN or infinite values: .*training batch 1 of 4, inputs, sample 0"):
        train_run(_setup("tests.test_experiments_training:plain_net", data=with_nan), "adamw", 1e-3, 3)


def test_an_unseeded_factory_is_refused():
    with pytest.raises(ValueError, match="two builds with seed 0 have different initial parameters"):
        _setup("tests.test_experiments_training:unseeded_net").fingerprint(0)


def test_one_step_has_no_step_time():
    record = train_run(_setup("tests.test_experiments_training:dropout_net"), "sgd", 0.1, 1)
    assert math.isnan(record["seconds_per_step"])


def test_runs_on_a_data_file_changed_in_place_are_trained_again(tmp_path):
    data = _digits_file(tmp_path / "data.npz")
    setups = {"net": _setup("tests.test_experiments_training:plain_net", data=data)}
    store = ResultStore(tmp_path / "results")
    grid = dict(key=lambda label, opt: f"t-{label}-{opt}", progress=False)
    runs, _ = train_grid(store, setups, {"adamw": (1e-2,)}, (0,), 5, **grid)
    again, _ = train_grid(store, setups, {"adamw": (1e-2,)}, (0,), 5, **grid)
    assert again["val_loss"].tolist() == runs["val_loss"].tolist()
    assert len(list((tmp_path / "results").glob("*.json"))) == 1
    _digits_file(tmp_path / "data.npz", reverse=True)  # same path, other contents
    changed, _ = train_grid(store, setups, {"adamw": (1e-2,)}, (0,), 5, **grid)
    assert changed["val_loss"].tolist() != runs["val_loss"].tolist()
    assert len(list((tmp_path / "results").glob("*.json"))) == 2


def test_a_partition_file_changed_in_place_retrains_adam_mini(tmp_path):
    from hessian_blocks import Partition, build_model

    config = ComparisonConfig.preset("small", model="mlp", steps=3, seeds=(0,), lrs={"adam_mini": (1e-3,)},
                                     partition=str(tmp_path / "partition.json"))
    model = build_model("mlp").model
    Partition.per_tensor(model).save(tmp_path / "partition.json")
    runs, _ = comparison_experiment(config, out=tmp_path / "results", progress=False)
    per_tensor_bytes = runs["state_bytes"].item()
    import optim

    optim.default_partition(model).save(tmp_path / "partition.json")  # per neuron: more second moments
    changed, _ = comparison_experiment(config, out=tmp_path / "results", progress=False)
    assert changed["state_bytes"].item() > per_tensor_bytes


def _runs(rows):
    frame = pd.DataFrame(rows, columns=["optimizer", "lr", "seed", "train_loss", "val_loss", "diverged"])
    return frame.assign(model="m", state_bytes=100.0, seconds_per_step=0.1, unstable=False)


def test_a_diverged_seed_is_never_averaged_away():
    runs = _runs([
        ("adamw", 1e-3, 0, 1.0, 2.0, False), ("adamw", 1e-3, 1, 1.2, 2.2, False),
        ("sgd", 0.1, 0, 1.0, 1.5, False), ("sgd", 0.1, 1, math.nan, math.nan, True),
        ("sgd", 1.0, 0, math.nan, math.nan, True), ("sgd", 1.0, 1, 0.5, 0.9, False),
    ])
    best = best_runs(runs).set_index("optimizer")
    assert best.loc["sgd", "train_loss"] == math.inf  # every SGD lr lost a seed: no survivor's mean
    assert best.loc["sgd", "diverged"] == 1 and best.loc["sgd", "seeds"] == 2
    assert best.loc["adamw", "train_loss"] == pytest.approx(1.1) and best.loc["adamw", "diverged"] == 0
    summary = comparison_summary(runs).set_index("optimizer")
    assert np.isnan(summary.loc["sgd", "val_vs_adamw"]) and summary.loc["adamw", "val_vs_adamw"] == 0.0


def test_ratios_to_a_diverged_adamw_are_not_numbers():
    runs = _runs([("adamw", 1e-3, 0, math.nan, math.nan, True), ("sgd", 0.1, 0, 1.0, 1.5, False)])
    summary = comparison_summary(runs).set_index("optimizer")
    assert np.isnan(summary.loc["sgd", "val_vs_adamw"]) and np.isnan(summary.loc["sgd", "loss_vs_adamw"])


def test_loss_curves_end_where_a_run_diverged_and_colours_follow_the_optimizer():
    steps = np.arange(30)
    curves = pd.concat([
        pd.DataFrame({"optimizer": "sgd", "lr": 1.0, "seed": 0, "step": steps,
                      "loss": np.where(steps < 12, 2.0, np.nan)}),
        pd.DataFrame({"optimizer": "adamw", "lr": 1e-3, "seed": 0, "step": steps, "loss": np.full(30, 1.0)}),
    ])
    summary = pd.DataFrame({"optimizer": ["sgd", "adamw"], "lr": [1.0, 1e-3]})
    ax = plot_loss_curves(curves, summary).axes[0]
    sgd, adamw = ax.get_lines()
    assert np.isfinite(sgd.get_ydata()).sum() == 12 and np.isfinite(adamw.get_ydata()).all()
    assert ax.get_yscale() == "log"
    reordered = plot_loss_curves(curves, summary.iloc[::-1]).axes[0].get_lines()
    assert [line.get_color() for line in reordered] == [adamw.get_color(), sgd.get_color()]
    runs = _runs([("adamw", 1e-3, 0, 1.0, 2.0, False), ("sgd", 0.1, 0, 1.0, 1.5, False)])
    sweep = plot_lr_sweep(runs).axes[0].get_lines()
    assert {line.get_label(): line.get_color() for line in sweep} == {"AdamW": adamw.get_color(),
                                                                        "SGD-momentum": sgd.get_color()}
    summary = comparison_summary(runs)
    bars = plot_state_memory(summary).axes[0].patches
    colours = {"sgd": sgd.get_color(), "adamw": adamw.get_color()}
    assert [bar.get_facecolor() for bar in bars] == [to_rgba(colours[opt]) for opt in summary["optimizer"]]


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": 2.5}, "steps must be a positive integer"),
    ({"seeds": ()}, "seeds must be distinct"),
    ({"lrs": {}}, "names no optimizer"),
    ({"lrs": {"adamw": (1e-3, 1e-3)}}, "distinct finite positive"),
    ({"lrs": {"adamw": (math.inf,)}}, "distinct finite positive"),
    ({"weight_decay": -1.0}, "weight_decay must be finite"),
])
def test_comparison_config_refuses_what_cannot_run(changes, message):
    with pytest.raises(ValueError, match=message):
        ComparisonConfig.preset("small", **changes)


def test_preset_steps_draw_as_many_batches_and_any_bundled_model_is_accepted():
    config = ComparisonConfig.preset("small", steps=10)
    assert config.train_batches == 10
    assert ComparisonConfig.preset("small", steps=10, train_batches=4).train_batches == 4
    assert ComparisonConfig.preset("small", model="mlp").overrides == {}
