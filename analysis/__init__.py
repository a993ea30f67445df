"""Analysis layer: JS distances between block spectra, heterogeneity tables, plots."""

from .js import js0, js_distance, js_matrix
from .plots import plot_block_densities, plot_js_heatmap, save_figure
from .tables import block_table, format_table, js0_table

__all__ = [
    "js_distance",
    "js_matrix",
    "js0",
    "block_table",
    "js0_table",
    "format_table",
    "plot_js_heatmap",
    "plot_block_densities",
    "save_figure",
]
