"""How strongly the slices of a parameter tensor are coupled through the Hessian.

For a parameter tensor W and an axis a of length n, cut W into its n slices along a (rows,
columns, tokens, ...). The within-tensor Hessian H = d^2 L / dW^2 then falls into n x n sub-blocks
H_ij (slice i against slice j), and the *slice coupling* of the axis is the matrix of their
Frobenius masses

    C_ij = ||H_ij||_F^2.

A Hessian that is block-diagonal along the axis (one block per head, per neuron, per token) has
C zero outside the diagonal blocks. :func:`measure_coupling` measures C for every axis of every
selected tensor with exact Hessian-vector products of one :class:`~hessian_blocks.hvp.BlockHessian`
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
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..blocks import Rule
from ..choices import DENSE_MAX, MAX_SLICES, METHODS
from ..hvp import BlockHessian

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
VECTOR_BUDGET = 1 << 24  # entries of one chunk of probe vectors ([vectors, selected coordinates])
STRIDES = (2, 4, 8)      # sampling strides: head sizes, fused runs and stacked parts are multiples of 8


@dataclass(frozen=True, eq=False)
class TensorCoupling:
    """Measured slice couplings of one parameter tensor.

    ``axes[a]`` holds rows of the [n_a, n_a] matrix C of squared Frobenius masses between slices
    along axis ``a`` (only axes longer than 1): the rows of the measured slices ``slices[a]``
    against every slice ([sampled, n_a]; every row, the square C, when the axis is not sampled).
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
    axes: dict[int, np.ndarray]
    products: int
    hessian: np.ndarray | None = None
    samples: dict[int, np.ndarray] = field(default_factory=dict)
    slices: dict[int, np.ndarray] = field(default_factory=dict)
    strides: dict[int, int] = field(default_factory=dict)
    resampled: bool = False

    @property
    def probes(self) -> int:
        """Probes per slice behind the estimate (0: measured densely, exact)."""
        return next((len(s) for s in self.samples.values()), 0)

    def measured(self, axis: int) -> np.ndarray:
        """Indices of the slices measured along ``axis`` (the rows of ``axes[axis]``)."""
        return self.slices.get(axis, np.arange(self.shape[axis]))

    def stride(self, axis: int) -> int:
        """Sampling stride along ``axis`` (1: every slice measured)."""
        return self.strides.get(axis, 1)

    def regular(self, axis: int) -> np.ndarray:
        """Every ``stride(axis)``-th slice: the sample a sampled axis is decided on (every slice if not sampled)."""
        return np.arange(0, self.shape[axis], self.stride(axis))

    def rows(self, axis: int, slices: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
        """[len(slices), n]: C between the given measured slices and every slice (of ``matrix``,
        default ``axes[axis]``)."""
        matrix = self.axes[axis] if matrix is None else matrix
        return matrix[np.searchsorted(self.measured(axis), slices)]

    def principal(self, axis: int, slices: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
        """[len(slices), len(slices)]: C between the given measured slices."""
        return self.rows(axis, slices, matrix)[:, slices]

    def standard_error(self, axis: int) -> np.ndarray:
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
            on every slice.
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

    def first_round(name: str, limit: int) -> _DenseJob | _ProbeJob:
        chosen, _ = _plan(shapes[name], method, probes, dense_max, limit)
        sampling = {axis: sampled_slices(n, limit) for axis, n in enumerate(shapes[name]) if n > 1}
        if chosen == "dense":
            return _DenseJob(name, shapes[name], sampling if len(shapes[name]) == 1 else {})
        return _ProbeJob(name, shapes[name], probes, seed, 0, sampling)

    jobs = [first_round(name, max_slices) for name in names]
    _run(hessian, jobs, progress)
    results = {job.name: job.result() for job in jobs}
    again = [name for name in names if results[name].strides and resample is not None and resample(results[name])]
    if again:
        jobs = [first_round(name, 0) for name in again]
        _run(hessian, jobs, progress)
        for job in jobs:
            again = job.result()
            results[job.name] = replace(again, resampled=True, products=results[job.name].products + again.products)
    for round_ in range(1, max_probes):
        more = [name for name in names if results[name].method == "probes" and results[name].probes < max_probes
                and refine is not None and refine(results[name])]
        if not more:
            break
        jobs = [_ProbeJob(name, shapes[name], min(results[name].probes, max_probes - results[name].probes),
                          seed, round_, {axis: (results[name].measured(axis), results[name].stride(axis))
                                         for axis in results[name].axes})
                for name in more]
        _run(hessian, jobs, progress)
        for job in jobs:
            results[job.name] = job.merged(results[job.name])
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
                "axes": sorted(c.axes), "strides": {str(a): s for a, s in c.strides.items()},
                "resampled": c.resampled} for c in couplings.values()]
    header = json.dumps({"format": "hessian-blocks/couplings", "settings": settings or {}, "tensors": tensors})
    arrays = {f"t{i}_axis{axis}": c.axes[axis] for i, c in enumerate(couplings.values()) for axis in c.axes}
    arrays.update({f"t{i}_axis{axis}_samples": s
                   for i, c in enumerate(couplings.values()) for axis, s in c.samples.items()})
    arrays.update({f"t{i}_axis{axis}_slices": s
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
        return {
            entry["param"]: TensorCoupling(
                entry["param"], tuple(entry["shape"]), entry["method"],
                {axis: data[f"t{i}_axis{axis}"] for axis in entry["axes"]}, entry["products"],
                samples={axis: data[f"t{i}_axis{axis}_samples"]
                         for axis in entry["axes"] if f"t{i}_axis{axis}_samples" in data},
                slices={axis: data[f"t{i}_axis{axis}_slices"]
                        for axis in entry["axes"] if f"t{i}_axis{axis}_slices" in data},
                strides={int(a): s for a, s in entry.get("strides", {}).items()},
                resampled=entry.get("resampled", False))
            for i, entry in enumerate(header["tensors"])
        }


def _plan(shape: tuple[int, ...], method: str, probes: int, dense_max: int, max_slices: int) -> tuple[str, int]:
    """(method, products of the first round) for a tensor of ``shape``."""
    numel = int(np.prod(shape))
    sampled = [len(sampled_slices(n, max_slices)[0]) for n in shape if n > 1]
    probe_cost = probes * sum(sampled)
    dense_cost = sampled[0] if len(shape) == 1 and sampled else numel  # 1-D: one unit vector per measured entry
    if method == "auto":
        method = "dense" if len(shape) == 1 or numel <= max(dense_max, probe_cost) else "probes"
    return method, dense_cost if method == "dense" else probe_cost


def _symmetric_between_measured(rows: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """``rows`` ([..., sampled, n]) with the block between measured slices symmetrised (H is symmetric)."""
    rows = rows.copy()
    block = rows[..., measured]
    rows[..., measured] = (block + np.swapaxes(block, -1, -2)) / 2
    return rows


class _DenseJob:
    """Unit vectors of one tensor (of the measured entries of a sampled 1-D tensor); their products
    are columns of its Hessian."""

    def __init__(self, name: str, shape: tuple[int, ...], sampling: dict[int, tuple[np.ndarray, int]]):
        self.name, self.shape = name, shape
        self.numel = int(np.prod(shape))
        self.sampling = {axis: chosen for axis, chosen in sampling.items() if chosen[1] > 1}
        self.entries = self.sampling[0][0] if self.sampling else np.arange(self.numel)
        self.count = len(self.entries)
        self.matrix = np.empty((self.count, self.numel))

    def vectors(self, start: int, stop: int) -> torch.Tensor:
        unit = torch.zeros(stop - start, self.numel, dtype=torch.float64)
        unit[torch.arange(stop - start), torch.as_tensor(self.entries[start:stop])] = 1.0
        return unit

    def take(self, start: int, stop: int, products: torch.Tensor) -> None:
        self.matrix[start:stop] = products.numpy()

    def result(self) -> TensorCoupling:
        matrix = _symmetric_between_measured(self.matrix, self.entries)
        if self.sampling:  # 1-D: the slices are the entries, C_ij = H_ij^2
            return TensorCoupling(self.name, self.shape, "dense", {0: matrix ** 2}, self.count,
                                  slices={0: self.entries}, strides={0: self.sampling[0][1]})
        axes = {axis: slice_coupling(matrix, self.shape, axis) for axis, n in enumerate(self.shape) if n > 1}
        return TensorCoupling(self.name, self.shape, "dense", axes, self.numel, matrix)


class _ProbeJob:
    """``probes`` Rademacher vectors per measured slice of every axis of one tensor, ordered (axis,
    probe, slice)."""

    def __init__(self, name: str, shape: tuple[int, ...], probes: int, seed: int, round_: int,
                 sampling: dict[int, tuple[np.ndarray, int]]):
        self.name, self.shape, self.probes = name, shape, probes
        self.numel = int(np.prod(shape))
        self.axes = [axis for axis, n in enumerate(shape) if n > 1]
        self.measured = {axis: np.asarray(sampling[axis][0]) for axis in self.axes}
        self.strides = {axis: sampling[axis][1] for axis in self.axes if sampling[axis][1] > 1}
        self.offsets = np.cumsum([0] + [probes * len(self.measured[axis]) for axis in self.axes])
        self.count = int(self.offsets[-1])
        self.signs = {}
        for axis in self.axes:  # each tensor's probes depend on the seed, its name, the axis and the round only
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [seed, zlib.crc32(name.encode()), axis, round_]).generate_state(1)[0]))
            signs = torch.randint(0, 2, (probes, *shape), generator=generator, dtype=torch.int8).double() * 2 - 1
            self.signs[axis] = signs.movedim(axis + 1, 1)                               # [probes, n, rest...]
        self.samples = {axis: np.zeros((probes, len(self.measured[axis]), shape[axis])) for axis in self.axes}

    def _pieces(self, start: int, stop: int) -> Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray, int, int]]:
        """(axis, probe ids, row ids, slice ids, from, to) of the jobs start:stop, one piece per axis."""
        for k, axis in enumerate(self.axes):
            lo, hi = max(start, self.offsets[k]), min(stop, self.offsets[k + 1])
            if lo < hi:
                probe, row = np.divmod(np.arange(lo, hi) - self.offsets[k], len(self.measured[axis]))
                yield axis, probe, row, self.measured[axis][row], lo - start, hi - start

    def vectors(self, start: int, stop: int) -> torch.Tensor:
        out = torch.zeros(stop - start, self.numel, dtype=torch.float64)
        for axis, probe, _, index, lo, hi in self._pieces(start, stop):
            signs = self.signs[axis]
            vectors = torch.zeros(hi - lo, *signs.shape[1:], dtype=torch.float64)         # [jobs, n, rest...]
            rows = torch.arange(hi - lo)
            vectors[rows, torch.as_tensor(index)] = signs[torch.as_tensor(probe), torch.as_tensor(index)]
            out[lo:hi] = vectors.movedim(1, axis + 1).reshape(hi - lo, self.numel)
        return out

    def take(self, start: int, stop: int, products: torch.Tensor) -> None:
        for axis, probe, row, _, lo, hi in self._pieces(start, stop):
            n = self.shape[axis]
            part = products[lo:hi].reshape(hi - lo, *self.shape).movedim(axis + 1, 1).reshape(hi - lo, n, -1)
            self.samples[axis][probe, row] = part.pow(2).sum(-1).numpy()                # row i ~ ||H_ji||_F^2 over j

    def result(self) -> TensorCoupling:
        samples = {axis: _symmetric_between_measured(s, self.measured[axis]) for axis, s in self.samples.items()}
        return TensorCoupling(self.name, self.shape, "probes", {a: s.mean(0) for a, s in samples.items()}, self.count,
                              samples=samples, slices={a: self.measured[a] for a in self.strides},
                              strides=dict(self.strides))

    def merged(self, before: TensorCoupling) -> TensorCoupling:
        """The earlier rounds' estimate with this round's probes added."""
        new = self.result()
        samples = {axis: np.concatenate([before.samples[axis], new.samples[axis]]) for axis in self.axes}
        return replace(before, axes={a: s.mean(0) for a, s in samples.items()}, samples=samples,
                       products=before.products + new.products)


def _run(hessian: BlockHessian, jobs: list, progress: Callable[[int], None] | None) -> None:
    """All jobs' products: row r of a chunk carries job r of every tensor, each in its own block."""
    layout = hessian.layout
    spans = {block.param: layout.block_range(b) for b, block in enumerate(layout.blocks)}
    rows = max(1, VECTOR_BUDGET // layout.size)
    for start in range(0, max(job.count for job in jobs), rows):
        active = [job for job in jobs if job.count > start]
        stop = min(start + rows, max(job.count for job in active))
        vectors = torch.zeros(stop - start, layout.size, dtype=torch.float64)
        for job in active:
            vectors[: min(stop, job.count) - start, spans[job.name]] = job.vectors(start, min(stop, job.count))
        products = hessian.block_matvec(vectors.to(hessian.device, hessian.dtype)).double().cpu()
        for job in active:
            job.take(start, min(stop, job.count), products[: min(stop, job.count) - start, spans[job.name]])
        if progress is not None:
            progress(sum(min(stop, job.count) - start for job in active))


__all__ = ["DENSE_MAX", "MAX_SLICES", "METHODS", "TensorCoupling", "load_couplings", "measure_coupling",
           "planned_products", "sampled_slices", "save_couplings", "slice_coupling"]
