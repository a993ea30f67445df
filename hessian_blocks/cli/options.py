"""Option groups shared by the commands, declared once, and the helpers that read them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

__all__ = [
    "DTYPE_NAMES", "add_compute_options", "add_model_options", "add_output_options", "folder_name", "parse_overrides",
    "torch_dtype",
]

DTYPE_NAMES = ("float64", "float32")


def torch_dtype(name: str):
    """The torch dtype called ``name`` (one of DTYPE_NAMES)."""
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def add_model_options(parser: argparse.ArgumentParser, *, repeatable: bool = False, default: str | None = None,
                      required: bool = False, batches: bool = True) -> argparse._ArgumentGroup:
    """``--model``, ``--set``, ``--data`` (and ``--batches``, ``--batch-size`` where ``batches``)."""
    from ..data import DATA_SOURCES
    from ..models import MODEL_NAMES

    group = parser.add_argument_group("model and data")
    what = f"bundled model ({', '.join(MODEL_NAMES)}) or 'package.module:factory'"
    if repeatable:
        group.add_argument("--model", action="append", metavar="NAME", help=f"{what}; repeat to compare models")
    else:
        suffix = f" (default: {default})" if default else ""
        group.add_argument("--model", default=default, required=required, metavar="NAME", help=what + suffix)
    group.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a model config field, e.g. --set n_layer=2" +
                            (" (applies to every --model)" if repeatable else ""))
    group.add_argument("--data", default="auto",
                       help=f"data source: auto, {', '.join(DATA_SOURCES)}, or a .pt/.npz/.txt file (default: auto)")
    if batches:
        group.add_argument("--batches", type=int, default=1, help="number of batches in the loss (default: 1)")
        group.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    return group


def add_compute_options(parser: argparse.ArgumentParser, *, products: bool = True,
                        dtype: str = "float64") -> argparse._ArgumentGroup:
    """``--device`` (and ``--dtype`` with default ``dtype``, ``--strategy`` of the Hessian-vector products where
    ``products``)."""
    from ..hvp import STRATEGIES

    group = parser.add_argument_group("compute")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    if products:
        group.add_argument("--dtype", choices=DTYPE_NAMES, default=dtype, help=f"precision of the products (default: {dtype})")
        group.add_argument("--strategy", choices=STRATEGIES, default="auto",
                           help="block Hessian-vector product strategy (default: auto)")
    return group


def add_output_options(parser: argparse.ArgumentParser, default_out: Path, what: str = "output folder") -> argparse._ArgumentGroup:
    """``--out`` and ``--no-progress``."""
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, default=default_out, help=f"{what} (default: {default_out})")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return group


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``--set FIELD=VALUE`` options as a dict; values are JSON where they parse, else strings."""
    overrides = {}
    for pair in pairs:
        field, sep, text = pair.partition("=")
        if not sep or not field:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[field] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field] = text
    return overrides


def folder_name(label: str) -> str:
    """``label`` made safe as a file or folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
