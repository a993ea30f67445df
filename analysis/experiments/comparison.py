"""Optimizer comparison: SGD-momentum vs AdamW vs Adam-mini vs GaLore-mini on one model, same budget.

Every optimizer trains the same seeded model on the same offline batches for the same number of
steps, over a small learning-rate grid and several seeds. Adam-mini's (and GaLore-mini's) partition is "default" (the
optimizer's structural default: per head / per neuron / per token), "derived" (measured from the
model's Hessian by ``hessian_blocks.partitioner.derive_partition``, once, on the seed-0 model) or a
partition file. Recorded per run: the loss at every step, final train / validation loss,
optimizer-state bytes and seconds per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hessian_blocks.guards import check_device

from .store import ResultStore, check_size, model_fingerprint, params_key
from .training import OPTIMIZERS, PARTITIONED, TrainSetup, best_runs, train_grid
from .zoo import zoo_models

__all__ = ["ComparisonConfig", "comparison_experiment", "comparison_summary", "plot_loss_curves",
           "plot_lr_sweep", "plot_state_memory"]


@dataclass(frozen=True)
class ComparisonConfig:
    """Model, data, budget, grids and Adam-mini partition (``preset(size)`` for the shared sizes).

    The presets draw as many training batches as steps: every step sees a new batch, as in the
    papers' pre-training runs, so the training and held-out losses measure the same thing (cycling a
    few batches for hundreds of steps rewards memorising them).
    """

    model: str = "gpt2-nano"
    overrides: dict = field(default_factory=lambda: zoo_models("medium", ("gpt2-nano",))["gpt2-nano"])
    data: str = "auto"
    batch_size: int = 16
    train_batches: int = 300
    val_batches: int = 4
    steps: int = 300
    # each grid brackets its best lr (measured: the best is never at an end of the medium grids)
    lrs: dict = field(default_factory=lambda: {"sgd": (0.03, 0.1, 0.3, 1.0), "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
                                               "adam_mini": (3e-4, 1e-3, 3e-3, 1e-2),
                                               "galore_mini": (4e-3, 1.2e-2, 4e-2)})  # scale 0.25: 4x lr
    seeds: tuple[int, ...] = (0, 1)
    weight_decay: float = 0.0
    partition: str = "default"  # "default", "derived" or a partition file
    device: str = "cpu"  # where the runs train ("cuda", "cuda:1", ...)

    @classmethod
    def preset(cls, size: str, model: str = "gpt2-nano", **changes) -> "ComparisonConfig":
        """Bundled models get the zoo's overrides for ``size``; a user model ("pkg.mod:factory") none."""
        check_size(size)
        overrides = zoo_models(size, (model,))[model] if ":" not in model else {}
        base = {
            "small": dict(batch_size=8, train_batches=80, val_batches=16, steps=80,
                          lrs={"sgd": (0.1, 0.3, 1.0), "adamw": (3e-3, 1e-2, 3e-2), "adam_mini": (3e-3, 1e-2, 3e-2),
                               "galore_mini": (1.2e-2, 4e-2)}, seeds=(0,)),
            "medium": dict(),
            # the bundled full-size model (width 128); about 3 hours of one CPU core (0.2 s a step). The
            # 3000 x 32 windows at random offsets of the 418 kB training text see each byte ~15 times
            "paper": dict(batch_size=32, train_batches=3000, val_batches=16, steps=3000, seeds=(0, 1),
                          lrs={"sgd": (0.1, 0.3), "adamw": (1e-3, 3e-3), "adam_mini": (1e-3, 3e-3),
                               "galore_mini": (4e-3, 1.2e-2)}),
        }[size]
        return cls(**{"model": model, "overrides": overrides, **base, **changes})

    def setup(self) -> TrainSetup:
        return TrainSetup(self.model, self.overrides, self.data, self.batch_size, self.train_batches,
                          self.val_batches)


def _partition(config: ComparisonConfig, store: ResultStore):
    """What ``make_optimizer`` gets for Adam-mini: "default", or a Partition (derived or from a file)."""
    from hessian_blocks import Partition

    if config.partition == "default":
        return "default"
    spec, train, _ = config.setup().build(seed=0)
    if config.partition != "derived":
        return Partition.load(Path(config.partition), spec.model)
    from hessian_blocks.partitioner import derive_partition

    params = {"setup": asdict(config.setup())}
    rules = store.run(params_key("partition-derived", params), params,
                      lambda: {"partition": derive_partition(spec.model, spec.loss_fn, train).to_dict()},
                      fingerprint=model_fingerprint(spec.model))
    return Partition.from_dict(rules["partition"], spec.model)


def comparison_experiment(
    config: ComparisonConfig, *, out: str | None = None, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves). ``runs``: one row per (optimizer, lr, seed) with train_loss, val_loss,
    state_bytes, seconds_per_step, diverged; ``curves``: optimizer, lr, seed, step, loss."""
    unknown = sorted(set(config.lrs) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}: choose from {', '.join(OPTIMIZERS)}")
    check_device(config.device)  # before a derived partition is measured
    store = ResultStore(out)
    partition = _partition(config, store) if set(PARTITIONED) & set(config.lrs) else None
    runs, records = train_grid(
        store, {config.model: config.setup()}, config.lrs, config.seeds, config.steps,
        key=lambda model, opt: f"compare-{model}-{opt}", device=config.device,
        recorded=lambda opt: {"weight_decay": config.weight_decay,
                              "partition": config.partition if opt in PARTITIONED else None},
        options=lambda opt: {"weight_decay": config.weight_decay,
                             "partition": partition if opt in PARTITIONED else "default"},
        desc=f"compare on {config.model}", progress=progress)
    curves = [pd.DataFrame({"optimizer": run.optimizer, "lr": run.lr, "seed": run.seed,
                            "step": np.arange(len(record["losses"])),
                            "loss": np.asarray(record["losses"], dtype=np.float64)})
              for run, record in zip(runs.itertuples(), records)]
    return runs, pd.concat(curves, ignore_index=True)


def comparison_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer at its best lr (lowest mean final validation loss): losses, state bytes, seconds
    per step, and the ratios to AdamW (``*_vs_adamw`` = loss / AdamW's - 1; state_vs_adamw = bytes ratio)."""
    best = best_runs(runs, by="val_loss").drop(columns="model")
    if "adamw" in set(best["optimizer"]):
        ref = best.set_index("optimizer").loc["adamw"]
        best["loss_vs_adamw"] = best["train_loss"] / ref["train_loss"] - 1.0
        best["val_vs_adamw"] = best["val_loss"] / ref["val_loss"] - 1.0
        best["state_vs_adamw"] = best["state_bytes"] / ref["state_bytes"]
    return best


def plot_loss_curves(curves: pd.DataFrame, summary: pd.DataFrame, title: str = ""):
    """Training loss vs step of each optimizer at its best lr (mean over seeds, smoothed over 10 steps)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for _, row in summary.iterrows():
        run = curves[(curves["optimizer"] == row["optimizer"]) & (curves["lr"] == row["lr"])]
        mean = run.groupby("step")["loss"].mean()
        ax.plot(mean.index, mean.rolling(10, min_periods=1).mean(), linewidth=1.0,
                label=f"{row['optimizer']} (lr {row['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title(title or "Training loss at each optimizer's best lr")
    ax.legend(fontsize=8)
    return fig


def plot_lr_sweep(runs: pd.DataFrame, title: str = ""):
    """Final validation loss vs learning rate (log x), one line per optimizer (mean over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for opt, group in runs.groupby("optimizer", sort=False):
        mean = group.groupby("lr")["val_loss"].mean()
        ax.plot(mean.index, mean.to_numpy(), marker="o", label=opt)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(title or "Learning-rate sweep (best lr = lowest point)")
    ax.legend(fontsize=8)
    return fig


def plot_state_memory(summary: pd.DataFrame, title: str = ""):
    """Optimizer-state memory of each optimizer (bars, KiB), labelled with the ratio to AdamW."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    kib = summary["state_bytes"].to_numpy() / 1024
    bars = ax.bar(summary["optimizer"], kib, color=["C0", "C1", "C2", "C3"][: len(summary)])
    if "state_vs_adamw" in summary:
        for bar, ratio in zip(bars, summary["state_vs_adamw"]):
            ax.annotate(f"{ratio:.1%} of AdamW", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("optimizer state (KiB)")
    ax.set_title(title or "Optimizer-state memory")
    return fig
