"""hessian-blocks: blockwise Hessian spectra (SLQ), block heterogeneity, and block partitions.

The engine in a few names::

    from hessian_blocks import BlockHessian, Partition, block_spectra, build_model, make_batches

    spec = build_model("gpt2-nano")
    hessian = BlockHessian(spec.model, spec.loss_fn, make_batches(spec), Partition.per_tensor(spec.model))
    spectrum = block_spectra(hessian, steps=100, probes=10)     # SpectrumResult
    density = spectrum.density()                                  # DensityResult on a common grid

The names load on first use (``import hessian_blocks`` imports no torch), so that the command line
answers ``--help`` at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .choices import DATA_SOURCES, MODEL_NAMES, STRATEGIES
from .lazy import lazy_exports

__all__ = [
    "Block", "BlockHessian", "BroadeningWarning", "DATA_SOURCES", "DataFaultError", "DensityResult",
    "HessianSetupError", "LanczosResult", "MODEL_NAMES", "ModelSpec", "Partition", "PartitionFileError",
    "PrecisionWarning", "Rule", "STRATEGIES", "SpectrumResult", "block_spectra", "build_model", "make_batches",
    "make_probes", "sample_layers", "select_blocks", "derive_partition",
]

_EXPORTS = {
    **dict.fromkeys(("Block", "Partition", "PartitionFileError", "Rule", "sample_layers", "select_blocks"), ".blocks"),
    "derive_partition": ".partitions",
    "make_batches": ".data",
    **dict.fromkeys(("DataFaultError", "HessianSetupError", "PrecisionWarning"), ".guards"),
    "BlockHessian": ".hvp",
    **dict.fromkeys(("LanczosResult", "make_probes"), ".lanczos"),
    **dict.fromkeys(("ModelSpec", "build_model"), ".models"),
    **dict.fromkeys(("BroadeningWarning", "DensityResult", "SpectrumResult"), ".results"),
    "block_spectra": ".slq",
}
lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see
    from .blocks import Block, Partition, PartitionFileError, Rule, sample_layers, select_blocks
    from .data import make_batches
    from .guards import DataFaultError, HessianSetupError, PrecisionWarning
    from .hvp import BlockHessian
    from .lanczos import LanczosResult, make_probes
    from .models import ModelSpec, build_model
    from .partitions import derive_partition
    from .results import BroadeningWarning, DensityResult, SpectrumResult
    from .slq import block_spectra
