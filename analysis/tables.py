"""Heterogeneity tables (pandas): per-block spectrum statistics and per-model JS0."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

__all__ = ["block_table", "js0_table", "format_table"]

class SpectrumLike(Protocol):
    """What block_table reads of a hessian_blocks.results.SpectrumResult."""

    names: Sequence[str]
    params: Sequence[str]
    shapes: Sequence[tuple[int, ...]]
    sizes: np.ndarray

    def lambda_min(self) -> np.ndarray: ...

    def lambda_max(self) -> np.ndarray: ...

    def trace_estimate(self) -> np.ndarray: ...


BLOCK_COLUMNS = ["block", "param", "shape", "numel", "lambda_min", "lambda_max", "trace"]


def _shape_str(shape: Sequence[int]) -> str:
    dims = tuple(int(d) for d in shape)
    return "x".join(str(d) for d in dims) if dims else "scalar"


def _per_block(values: np.ndarray, n_blocks: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape != (n_blocks,):
        raise ValueError(f"{what} has {arr.size} entries, expected one per block ({n_blocks})")
    return arr


def block_table(spectrum: SpectrumLike, js: np.ndarray | None = None) -> pd.DataFrame:
    """One row per block of a SpectrumResult (duck-typed).

    Columns: ``block`` (name), ``param`` (tensor it belongs to), ``shape`` (e.g. "128x512"),
    ``numel``, ``lambda_min``, ``lambda_max``, ``trace`` (Hutchinson estimate) and, when a
    ``[B, B]`` JS distance matrix is given, ``mean_js``: each block's mean distance to the other
    blocks (NaN when there is only one block).
    """
    names = list(spectrum.names)
    n_blocks = len(names)
    params = list(spectrum.params)
    shapes = list(spectrum.shapes)
    if len(params) != n_blocks or len(shapes) != n_blocks:
        raise ValueError(
            f"spectrum has {n_blocks} names but {len(params)} params and {len(shapes)} shapes"
        )
    sizes = np.asarray(spectrum.sizes).reshape(-1)
    if sizes.shape != (n_blocks,):
        raise ValueError(f"spectrum.sizes has {sizes.size} entries, expected {n_blocks}")
    df = pd.DataFrame(
        {
            "block": names,
            "param": params,
            "shape": [_shape_str(s) for s in shapes],
            "numel": sizes.astype(np.int64),
            "lambda_min": _per_block(spectrum.lambda_min(), n_blocks, "lambda_min()"),
            "lambda_max": _per_block(spectrum.lambda_max(), n_blocks, "lambda_max()"),
            "trace": _per_block(spectrum.trace_estimate(), n_blocks, "trace_estimate()"),
        }
    )
    if js is not None:
        matrix = np.asarray(js, dtype=np.float64)
        if matrix.shape != (n_blocks, n_blocks):
            raise ValueError(f"js must be [B, B] = [{n_blocks}, {n_blocks}], got {matrix.shape}")
        if n_blocks > 1:
            off = ~np.eye(n_blocks, dtype=bool)
            mean_js = np.where(off, matrix, 0.0).sum(axis=1) / (n_blocks - 1)
        else:
            mean_js = np.full(n_blocks, np.nan)
        df["mean_js"] = mean_js
    return df


def js0_table(results: Mapping[str, float], baseline: str | None = None) -> pd.DataFrame:
    """Model -> JS0, sorted by JS0 descending (ties keep the mapping's order).

    Columns ``model`` and ``JS0``; with ``baseline`` (a key of ``results``) also ``ratio`` =
    JS0 / JS0(baseline), e.g. how many times a Transformer's heterogeneity exceeds a CNN's
    (inf where the baseline's JS0 is 0). The baseline's name is kept in ``df.attrs["baseline"]``.
    """
    models = [str(k) for k in results.keys()]
    values = []
    for key, value in results.items():
        v = float(value)
        if math.isnan(v):
            raise ValueError(f"JS0 of {key!r} is NaN")
        values.append(v)
    df = pd.DataFrame({"model": models, "JS0": np.asarray(values, dtype=np.float64)})
    if baseline is not None:
        if baseline not in results:
            raise ValueError(f"baseline {baseline!r} is not among the models {models}")
        base = float(results[baseline])
        with np.errstate(divide="ignore", invalid="ignore"):
            df["ratio"] = df["JS0"].to_numpy() / base
    df = df.sort_values("JS0", ascending=False, kind="stable").reset_index(drop=True)
    if baseline is not None:
        df.attrs["baseline"] = baseline
    return df


def _cell(x: object) -> str:
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.3g}"
    return str(x)


def format_table(df: pd.DataFrame) -> str:
    """Fixed-width text of a table for the terminal.

    No index; floats as %.3g; numeric columns right-aligned, text columns left-aligned; columns
    separated by two spaces; every line has the same width.
    """
    columns = [str(c) for c in df.columns]
    if df.empty:
        return "(empty table: " + ", ".join(columns) + ")"
    lines_by_col = []
    for col, name in zip(df.columns, columns):
        values = df[col].tolist()
        cells = [_cell(v) for v in values]
        numeric = pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col])
        width = max(len(name), *(len(c) for c in cells))
        just = str.rjust if numeric else str.ljust
        lines_by_col.append([just(name, width)] + [just(c, width) for c in cells])
    return "\n".join("  ".join(row) for row in zip(*lines_by_col))
