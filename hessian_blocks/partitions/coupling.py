"""How strongly the slices of a parameter tensor are coupled through the Hessian.

For a parameter tensor W and an axis a of length n, cut W into its n slices along a (rows,
columns, tokens, ...). The within-tensor Hessian H = d^2 L / dW^2 then falls into n x n sub-blocks
H_ij (slice i against slice j), and the *slice coupling* of the axis is the matrix of their
Frobenius masses

    C_ij = ||H_ij||_F^2.

A Hessian that is block-diagonal along the axis (one block per head, per neuron, per token) has
C zero outside the diagonal blocks. An *axis* is one tensor axis or, for a 3-D tensor, its first
two axes merged (row-major: one slice per (expert, row) of ``[experts, rows, columns]``;
:func:`measured_axes`). :func:`measure_coupling` measures C for every axis of every selected tensor
with exact Hessian-vector products (the jobs of :mod:`.probes`) of one :class:`~hessian_blocks.hvp.BlockHessian`
holding every selected tensor as one block (one parameter copy, one graph per batch and chunk;
the product is block-diagonal, so a vector carries the probes of many tensors at once and each
tensor only sees its own part, H_WW v_W):

* ``"dense"``: the whole H_WW, one product per coordinate (unit vectors); exact. Used when the
  tensor is small, or when it needs no more products than probing would.
* ``"probes"``: for each slice i, Rademacher vectors z supported on slice i. Since
  E||(H z)_j||^2 = sum_kl E[z_k z_l] (H_ji)_:k . (H_ji)_:l = ||H_ji||_F^2, each probe gives an
  unbiased estimate of row i of C, exactly zero where H_ji is zero. Each probe's estimate is
  symmetrised ((C + C^T) / 2, as H is symmetric) and kept: the mean over probes is the estimate,
  and the spread between probes its standard error (sample variance / number of probes). Costs
  probes * (sum of the axis lengths) products instead of numel.

Estimators that give every slice pair from products of *full* random-sign vectors (z_i = s_i u_i
with independent signs per slice, so one product serves all slices) exist: with two independent
probes a, b, E[<y_i^a, y_i^b> <z_j^a, z_j^b>] = ||H_ij||_F^2 (y = H z). Their variance, though,
scales with the whole row mass of slice i rather than with C_ij: measured on the 2-layer test
GPT-2, 16 such products per tensor changed 11 of 25 weight decisions and 64 still changed 2, against
64-640 slice-supported products per tensor that change none. Slice-supported probes are used.

*Sampled slices.* An axis of more than ``max_slices`` slices is measured on a regular sample: every
s-th slice (s = 2, 4 or 8, the smallest dividing the axis that leaves at most ``max_slices``, else
8), which keeps every regular contiguous grouping whose groups and runs are multiples of s (heads of
a multiple of 8 rows, fused q|k|v, stacked gate|up) a regular grouping of the sample, plus the slices
0..s (the first stride and the next sampled slice), which show structure finer than the stride.
A probe on slice i gives row i of C against *every* slice, so the mass of any grouping of the full
axis is estimated from the sampled rows; relative couplings come from the sampled pairs. The
measured rows are ``axes[a]`` ([sampled, n], ``slices[a]`` their indices). When the first stride
shows structure that the sample cannot see, the tensor is measured again on every slice (``resample``).

With ``refine`` (see :func:`measure_coupling`) the probes are sequential: tensors whose decision is
not yet settled get more probes, round after round, up to ``max_probes`` per slice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..blocks import Axis, Rule
from ..choices import DENSE_MAX, MAX_SLICES, METHODS
from ..hvp import BlockHessian

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
STRIDES = (2, 4, 8)      # sampling strides: head sizes, fused runs and stacked parts are multiples of 8


@dataclass(frozen=True, eq=False)
class TensorCoupling:
    """Measured slice couplings of one parameter tensor.

    ``axes[a]`` holds rows of the [n_a, n_a] matrix C of squared Frobenius masses between slices
    along axis ``a`` (only axes longer than 1; a tuple: a merged run, see :func:`measured_axes`): the
    rows of the measured slices ``slices[a]`` against every slice ([sampled, n_a]; every row, the
    square C, when the axis is not sampled).
    Exact for ``method == "dense"``, else the mean of the per-probe estimates ``samples[a]``
    ([probes, sampled, n_a], symmetric between measured slices). ``strides[a]`` is the sampling
    stride (absent: every slice measured). ``hessian`` is the dense within-tensor Hessian [numel,
    numel] (row-major flattening of the tensor) when it was measured whole, else None. ``products``
    counts the Hessian-vector products spent; ``resampled`` says that a sample of slices missed
    structure and every slice was measured again.
    """

    param: str
    shape: tuple[int, ...]
    method: str
    axes: dict[Axis, np.ndarray]
    products: int
    hessian: np.ndarray | None = None
    samples: dict[Axis, np.ndarray] = field(default_factory=dict)
    slices: dict[Axis, np.ndarray] = field(default_factory=dict)
    strides: dict[Axis, int] = field(default_factory=dict)
    resampled: bool = False

    @property
    def probes(self) -> int:
        """Probes per slice behind the estimate (0: measured densely, exact)."""
        return next((len(s) for s in self.samples.values()), 0)

    def length(self, axis: Axis) -> int:
        """Number of slices along ``axis`` (a merged run: the product of its axes' lengths)."""
        view, at = merged_view(self.shape, axis)
        return view[at]

    def measured(self, axis: Axis) -> np.ndarray:
        """Indices of the slices measured along ``axis`` (the rows of ``axes[axis]``)."""
        return self.slices.get(axis, np.arange(self.length(axis)))

    def stride(self, axis: Axis) -> int:
        """Sampling stride along ``axis`` (1: every slice measured)."""
        return self.strides.get(axis, 1)

    def regular(self, axis: Axis) -> np.ndarray:
        """Every ``stride(axis)``-th slice: the sample a sampled axis is decided on (every slice if not sampled)."""
        return np.arange(0, self.length(axis), self.stride(axis))

    def rows(self, axis: Axis, slices: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
        """[len(slices), n]: C between the given measured slices and every slice (of ``matrix``,
        default ``axes[axis]``)."""
        matrix = self.axes[axis] if matrix is None else matrix
        return matrix[np.searchsorted(self.measured(axis), slices)]

    def principal(self, axis: Axis, slices: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
        """[len(slices), len(slices)]: C between the given measured slices."""
        return self.rows(axis, slices, matrix)[:, slices]

    def standard_error(self, axis: Axis) -> np.ndarray:
        """Standard error of ``axes[axis]``: sqrt(sample variance / probes); zeros when exact."""
        samples = self.samples.get(axis)
        if samples is None or len(samples) < 2:
            return np.zeros_like(self.axes[axis])
        return samples.std(axis=0, ddof=1) / np.sqrt(len(samples))

    def leave_one_out(self) -> list[TensorCoupling]:
        """The estimates without one probe each (jackknife replicates; empty below 2 probes)."""
        if self.probes < 2:
            return []
        count = self.probes
        return [replace(self, axes={a: (s.sum(0) - s[k]) / (count - 1) for a, s in self.samples.items()}, samples={})
                for k in range(count)]


def measured_axes(shape: Sequence[int]) -> list[Axis]:
    """The axes measured on a tensor of ``shape``: every axis longer than 1, and for a 3-D tensor whose first
    two axes are both longer than 1 those two merged, ``(0, 1)`` (one slice per (expert, row) of
    ``[experts, rows, columns]``: the rule ``"axis": [0, 1]``)."""
    axes: list[Axis] = [axis for axis, n in enumerate(shape) if n > 1]
    if len(shape) == 3 and shape[0] > 1 and shape[1] > 1:
        axes.append((0, 1))
    return axes


def merged_view(shape: Sequence[int], axis: Axis) -> tuple[tuple[int, ...], int]:
    """``shape`` with a merged run of axes as one axis (row-major), and that axis' position; one axis: as it is."""
    shape = tuple(int(n) for n in shape)
    if isinstance(axis, int):
        return shape, axis
    first, last = axis[0], axis[-1]
    return shape[:first] + (math.prod(shape[first : last + 1]),) + shape[last + 1 :], first


def axis_order(axis: Axis) -> tuple[int, ...]:
    """Sort key of axes: 0, (0, 1), 1, 2 (one axis before the runs it starts)."""
    return (axis,) if isinstance(axis, int) else tuple(axis)


def sampled_slices(n: int, max_slices: int = MAX_SLICES) -> tuple[np.ndarray, int]:
    """The slices measured along an axis of ``n`` slices, and the sampling stride (see the module
    docstring): every slice when ``n <= max_slices`` (or ``max_slices`` is 0, or no stride divides
    ``n``), else every s-th slice and the slices 0..s."""
    strides = [s for s in STRIDES if n % s == 0]
    if not max_slices or n <= max_slices or not strides:
        return np.arange(n), 1
    stride = next((s for s in strides if n // s <= max_slices), strides[-1])
    return np.union1d(np.arange(0, n, stride), np.arange(stride + 1)), stride


def planned_products(shape: Sequence[int], method: str = "auto", probes: int = 2, dense_max: int = DENSE_MAX,
                     max_slices: int = MAX_SLICES) -> int:
    """Hessian-vector products :func:`measure_coupling` spends on a tensor of ``shape`` in its first
    round (refining and measuring a sample's tensor again on every slice can add to them)."""
    shape = tuple(int(n) for n in shape)
    return _plan(shape, method, probes, dense_max, max_slices)[1]


def measure_coupling(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, torch.Tensor]],
    params: Sequence[str] | None = None,
    *,
    method: str = "auto",
    probes: int = 2,
    max_probes: int | None = None,
    refine: Callable[[TensorCoupling], bool] | None = None,
    dense_max: int = DENSE_MAX,
    max_slices: int = MAX_SLICES,
    resample: Callable[[TensorCoupling], bool] | None = None,
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
        probes: Rademacher probes per slice for the probe estimate (at least 2 give a standard
            error).
        max_probes: most probes per slice when refining (default: ``probes``, no refinement).
        refine: after each round, ``refine(coupling)`` says whether a probed tensor needs more
            probes (its decision is not settled); those tensors get as many probes again (at most
            ``max_probes``) in the next round, all of them batched together.
        dense_max: largest tensor (entries) measured densely by "auto" (1-D tensors always are:
            one unit vector per measured entry).
        max_slices: axes with more slices are measured on a regular sample of them (see the
            module docstring); 0: every slice.
        resample: after the first round, ``resample(coupling)`` says whether a sampled tensor's
            first stride shows structure the sample cannot see; those tensors are measured again
            on every slice. Asked again after the refining rounds: a tensor that more probes
            showed it for is measured again on every slice and refined again.
        seed: seed of the probes; each tensor's probes depend only on the seed, its name and the
            round, so measuring a subset of the tensors gives them the same numbers.
        dtype, device, strategy: passed to :class:`BlockHessian`.
        progress: called with the number of Hessian-vector products done after each chunk.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if max_slices < 0:
        raise ValueError(f"max_slices must be >= 0 (0: every slice), got {max_slices}")
    max_probes = probes if max_probes is None else max_probes
    if max_probes < probes:
        raise ValueError(f"max_probes ({max_probes}) must be at least probes ({probes})")
    batches = list(batches)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    names = list(shapes) if params is None else list(params)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"{unknown} are not trainable parameters of {type(model).__name__}; "
                         f"it has {list(shapes)[:6]} ...")
    if not names:
        return {}
    blocks = [Rule(name, "whole").resolve(shapes[name])[0] for name in names]
    hessian = BlockHessian(model, loss_fn, batches, blocks, dtype=dtype, device=device, strategy=strategy)

    from .probes import DenseJob, ProbeJob, run_jobs  # (the jobs build this module's TensorCoupling)

    def first_round(name: str, limit: int) -> DenseJob | ProbeJob:
        chosen, _ = _plan(shapes[name], method, probes, dense_max, limit)
        sampling = {axis: sampled_slices(_length(shapes[name], axis), limit) for axis in measured_axes(shapes[name])}
        if chosen == "dense":
            return DenseJob(name, shapes[name], sampling if len(shapes[name]) == 1 else {})
        return ProbeJob(name, shapes[name], probes, seed, 0, sampling)

    def every_slice(again: list[str]) -> None:
        if not again:
            return
        jobs = [first_round(name, 0) for name in again]
        run_jobs(hessian, jobs, progress)
        for job in jobs:
            again = job.result()
            results[job.name] = replace(again, resampled=True, products=results[job.name].products + again.products)

    def more_probes(names: list[str]) -> None:
        for round_ in range(1, max_probes):
            more = [name for name in names if results[name].method == "probes" and results[name].probes < max_probes
                    and refine is not None and refine(results[name])]
            if not more:
                return
            jobs = [ProbeJob(name, shapes[name], min(results[name].probes, max_probes - results[name].probes),
                              seed, round_, {axis: (results[name].measured(axis), results[name].stride(axis))
                                             for axis in results[name].axes})
                    for name in more]
            run_jobs(hessian, jobs, progress)
            for job in jobs:
                results[job.name] = job.merged(results[job.name])

    def to_resample(names: list[str]) -> list[str]:
        return [name for name in names if results[name].strides and not results[name].resampled
                and resample is not None and resample(results[name])]

    jobs = [first_round(name, max_slices) for name in names]
    run_jobs(hessian, jobs, progress)
    results = {job.name: job.result() for job in jobs}
    every_slice(to_resample(names))
    more_probes(names)
    late = to_resample(names)   # finer structure that only more probes showed
    every_slice(late)
    more_probes(late)
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

    The slice-coupling matrices and the per-probe estimates (for standard errors and the stability
    check) are kept; dense within-tensor Hessians are not (they can be large).
    ``settings`` (JSON values: the model, data, probes, ... the measurement was made with) are
    stored with them, so :func:`load_couplings` can refuse a file measured in another way.
    """
    tensors = [{"param": c.param, "shape": list(c.shape), "method": c.method, "products": c.products,
                "axes": [a if isinstance(a, int) else list(a) for a in sorted(c.axes, key=axis_order)],
                "strides": {_text(a): s for a, s in c.strides.items()}, "resampled": c.resampled}
               for c in couplings.values()]
    header = json.dumps({"format": "hessian-blocks/couplings", "settings": settings or {}, "tensors": tensors})
    arrays = {f"t{i}_axis{_text(axis)}": c.axes[axis] for i, c in enumerate(couplings.values()) for axis in c.axes}
    arrays.update({f"t{i}_axis{_text(axis)}_samples": s
                   for i, c in enumerate(couplings.values()) for axis, s in c.samples.items()})
    arrays.update({f"t{i}_axis{_text(axis)}_slices": s
                   for i, c in enumerate(couplings.values()) for axis, s in c.slices.items()})
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
        out = {}
        for i, entry in enumerate(header["tensors"]):
            axes = [a if isinstance(a, int) else tuple(a) for a in entry["axes"]]
            arrays = {kind: {a: data[f"t{i}_axis{_text(a)}{kind}"] for a in axes
                             if f"t{i}_axis{_text(a)}{kind}" in data} for kind in ("", "_samples", "_slices")}
            out[entry["param"]] = TensorCoupling(
                entry["param"], tuple(entry["shape"]), entry["method"], arrays[""], entry["products"],
                samples=arrays["_samples"], slices=arrays["_slices"],
                strides={_parse(a): s for a, s in entry.get("strides", {}).items()},
                resampled=entry.get("resampled", False))
        return out


def _length(shape: Sequence[int], axis: Axis) -> int:
    view, at = merged_view(shape, axis)
    return view[at]


def _text(axis: Axis) -> str:
    """An axis in a couplings file's array names: ``0``, or ``0-1`` for a merged run."""
    return str(axis) if isinstance(axis, int) else "-".join(map(str, axis))


def _parse(text: str) -> Axis:
    return int(text) if "-" not in text else tuple(int(a) for a in text.split("-"))


def _plan(shape: tuple[int, ...], method: str, probes: int, dense_max: int, max_slices: int) -> tuple[str, int]:
    """(method, products of the first round) for a tensor of ``shape``."""
    numel = int(np.prod(shape))
    sampled = [len(sampled_slices(_length(shape, axis), max_slices)[0]) for axis in measured_axes(shape)]
    probe_cost = probes * sum(sampled)
    dense_cost = sampled[0] if len(shape) == 1 and sampled else numel  # 1-D: one unit vector per measured entry
    if method == "auto":
        method = "dense" if len(shape) == 1 or numel <= max(dense_max, probe_cost) else "probes"
    return method, dense_cost if method == "dense" else probe_cost


__all__ = ["DENSE_MAX", "MAX_SLICES", "METHODS", "TensorCoupling", "axis_order", "load_couplings", "measure_coupling",
           "measured_axes", "merged_view", "planned_products", "sampled_slices", "save_couplings", "slice_coupling"]
