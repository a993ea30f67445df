"""A man-made MLP with a controllable level of block heterogeneity: SGD vs AdamW as it grows.

The MLP (digits, 64 -> hidden -> 10, ReLU) multiplies the output of its ``l``-th linear layer by a
fixed factor ``s_l``, log-spaced from ``1/level`` (first layer) to ``level`` (last layer), and
initialises that layer's weights divided by ``s_l``: at initialisation the network computes exactly
the same function for every level, but the Hessian block of layer ``l`` is scaled by ``s_l^2``, so
the block spectra drift apart as ``level`` grows (level 1: the plain MLP). This is our construction
of the papers' "man-made MLP" (the papers do not fix one in the facts we reproduce). Measured per
level: JS0 at initialisation and the best final training loss of SGD-momentum and of AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn as nn

from hessian_blocks import ModelSpec
from hessian_blocks.models import cross_entropy_loss

from .spectra import measure_spectrum
from .store import ResultStore, check_size
from .training import TrainSetup, best_runs, train_grid

__all__ = ["ScaledMLP", "scaled_mlp", "ManmadeConfig", "manmade_experiment", "plot_manmade"]

FACTORY = "analysis.experiments.manmade_mlp:scaled_mlp"


class ScaledMLP(nn.Module):
    """ReLU MLP whose layer ``l`` output is multiplied by the fixed ``scales[l]`` (not trained)."""

    def __init__(self, sizes: tuple[int, ...], scales: tuple[float, ...]):
        super().__init__()
        if len(scales) != len(sizes) - 1 or min(scales) <= 0:
            raise ValueError(f"need {len(sizes) - 1} positive scales for sizes {sizes}, got {scales}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.register_buffer("scales", torch.tensor(scales))
        with torch.no_grad():
            for layer, scale in zip(self.layers, scales):
                layer.weight /= scale
                layer.bias /= scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = self.scales[i] * layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def scaled_mlp(level: float = 1.0, hidden: tuple[int, ...] | list[int] = (32, 32, 32)) -> ModelSpec:
    """Factory (``build_model("analysis.experiments.manmade_mlp:scaled_mlp", level=...)``) for digits."""
    if level < 1:
        raise ValueError(f"level must be >= 1 (1: no added heterogeneity), got {level}")
    sizes = (64, *hidden, 10)
    n = len(sizes) - 1
    scales = tuple(float(level) ** (2 * i / (n - 1) - 1) if n > 1 else 1.0 for i in range(n))
    return ModelSpec("scaled-mlp", ScaledMLP(sizes, scales), cross_entropy_loss, "vector",
                     {"in_features": 64, "num_classes": 10}, None)


@dataclass(frozen=True)
class ManmadeConfig:
    """Levels, MLP width, SLQ and training settings (``preset(size)`` for the shared sizes)."""

    levels: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    hidden: tuple[int, ...] = (32, 32, 32)
    slq_steps: int = 25
    slq_probes: int = 2
    batch_size: int = 32
    train_batches: int = 16
    val_batches: int = 4
    steps: int = 300
    # SGD's stable lr falls like 1/level^2 (the last layer's Hessian block is scaled by level^2): the grid
    # reaches down to 3e-6 so that its best lr lies inside it at every level up to 64
    lrs: dict = field(default_factory=lambda: {"sgd": (3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1,
                                                       0.3, 1.0),
                                               "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)})
    seeds: tuple[int, ...] = (0,)
    device: str = "cpu"  # where the spectra are measured and the runs train ("cuda", "cuda:1", ...)

    @classmethod
    def preset(cls, size: str, **changes) -> "ManmadeConfig":
        check_size(size)
        base = {
            "small": dict(levels=(1.0, 10.0), hidden=(16, 16), slq_steps=10, slq_probes=1, batch_size=16,
                          train_batches=8, val_batches=2, steps=40,
                          lrs={"sgd": (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3), "adamw": (3e-3, 1e-2, 3e-2, 0.1)}),
            "medium": dict(),
            "paper": dict(levels=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0), hidden=(128, 128, 128), slq_steps=100,
                          slq_probes=10, train_batches=40, steps=2000, seeds=(0, 1, 2)),
        }[size]
        return cls(**{**base, **changes})


def manmade_experiment(config: ManmadeConfig, *, out: str | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per level: JS0 at init, best SGD / AdamW final training loss and lr, gap = SGD - AdamW."""
    from analysis import js0, js_matrix

    store = ResultStore(out)
    setups = {level: TrainSetup(FACTORY, {"level": level, "hidden": config.hidden}, "digits", config.batch_size,
                                config.train_batches, config.val_batches) for level in config.levels}
    runs, _ = train_grid(store, setups, config.lrs, config.seeds, config.steps, key=lambda level, opt: f"manmade-{opt}",
                         device=config.device, desc="man-made MLP", progress=progress)
    best = best_runs(runs).set_index(["model", "optimizer"])
    rows = []
    for level in config.levels:
        spectrum = measure_spectrum(FACTORY, {"level": level, "hidden": config.hidden}, data="digits",
                                    steps=config.slq_steps, probes=config.slq_probes, device=config.device,
                                    store=store)
        row = {"level": level, "JS0": js0(js_matrix(spectrum.density().densities))}
        for opt in config.lrs:
            row[f"{opt}_loss"] = best.loc[(level, opt), "train_loss"]
            row[f"{opt}_lr"] = best.loc[(level, opt), "lr"]
        rows.append(row)
    table = pd.DataFrame(rows)
    table["gap"] = table["sgd_loss"] - table["adamw_loss"]
    return table


def plot_manmade(table: pd.DataFrame):
    """Left: JS0 at init vs level; right: best final training loss of SGD and AdamW vs level."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(table["level"], table["JS0"], marker="o")
    left.set_xscale("log")
    left.set_xlabel("heterogeneity level (layer scales 1/level .. level)")
    left.set_ylabel("JS0 at initialisation")
    for opt, label in (("sgd", "SGD-momentum"), ("adamw", "AdamW")):
        right.plot(table["level"], table[f"{opt}_loss"], marker="o", label=label)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("heterogeneity level")
    right.set_ylabel("best final training loss (log scale)")
    right.legend(fontsize=8)
    fig.suptitle("Man-made MLP: block heterogeneity vs SGD and AdamW")
    return fig

