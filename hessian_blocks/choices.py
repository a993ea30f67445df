"""The names and defaults the command line offers before anything heavy is imported.

This module imports nothing (no torch, numpy or pandas), so ``hessian-blocks --help`` stays fast.
The registries themselves live next to the code they name and take their names from here:
:data:`MODEL_NAMES` (:mod:`hessian_blocks.models`), :data:`DATA_SOURCES` (:mod:`hessian_blocks.data`),
:data:`STRATEGIES` (:mod:`hessian_blocks.hvp`), the partitioner's :data:`METHODS`
(:mod:`hessian_blocks.partitions.coupling`) and its ``DEFAULT_*`` thresholds
(:mod:`hessian_blocks.partitions.decide`).
"""

from __future__ import annotations

__all__ = [
    "AUTO_DTYPE", "DATA_SOURCES", "DEFAULT_CONTRAST", "DEFAULT_MASS_THRESHOLD", "DEFAULT_MAX_RUNS",
    "DEFAULT_MAX_SPREAD", "DEFAULT_THRESHOLD", "DENSE_MAX", "MAX_SLICES", "METHODS", "MODEL_NAMES", "STRATEGIES",
]

MODEL_NAMES: tuple[str, ...] = ("gpt2-nano", "bert-mini", "vit-tiny", "resnet18", "vgg16", "mlp", "mlp-mixer")
"""The bundled models, in the order of the zoo's registry."""

DATA_SOURCES: tuple[str, ...] = ("digits", "text", "synthetic")
"""The offline data sources (besides ``auto`` and data files)."""

STRATEGIES: tuple[str, ...] = ("auto", "loop", "vmap")
"""How block Hessian-vector products are computed."""

AUTO_DTYPE: dict[str, str] = {"cuda": "float32", "cpu": "float64"}
"""The precision of the Hessian-vector products that ``auto`` picks on each device type: float32 on CUDA
(the Lanczos recurrences stay in float64; JS0 and every block's extreme eigenvalues stay within the SLQ
sampling error of a float64 run, tested on CPU), float64 on the CPU (the committed results' precision)."""

# the Hessian-derived partitioner's decision thresholds (see hessian_blocks.partitions.decide)
DEFAULT_THRESHOLD = 0.5
DEFAULT_MASS_THRESHOLD = 0.2
DEFAULT_CONTRAST = 4.0
DEFAULT_MAX_RUNS = 2
DEFAULT_MAX_SPREAD = 10.0
METHODS: tuple[str, ...] = ("auto", "dense", "probes")
"""How the partitioner measures a tensor's slice couplings (``auto``: dense when small or no dearer)."""
DENSE_MAX = 256
"""Tensors up to this many entries are measured densely (exact); larger ones when dense is no dearer."""
MAX_SLICES = 32
"""Axes with more slices are measured on a regular sample of them (every 2nd, 4th or 8th slice) plus
the slices of the first stride; 0: every slice of every axis."""
