"""Optimizer comparison at small size: Adam-mini vs AdamW loss and optimizer-state memory."""

import numpy as np
import pytest

from analysis.experiments.comparison import ComparisonConfig, comparison_experiment, comparison_summary
from analysis.experiments.training import run_steps
from hessian_blocks import build_model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    store = tmp_path_factory.getbasetemp() / "experiments-small"  # shared with the notebook tests
    config = ComparisonConfig.preset("small")
    runs, curves = comparison_experiment(config, out=store, progress=False)
    return config, runs, curves, comparison_summary(runs).set_index("optimizer")


def test_adam_mini_final_loss_a_few_percent_above_adamw(small):
    # The papers' "on par" (within 1 %) is NOT reproduced at this size. Measured with held-out
    # validation text and one new batch per step (width 16, 80 steps, best lr of a bracketing grid,
    # both 1e-2): validation 3.070 vs 2.905 (+5.7 %), training 3.027 vs 2.891 (+4.7 %); at medium
    # size +2.1 % / +2.3 %. GaLore-mini is further behind (+14.9 %).
    _, _, _, summary = small
    assert 0.0 < summary.loc["adam_mini", "val_vs_adamw"] < 0.08
    assert 0.0 < summary.loc["adam_mini", "loss_vs_adamw"] < 0.08
    assert summary.loc["galore_mini", "val_vs_adamw"] > summary.loc["adam_mini", "val_vs_adamw"]


def test_state_memory_matches_the_count_of_moments(small):
    import optim

    config, runs, _, summary = small
    model = build_model(config.model, **config.overrides).model
    params = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    blocks = len(optim.default_partition(model).blocks)
    # float32: AdamW keeps m and v per coordinate; Adam-mini m per coordinate and one v per block;
    # both one step counter per tensor
    assert summary.loc["adamw", "state_bytes"] == 4 * (2 * params + tensors)
    assert summary.loc["adam_mini", "state_bytes"] == 4 * (params + blocks + tensors)
    # the papers' "about half": at this tiny size (rows of 16 -> one v per 16 weights, 839 blocks for
    # 11,760 parameters) the ratio is 53.6%, above the 51% target; at medium size (rows of 64) 51.1%
    assert 0.5 < summary.loc["adam_mini", "state_vs_adamw"] < 0.55


def test_runs_and_curves_cover_the_grid(small):
    config, runs, curves, _ = small
    assert len(runs) == sum(len(lrs) for lrs in config.lrs.values()) * len(config.seeds)
    assert len(curves) == len(runs) * config.steps
    finite = curves.groupby(["optimizer", "lr"])["loss"].apply(lambda s: np.isfinite(s).all())
    assert finite[("adamw", 1e-2)] and finite[("adam_mini", 1e-2)]
    # training helps: the last 10 steps are below the first 10 for the best AdamW run
    best = curves[(curves["optimizer"] == "adamw") & (curves["lr"] == 1e-2)]["loss"].to_numpy()
    assert best[-10:].mean() < best[:10].mean() - 0.5


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="unknown optimizer"):
        comparison_experiment(ComparisonConfig.preset("small", lrs={"lion": (1e-3,)}), progress=False)


def test_adam_mini_state_is_at_most_51_percent_of_adamw_on_the_default_gpt2_nano():
    """The issue's memory target on the bundled GPT-2-style model at its default size (width 128)."""
    import torch

    import optim

    spec = build_model("gpt2-nano")
    inputs = torch.randint(0, spec.config.vocab_size, (2, 16))
    used = {}
    for name in ("adamw", "adam_mini"):
        optimizer = optim.make(name, spec.model, lr=1e-3)
        run_steps(spec.model, spec.loss_fn, optimizer, [(inputs, inputs)], 1)
        used[name] = optim.state_memory(optimizer).total_bytes
    # measured: 3,772,600 vs 7,461,140 bytes (50.6%); rows of 128 cost 1/128 extra, biases are per coordinate
    assert used["adam_mini"] / used["adamw"] <= 0.51
    assert used["adam_mini"] / used["adamw"] >= 0.5


def test_run_steps_trains_in_order_and_stops_at_a_non_finite_loss():
    import torch

    from analysis.experiments.training import run_steps

    # least squares on two batches with plain SGD: the losses are the closed-form ones step by step
    x = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]])]
    y = [torch.tensor([[2.0], [4.0]]), torch.tensor([[6.0]])]
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    loss_fn = torch.nn.functional.mse_loss
    losses, times = run_steps(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), list(zip(x, y)), 3)
    w, expected = 0.0, []
    for step in range(3):
        xs, ys = x[step % 2].squeeze(1), y[step % 2].squeeze(1)
        expected.append(float(((w * xs - ys) ** 2).mean()))
        w -= 0.1 * float((2 * (w * xs - ys) * xs).mean())
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    assert len(times) == 3 and min(times) > 0
    # a learning rate far past stability: the loss overflows, the run stops, the rest is NaN
    torch.nn.init.ones_(model.weight)
    losses, times = run_steps(model, loss_fn, torch.optim.SGD(model.parameters(), lr=1e30), list(zip(x, y)), 10)
    stopped = next(i for i, loss in enumerate(losses) if not np.isfinite(loss))
    assert 0 < stopped < 9 and len(times) == stopped + 1 and np.isnan(losses[stopped + 1:]).all()


def test_train_setup_draws_what_the_training_part_holds():
    import torch

    from analysis.experiments.training import TrainSetup

    setup = TrainSetup("vgg16", {"widths": (4, 4, 4, 4, 4), "fc_width": 8, "channels": 1}, batch_size=16,
                       train_batches=300, val_batches=2)
    _, train, val = setup.build(seed=0)
    assert len(train) == 1617 // 16 and len(val) == 2  # the digits' training part, in whole batches
    images = torch.cat([x for x, _ in train]).flatten(1)
    assert torch.unique(images, dim=0).shape[0] >= len(images) - 5  # distinct images (digits has a few twins)


def test_missing_cuda_is_refused_before_a_derived_partition_is_measured(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = ComparisonConfig.preset("small", partition="derived", device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available on this machine; use device 'cpu'"):
        comparison_experiment(config, out=tmp_path / "results", progress=False)
    assert not (tmp_path / "results").exists()
