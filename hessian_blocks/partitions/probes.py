"""The Hessian-vector products that measure slice couplings (:mod:`.coupling`): one job per tensor.

A :class:`DenseJob` is the unit vectors of a tensor (its products are columns of its Hessian); a
:class:`ProbeJob` is ``probes`` Rademacher vectors per measured slice of every axis of a tensor (a merged
run of axes is one axis of the tensor viewed with those axes merged), each supported on that slice.
:func:`run_jobs` runs many tensors' jobs at once: row r of a chunk of vectors carries job r of every
tensor, each in its own block of one block-diagonal :class:`~hessian_blocks.hvp.BlockHessian`.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Callable, Iterable

import numpy as np
import torch

from ..blocks import Axis
from ..hvp import BlockHessian
from .coupling import TensorCoupling, axis_order, measured_axes, merged_view, slice_coupling

__all__ = ["VECTOR_BUDGET", "DenseJob", "ProbeJob", "run_jobs"]

VECTOR_BUDGET = 1 << 24  # entries of one chunk of probe vectors ([vectors, selected coordinates])


def _symmetric_between_measured(rows: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """``rows`` ([..., sampled, n]) with the block between measured slices symmetrised (H is symmetric)."""
    rows = rows.copy()
    block = rows[..., measured]
    rows[..., measured] = (block + np.swapaxes(block, -1, -2)) / 2
    return rows


class DenseJob:
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
        axes = {axis: slice_coupling(matrix, *merged_view(self.shape, axis)) for axis in measured_axes(self.shape)}
        return TensorCoupling(self.name, self.shape, "dense", axes, self.numel, matrix)


class ProbeJob:
    """``probes`` Rademacher vectors per measured slice of every axis of one tensor, ordered (axis,
    probe, slice)."""

    def __init__(self, name: str, shape: tuple[int, ...], probes: int, seed: int, round_: int,
                 sampling: dict[Axis, tuple[np.ndarray, int]]):
        self.name, self.shape, self.probes = name, shape, probes
        self.numel = int(np.prod(shape))
        self.axes = measured_axes(shape)
        self.views = {axis: merged_view(shape, axis) for axis in self.axes}  # the shape with the axis as one
        self.measured = {axis: np.asarray(sampling[axis][0]) for axis in self.axes}
        self.strides = {axis: sampling[axis][1] for axis in self.axes if sampling[axis][1] > 1}
        self.offsets = np.cumsum([0] + [probes * len(self.measured[axis]) for axis in self.axes])
        self.count = int(self.offsets[-1])
        self.signs = {}
        for axis in self.axes:  # each tensor's probes depend on the seed, its name, the axis and the round only
            view, at = self.views[axis]
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [seed, zlib.crc32(name.encode()), *axis_order(axis), round_]).generate_state(1)[0]))
            signs = torch.randint(0, 2, (probes, *view), generator=generator, dtype=torch.int8).double() * 2 - 1
            self.signs[axis] = signs.movedim(at + 1, 1)                                 # [probes, n, rest...]
        self.samples = {axis: np.zeros((probes, len(self.measured[axis]), self.views[axis][0][self.views[axis][1]]))
                        for axis in self.axes}

    def _pieces(self, start: int, stop: int) -> Iterable[tuple[Axis, np.ndarray, np.ndarray, np.ndarray, int, int]]:
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
            out[lo:hi] = vectors.movedim(1, self.views[axis][1] + 1).reshape(hi - lo, self.numel)
        return out

    def take(self, start: int, stop: int, products: torch.Tensor) -> None:
        for axis, probe, row, _, lo, hi in self._pieces(start, stop):
            view, at = self.views[axis]
            part = products[lo:hi].reshape(hi - lo, *view).movedim(at + 1, 1).reshape(hi - lo, view[at], -1)
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


def run_jobs(hessian: BlockHessian, jobs: list, progress: Callable[[int], None] | None) -> None:
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
