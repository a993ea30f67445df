"""Analysis layer: JS distances between block spectra, heterogeneity tables, plots.

The names load on first use (``import analysis`` imports neither pandas nor matplotlib).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hessian_blocks.lazy import lazy_exports

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

_EXPORTS = {
    **dict.fromkeys(("js0", "js_distance", "js_matrix"), ".js"),
    **dict.fromkeys(("plot_block_densities", "plot_js_heatmap", "save_figure"), ".plots"),
    **dict.fromkeys(("block_table", "format_table", "js0_table"), ".tables"),
}
lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .js import js0, js_distance, js_matrix
    from .plots import plot_block_densities, plot_js_heatmap, save_figure
    from .tables import block_table, format_table, js0_table
