"""Optimizer comparison: SGD-momentum vs AdamW vs Adam-mini vs GaLore-mini on one model, same budget.

Every optimizer trains the same seeded model on the same offline batches for the same number of
steps, over a small learning-rate grid and several seeds. Adam-mini's (and GaLore-mini's) partition is "default" (the
optimizer's structural default: per head / per neuron / per token), "derived" (measured from the
model's Hessian by ``hessian_blocks.partitions.measured.derive_partition``, once, on the seed-0 model) or a
partition file. Recorded per run: the loss at every step, final train / validation loss,
optimizer-state bytes and seconds per step.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hessian_blocks.guards import check_device
from hessian_blocks.models.checks import check_positive

from .store import ResultStore, check_size, model_fingerprint, params_key
from .training import OPTIMIZERS, PARTITIONED, TrainSetup, best_runs, file_digest, train_grid
from .zoo import FAMILIES, zoo_models

__all__ = ["OPTIMIZER_STYLES", "ComparisonConfig", "comparison_experiment", "comparison_summary",
           "plot_loss_curves", "plot_lr_sweep", "plot_state_memory"]


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
    lrs: dict = field(default_factory=lambda: {"sgd": (0.01, 0.03, 0.1, 0.3, 1.0), "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
                                               "adam_mini": (3e-4, 1e-3, 3e-3, 1e-2),
                                               "galore_mini": (4e-3, 1.2e-2, 4e-2)})  # scale 0.25: 4x lr
    seeds: tuple[int, ...] = (0, 1)
    weight_decay: float = 0.0
    partition: str = "default"  # "default", "derived" or a partition file
    device: str = "cpu"  # where the runs train ("cuda", "cuda:1", ...)

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "train_batches", "val_batches")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ComparisonConfig.seeds must be distinct and at least one, got {self.seeds!r}")
        if not self.lrs:
            raise ValueError("ComparisonConfig.lrs names no optimizer: give at least one, e.g. {'adamw': (1e-3,)}")
        for opt, grid in self.lrs.items():
            rates = tuple(grid)
            if not rates or len(set(rates)) != len(rates) or not all(math.isfinite(lr) and lr > 0 for lr in rates):
                raise ValueError(f"the lr grid of {opt} must hold distinct finite positive rates, got {grid!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")

    @classmethod
    def preset(cls, size: str, model: str = "gpt2-nano", **changes) -> "ComparisonConfig":
        """Zoo models get the zoo's overrides for ``size``; other bundled models and user models
        ("pkg.mod:factory") none. Changing ``steps`` alone changes ``train_batches`` with it (a new batch
        every step, as the presets draw)."""
        check_size(size)
        overrides = zoo_models(size, (model,))[model] if model in FAMILIES else {}
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
        if "steps" in changes and "train_batches" not in changes:
            changes["train_batches"] = changes["steps"]
        return cls(**{"model": model, "overrides": overrides, **base, **changes})

    def setup(self) -> TrainSetup:
        return TrainSetup(self.model, self.overrides, self.data, self.batch_size, self.train_batches,
                          self.val_batches)


def _partition(config: ComparisonConfig, store: ResultStore, progress: bool):
    """What ``make_optimizer`` gets for Adam-mini: "default", or a Partition (derived or from a file)."""
    from hessian_blocks import Partition

    if config.partition == "default":
        return "default"
    setup = config.setup()
    spec, train, _ = setup.build(seed=0)
    if config.partition != "derived":
        return Partition.load(Path(config.partition), spec.model)
    from hessian_blocks.partitions.measured import derive_partition

    params = {"setup": asdict(setup)}
    digest = setup.data_digest()
    if digest is not None:  # a data file changed in place: measured again
        params["data_sha256"] = digest
    key, fingerprint = params_key("partition-derived", params), model_fingerprint(spec.model)
    if progress and store.load(key, params, fingerprint) is None:
        print(f"deriving Adam-mini's partition from the Hessian of {config.model} at initialisation "
              "(once; stored with the results)", file=sys.stderr, flush=True)
    rules = store.run(key, params, lambda: {"partition": derive_partition(spec.model, spec.loss_fn, train).to_dict()},
                      fingerprint=fingerprint)
    return Partition.from_dict(rules["partition"], spec.model)


def comparison_experiment(
    config: ComparisonConfig, *, out: str | None = None, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves). ``runs``: one row per (optimizer, lr, seed) with train_loss, val_loss,
    state_bytes, seconds_per_step, diverged, unstable; ``curves``: optimizer, lr, seed, step, loss."""
    unknown = sorted(set(config.lrs) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}: choose from {', '.join(OPTIMIZERS)}")
    check_device(config.device)  # before a derived partition is measured
    store = ResultStore(out)
    partitioned = bool(set(PARTITIONED) & set(config.lrs))
    partition = _partition(config, store, progress) if partitioned else None
    # a partition file changed in place retrains the runs that used it
    partition_digest = (file_digest(config.partition)
                        if partitioned and config.partition not in ("default", "derived") else None)
    runs, records = train_grid(
        store, {config.model: config.setup()}, config.lrs, config.seeds, config.steps,
        key=lambda model, opt: f"compare-{model}-{opt}", device=config.device,
        recorded=lambda opt: {"weight_decay": config.weight_decay,
                              "partition": config.partition if opt in PARTITIONED else None,
                              **({"partition_sha256": partition_digest} if opt in PARTITIONED and partition_digest
                                 else {})},
        options=lambda opt: {"weight_decay": config.weight_decay,
                             "partition": partition if opt in PARTITIONED else "default"},
        desc=f"compare on {config.model}", progress=progress)
    curves = [pd.DataFrame({"optimizer": run.optimizer, "lr": run.lr, "seed": run.seed,
                            "step": np.arange(len(record["losses"])),
                            "loss": np.asarray(record["losses"], dtype=np.float64)})
              for run, record in zip(runs.itertuples(), records)]
    return runs, pd.concat(curves, ignore_index=True)


def comparison_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer at its best lr (lowest mean final validation loss; see :func:`.training.best_runs`,
    whose ``diverged`` and ``unstable`` columns count the seeds that diverged or ended far above their
    start): losses, state bytes, seconds per step, and the
    ratios to AdamW (``*_vs_adamw`` = loss / AdamW's - 1; state_vs_adamw = bytes ratio; NaN where a
    loss is not finite)."""
    best = best_runs(runs, by="val_loss").drop(columns="model")
    if "adamw" in set(best["optimizer"]):
        ref = best.set_index("optimizer").loc["adamw"]
        for column, loss in (("loss_vs_adamw", "train_loss"), ("val_vs_adamw", "val_loss")):
            ratio = best[loss] / ref[loss] - 1.0
            best[column] = ratio.where(np.isfinite(best[loss]) & np.isfinite(ref[loss]))
        best["state_vs_adamw"] = best["state_bytes"] / ref["state_bytes"]
    return best


OPTIMIZER_STYLES: dict[str, tuple[str, str]] = {  # (label, colour): the same in every figure
    "sgd": ("SGD-momentum", "C0"), "adamw": ("AdamW", "C1"), "adam_mini": ("Adam-mini", "C2"),
    "galore_mini": ("GaLore-mini", "C3"),
}


def _style(optimizer: str) -> tuple[str, str]:
    return OPTIMIZER_STYLES.get(optimizer, (optimizer, "C4"))


def plot_loss_curves(curves: pd.DataFrame, summary: pd.DataFrame, title: str = ""):
    """Training loss (log scale) vs step of each optimizer at its best lr: mean over seeds, smoothed over
    10 steps; a curve ends where a seed's loss stopped being finite (a diverged run)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for _, row in summary.iterrows():
        run = curves[(curves["optimizer"] == row["optimizer"]) & (curves["lr"] == row["lr"])]
        mean = run.pivot(index="step", columns="seed", values="loss").mean(axis=1, skipna=False)
        smooth = mean.rolling(10, min_periods=1).mean().where(mean.notna())
        label, color = _style(row["optimizer"])
        ax.plot(smooth.index, smooth.to_numpy(), linewidth=1.0, color=color, label=f"{label} (lr {row['lr']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean, log scale)")
    ax.set_title(title or "Training loss at each optimizer's best lr")
    ax.legend(fontsize=8)
    return fig


def plot_lr_sweep(runs: pd.DataFrame, title: str = ""):
    """Final validation loss vs learning rate (log x), one line per optimizer (mean over seeds; an lr
    with a diverged seed is left out)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for opt, group in runs.groupby("optimizer", sort=False):
        mean = group.groupby("lr")["val_loss"].mean().where(~group.groupby("lr")["diverged"].any())
        label, color = _style(opt)
        ax.plot(mean.index, mean.to_numpy(), marker="o", color=color, label=label)
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
    labels, colors = zip(*(_style(opt) for opt in summary["optimizer"]))
    bars = ax.bar(labels, kib, color=colors)
    if "state_vs_adamw" in summary:
        for bar, ratio in zip(bars, summary["state_vs_adamw"]):
            ax.annotate(f"{ratio:.1%}\nof AdamW", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.margins(y=0.15)  # room for the labels above the tallest bar
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("optimizer state (KiB)")
    ax.set_title(title or "Optimizer-state memory")
    return fig
