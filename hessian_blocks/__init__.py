"""hessian-blocks: blockwise Hessian spectra (SLQ), block heterogeneity, and block partitions.

The engine in a few names::

    from hessian_blocks import BlockHessian, Partition, block_spectra, build_model, make_batches

    spec = build_model("gpt2-nano")
    hessian = BlockHessian(spec.model, spec.loss_fn, make_batches(spec), Partition.per_tensor(spec.model))
    spectrum = block_spectra(hessian, steps=100, probes=10)     # SpectrumResult
    density = spectrum.density()                                  # DensityResult on a common grid
"""

from .blocks import Block, Partition, PartitionFileError, Rule, sample_layers, select_blocks
from .partitions import derive_partition
from .data import DATA_SOURCES, make_batches
from .guards import DataFaultError, HessianSetupError
from .hvp import STRATEGIES, BlockHessian
from .lanczos import LanczosResult, lanczos, make_probes
from .models import MODEL_NAMES, ModelSpec, build_model
from .results import BroadeningWarning, DensityResult, SpectrumResult
from .slq import block_spectra

__all__ = [
    "Block", "BlockHessian", "BroadeningWarning", "DATA_SOURCES", "DataFaultError", "DensityResult", "HessianSetupError",
    "LanczosResult", "MODEL_NAMES", "ModelSpec", "Partition", "PartitionFileError", "Rule", "STRATEGIES", "SpectrumResult", "block_spectra", "build_model", "lanczos",
    "make_batches", "make_probes", "sample_layers", "select_blocks", "derive_partition",
]
