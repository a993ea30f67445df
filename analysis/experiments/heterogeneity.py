"""Block heterogeneity vs the SGD-Adam gap over the model zoo (the papers' JS0-vs-gap figure, Table 1).

For every model: JS0 at initialisation (mean Jensen-Shannon distance between the spectral
densities of its parameter blocks, one block per tensor) and the gap between the best final
training loss of SGD-momentum and of AdamW, each at its best learning rate of a small grid (mean
over seeds), with the same budget of steps on the same offline batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .spectra import measure_spectrum, spectra_table
from .store import ResultStore, check_size
from .training import TrainSetup, best_runs, train_grid
from .zoo import zoo_models

__all__ = ["HeterogeneityConfig", "heterogeneity_experiment", "plot_js0_vs_gap"]


@dataclass(frozen=True)
class HeterogeneityConfig:
    """Models, SLQ and training settings (``preset(size)`` for the shared sizes)."""

    models: dict = field(default_factory=lambda: zoo_models("medium"))
    slq_batch_size: int = 4
    slq_steps: int = 25
    slq_probes: int = 2
    batch_size: int = 16
    train_batches: int = 16
    val_batches: int = 4
    steps: int = 200
    lrs: dict = field(default_factory=lambda: {"sgd": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                                               "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)})
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"  # where the spectra are measured and the runs train ("cuda", "cuda:1", ...)

    @classmethod
    def preset(cls, size: str, models: tuple[str, ...] | None = None, **changes) -> "HeterogeneityConfig":
        check_size(size)
        base = {
            "small": dict(slq_steps=15, slq_probes=1, batch_size=8, train_batches=4, val_batches=2, steps=40,
                          lrs={"sgd": (0.01, 0.03, 0.1, 0.3, 1.0), "adamw": (1e-3, 3e-3, 1e-2, 3e-2, 0.1)},
                          seeds=(0,)),
            "medium": dict(),
            # the bundled full-size models and the papers' SLQ settings; the training budget is what a
            # 2-core CPU finishes in about 1.5 hours (about 0.8 s for one step of all six models)
            # (48 + 4 batches of 32: the digits' training part has 1617 images, the validation part 180)
            "paper": dict(slq_steps=100, slq_probes=10, slq_batch_size=8, batch_size=32, train_batches=48,
                          val_batches=4, steps=1000, seeds=(0,),
                          lrs={"sgd": (0.01, 0.03, 0.1, 0.3, 1.0), "adamw": (3e-4, 1e-3, 3e-3)}),
        }[size]
        return cls(**{"models": zoo_models(size, models), **base, **changes})


def heterogeneity_experiment(
    config: HeterogeneityConfig, *, out: str | None = None, progress: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, runs). ``table``: one row per model with family, blocks, JS0 and its ratio to the
    largest CNN's (:func:`.spectra.spectra_table`), the best SGD and AdamW final training losses and
    lrs, and gap = SGD - AdamW; ``runs``: every training run."""
    store = ResultStore(out)
    spectra = {model: measure_spectrum(model, overrides, batch_size=config.slq_batch_size, steps=config.slq_steps,
                                       probes=config.slq_probes, device=config.device, store=store,
                                       progress=progress)
               for model, overrides in config.models.items()}
    table = spectra_table(spectra)
    setups = {model: TrainSetup(model, overrides, batch_size=config.batch_size, train_batches=config.train_batches,
                                val_batches=config.val_batches) for model, overrides in config.models.items()}
    runs, _ = train_grid(store, setups, config.lrs, config.seeds, config.steps,
                         key=lambda model, opt: f"train-{model}-{opt}", device=config.device, progress=progress)
    best = best_runs(runs).set_index(["model", "optimizer"])
    for opt in ("sgd", "adamw"):
        table[f"{opt}_loss"] = [best.loc[(m, opt), "train_loss"] for m in table["model"]]
        table[f"{opt}_lr"] = [best.loc[(m, opt), "lr"] for m in table["model"]]
    table["gap"] = table["sgd_loss"] - table["adamw_loss"]
    return table.sort_values("JS0", ascending=False, kind="stable").reset_index(drop=True), runs


FAMILY_COLORS = {"Transformer": "C0", "MLP-mixer": "C1", "CNN": "C2"}  # the same in every figure; others C3..


def plot_js0_vs_gap(table: pd.DataFrame):
    """Scatter of JS0 at initialisation (log x) vs the SGD - AdamW final-loss gap, one labelled
    point per model, coloured by family (:data:`FAMILY_COLORS`)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    extra = [family for family in dict.fromkeys(table["family"]) if family not in FAMILY_COLORS]
    colors = {**FAMILY_COLORS, **{family: f"C{3 + k % 7}" for k, family in enumerate(extra)}}
    for family, color in colors.items():
        group = table[table["family"] == family]
        if group.empty:
            continue
        ax.scatter(group["JS0"], group["gap"], label=family, s=40, color=color)
        for _, row in group.iterrows():
            ax.annotate(row["model"], (row["JS0"], row["gap"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # a short log axis: label 0.1, 0.2, 0.5, ...
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("JS0 at initialisation (log scale)")
    ax.set_ylabel("final training loss: SGD - AdamW")
    ax.set_title("Block heterogeneity vs SGD's gap to AdamW")
    ax.legend(fontsize=8)
    return fig
