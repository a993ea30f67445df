"""How strongly the slices of a parameter tensor are coupled through the Hessian.

For a parameter tensor W and an axis a of length n, cut W into its n slices along a (rows,
columns, tokens, ...). The within-tensor Hessian H = d^2 L / dW^2 then falls into n x n sub-blocks
H_ij (slice i against slice j), and the *slice coupling* of the axis is the matrix of their
Frobenius masses

    C_ij = ||H_ij||_F^2.

A Hessian that is block-diagonal along the axis (one block per head, per neuron, per token) has
C zero outside the diagonal blocks. :func:`measure_coupling` measures C for every axis of every
selected tensor with exact Hessian-vector products (:class:`~hessian_blocks.hvp.BlockHessian`, one
block per tensor, so every product is H_WW v):

* ``"dense"``: the whole H_WW, one product per coordinate (unit vectors); exact. Used when the
  tensor is small, or when it needs no more products than probing would.
* ``"probes"``: for each slice i, ``probes`` Rademacher vectors z supported on slice i; since
  E||(H z)_j||^2 = ||H_ji||_F^2, the mean over probes is an unbiased estimate of row i of C. The
  estimate is symmetrised ((C + C^T) / 2, as H is symmetric). Costs probes * (sum of the axis
  lengths) products instead of numel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..blocks import Rule
from ..hvp import BlockHessian

METHODS = ("auto", "dense", "probes")
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class TensorCoupling:
    """Measured slice couplings of one parameter tensor.

    ``axes[a]`` is the [n_a, n_a] matrix C of squared Frobenius masses between slices along axis
    ``a`` (only axes longer than 1). ``hessian`` is the dense within-tensor Hessian [numel, numel]
    (row-major flattening of the tensor) when ``method == "dense"``, else None.
    """

    param: str
    shape: tuple[int, ...]
    method: str
    axes: dict[int, np.ndarray]
    products: int
    hessian: np.ndarray | None = None


def measure_coupling(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, torch.Tensor]],
    params: Sequence[str] | None = None,
    *,
    method: str = "auto",
    probes: int = 4,
    dense_max: int = 1024,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    strategy: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> dict[str, TensorCoupling]:
    """Slice couplings of every trainable tensor of ``model`` (or of the named ``params``).

    Args:
        method: "dense", "probes", or "auto": dense when the tensor has at most ``dense_max``
            entries or when dense needs no more products than probing, probes otherwise.
        probes: Rademacher probes per slice for the probe estimate.
        dense_max: largest tensor (entries) measured densely by "auto".
        seed: seed of the probes.
        dtype, device, strategy: passed to :class:`BlockHessian`.
        progress: called with the number of Hessian-vector products done after each tensor.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    batches = list(batches)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    names = list(shapes) if params is None else list(params)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"{unknown} are not trainable parameters of {type(model).__name__}; it has "
                         f"{list(shapes)[:6]} ...")
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, TensorCoupling] = {}
    for index, name in enumerate(names):
        shape = shapes[name]
        block = Rule(name, "whole").resolve(shape)
        hessian = BlockHessian(model, loss_fn, batches, block, dtype=dtype, device=device, strategy=strategy,
                               check=index == 0)
        chosen = _choose_method(shape, method, probes, dense_max)
        if chosen == "dense":
            results[name] = _dense(hessian, name, shape)
        else:
            results[name] = _probed(hessian, name, shape, probes, generator)
        if progress is not None:
            progress(results[name].products)
    return results


def slice_coupling(tensor_hessian: np.ndarray, shape: Sequence[int], axis: int) -> np.ndarray:
    """C_ij = ||H_ij||_F^2 between slices along ``axis`` of a dense within-tensor Hessian.

    ``tensor_hessian`` is [numel, numel] over the row-major flattening of a tensor of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    full = np.asarray(tensor_hessian).reshape(shape + shape) ** 2
    # bring both copies of `axis` to the front, sum the squares over every other axis
    full = np.moveaxis(full, (axis, ndim + axis), (0, 1))
    return full.reshape(shape[axis], shape[axis], -1).sum(axis=2)


def save_couplings(couplings: dict[str, TensorCoupling], path: str | Path, settings: dict | None = None) -> None:
    """Write measured couplings to an ``.npz`` file (the slow part of deriving a partition).

    The slice-coupling matrices are kept; dense within-tensor Hessians are not (they can be large).
    ``settings`` (JSON values: the model, data, probes, ... the measurement was made with) are
    stored with them, so :func:`load_couplings` can refuse a file measured in another way.
    """
    tensors = [{"param": c.param, "shape": list(c.shape), "method": c.method, "products": c.products,
                "axes": sorted(c.axes)} for c in couplings.values()]
    header = json.dumps({"format": "hessian-blocks/couplings", "settings": settings or {}, "tensors": tensors})
    arrays = {f"t{i}_axis{axis}": c.axes[axis] for i, c in enumerate(couplings.values()) for axis in c.axes}
    np.savez_compressed(path, header=np.array(header), **arrays)


def load_couplings(path: str | Path, settings: dict | None = None) -> dict[str, TensorCoupling]:
    """Couplings written by :func:`save_couplings`, keyed by parameter name.

    With ``settings``, they must be the ones the file was written with (JSON-equal): otherwise a
    ``ValueError`` names the fields that differ.
    """
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"])) if "header" in data else {}
        if header.get("format") != "hessian-blocks/couplings":
            raise ValueError(f"{path} is not a couplings file written by save_couplings")
        if settings is not None:
            stored, wanted = header["settings"], json.loads(json.dumps(settings))
            differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
            if differ:
                changes = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
                raise ValueError(f"{path} was measured with other settings ({changes}); "
                                 f"delete it or give another path to measure again")
        return {
            entry["param"]: TensorCoupling(entry["param"], tuple(entry["shape"]), entry["method"],
                                           {axis: data[f"t{i}_axis{axis}"] for axis in entry["axes"]},
                                           entry["products"])
            for i, entry in enumerate(header["tensors"])
        }


def _choose_method(shape: tuple[int, ...], method: str, probes: int, dense_max: int) -> str:
    if method != "auto":
        return method
    numel = int(np.prod(shape))
    probe_cost = probes * sum(n for n in shape if n > 1)
    return "dense" if numel <= max(dense_max, probe_cost) else "probes"


def _chunks(count: int, numel: int, budget: int = 1 << 24) -> Iterable[tuple[int, int]]:
    """Ranges of ``count`` items whose [items, numel] vectors stay within ``budget`` entries."""
    step = max(1, budget // max(numel, 1))
    for start in range(0, count, step):
        yield start, min(start + step, count)


def _dense(hessian: BlockHessian, name: str, shape: tuple[int, ...]) -> TensorCoupling:
    numel = int(np.prod(shape))
    matrix = np.empty((numel, numel))
    for start, stop in _chunks(numel, numel):
        unit = torch.zeros(stop - start, numel, dtype=hessian.dtype, device=hessian.device)
        unit[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        matrix[start:stop] = hessian.block_matvec(unit).double().cpu().numpy()
    matrix = (matrix + matrix.T) / 2
    axes = {axis: slice_coupling(matrix, shape, axis) for axis, n in enumerate(shape) if n > 1}
    return TensorCoupling(name, shape, "dense", axes, numel, matrix)


def _probed(hessian: BlockHessian, name: str, shape: tuple[int, ...], probes: int,
            generator: torch.Generator) -> TensorCoupling:
    numel = int(np.prod(shape))
    axes, products = {}, 0
    for axis, n in enumerate(shape):
        if n <= 1:
            continue
        signs = torch.randint(0, 2, (probes, *shape), generator=generator, dtype=torch.int8).double() * 2 - 1
        signs = signs.movedim(axis + 1, 1)                                      # [probes, n, rest...]
        estimate = np.zeros((n, n))
        for start, stop in _chunks(n, probes * numel):
            width = stop - start
            mask = torch.zeros(width, n, dtype=torch.float64)
            mask[torch.arange(width), torch.arange(start, stop)] = 1.0
            vectors = signs.unsqueeze(1) * mask.reshape(1, width, n, *([1] * (len(shape) - 1)))  # [probes, i, n, rest]
            vectors = vectors.movedim(2, axis + 2).reshape(probes * width, numel)
            out = hessian.block_matvec(vectors.to(hessian.device, hessian.dtype)).double().cpu()
            out = out.reshape(probes, width, *shape).movedim(axis + 2, 2).reshape(probes, width, n, -1)
            estimate[start:stop] = out.pow(2).sum(-1).mean(0).numpy()           # [i, j] ~ ||H_ji||_F^2
        axes[axis] = (estimate + estimate.T) / 2
        products += probes * n
    return TensorCoupling(name, shape, "probes", axes, products)


__all__ = ["METHODS", "TensorCoupling", "load_couplings", "measure_coupling", "save_couplings", "slice_coupling"]
