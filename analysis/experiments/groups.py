"""The figure groups: each runs its experiments at a size and returns named tables and figures.

``hessian-blocks figures`` writes every group's figures as PNG (and tables as CSV); the notebooks
call the same functions and display the results, so the committed figures and the notebooks show
the same computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .store import check_size

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FIGURE_GROUPS", "GroupResult", "run_group"]


@dataclass
class GroupResult:
    """Tables (name -> DataFrame) and matplotlib figures (file stem -> Figure) of one group."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)


def quadratics_group(size: str, results: Path | None, progress: bool, device: str) -> GroupResult:
    from .quadratics import QuadraticConfig, plot_quadratics, quadratic_experiment, summarize_quadratics

    config = QuadraticConfig.preset(size, device=device)
    curves = quadratic_experiment(config, out=results, progress=progress)
    summary = summarize_quadratics(curves, config.target)
    return GroupResult({"quadratics_summary": summary}, {"quadratics": plot_quadratics(curves, summary)})


def manmade_group(size: str, results: Path | None, progress: bool, device: str) -> GroupResult:
    from .manmade_mlp import ManmadeConfig, manmade_experiment, plot_manmade

    table = manmade_experiment(ManmadeConfig.preset(size, device=device), out=results, progress=progress)
    return GroupResult({"manmade_mlp": table}, {"manmade_mlp": plot_manmade(table)})


def spectra_group(size: str, results: Path | None, progress: bool, device: str) -> GroupResult:
    from analysis import js_matrix, plot_js_heatmap

    from .spectra import SpectraConfig, plot_sampled_densities, spectra_experiment, spectra_table
    from .zoo import FAMILIES

    densities = SpectraConfig.preset(size, device=device)
    heatmaps = SpectraConfig.preset(size, models=tuple(FAMILIES), device=device)
    shown = spectra_experiment(densities, out=results, progress=progress)
    every = spectra_experiment(heatmaps, out=results, progress=progress)
    figures = {"block_spectra_init": plot_sampled_densities(shown, panels=densities.panels,
                                                            rescale_rank=densities.rescale_rank)}
    for model, spectrum in every.items():
        matrix = js_matrix(spectrum.density().densities)
        figures[f"js_heatmap_{model}"] = plot_js_heatmap(matrix, spectrum.names, title=f"{model}: JS distance")
    return GroupResult({"spectra": spectra_table(every)}, figures)


def heterogeneity_group(size: str, results: Path | None, progress: bool, device: str) -> GroupResult:
    from .heterogeneity import HeterogeneityConfig, heterogeneity_experiment, plot_js0_vs_gap

    config = HeterogeneityConfig.preset(size, device=device)
    table, runs = heterogeneity_experiment(config, out=results, progress=progress)
    return GroupResult({"js0_gap": table, "js0_gap_runs": runs}, {"js0_vs_gap": plot_js0_vs_gap(table)})


def comparison_group(size: str, results: Path | None, progress: bool, device: str) -> GroupResult:
    from .comparison import (
        ComparisonConfig,
        comparison_experiment,
        comparison_summary,
        plot_loss_curves,
        plot_lr_sweep,
        plot_state_memory,
    )

    config = ComparisonConfig.preset(size, device=device)
    runs, curves = comparison_experiment(config, out=results, progress=progress)
    summary = comparison_summary(runs)
    name = config.model
    return GroupResult(
        {"compare_summary": summary, "compare_runs": runs},
        {"compare_loss_curves": plot_loss_curves(curves, summary, title=f"{name}: training loss"),
         "compare_lr_sweep": plot_lr_sweep(runs, title=f"{name}: learning-rate sweep"),
         "compare_state_memory": plot_state_memory(summary, title=f"{name}: optimizer-state memory")},
    )


def hessian_group(size: str, results: Path | None, progress: bool, device: str) -> GroupResult:
    from .hessian_structure import StructureConfig, plot_structure, structure_experiment

    table, maps = structure_experiment(StructureConfig.preset(size, device=device), out=results, progress=progress)
    figures = {f"hessian_structure_{model}": plot_structure(
        hmap, f"{model} at init: Hessian of {len(hmap.params)} tensor(s), {len(hmap.blocks)} blocks")
        for model, hmap in maps.items()}
    return GroupResult({"hessian_structure": table}, figures)


FIGURE_GROUPS: dict[str, Callable[[str, Path | None, bool, str], GroupResult]] = {
    "quadratics": quadratics_group,
    "manmade_mlp": manmade_group,
    "spectra": spectra_group,
    "heterogeneity": heterogeneity_group,
    "comparison": comparison_group,
    "hessian": hessian_group,
}


def run_group(name: str, size: str = "small", results: str | Path | None = None, progress: bool = True,
              device: str = "cpu") -> GroupResult:
    """Run figure group ``name`` (one of FIGURE_GROUPS) at ``size`` on ``device``; work units kept under
    ``results``. Spectra and Hessian maps are float64 and resume across devices; training runs are kept
    per device (each experiment checks the device before its first measurement)."""
    check_size(size)
    if name not in FIGURE_GROUPS:
        raise ValueError(f"unknown figure group {name!r}: choose one of {', '.join(FIGURE_GROUPS)}")
    return FIGURE_GROUPS[name](size, None if results is None else Path(results), progress, device)
