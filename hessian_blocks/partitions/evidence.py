"""What one axis of a measured tensor says: relative couplings between groups of slices, diagonal norms, masses.

The measurement (:mod:`~hessian_blocks.partitions.coupling`) gives, for each axis of a tensor, rows of
the slice-coupling matrix C_ij = ||H_ij||_F^2. The decision works with the *relative coupling*
K_ij = C_ij / sqrt(C_ii C_jj), the mass between two slices against the mass of their own diagonal
blocks (0 where a slice has no mass: no evidence of coupling). Between groups of slices it is the
mass-weighted mean of K (sum of C_ij over sum of sqrt(C_ii C_jj), :class:`SliceCoupling`): slices
with little mass have small diagonal entries and noisy, heavy-tailed K, and weighting keeps them from
deciding for the others. A link (two neighbouring groups) couples at most 1 (full coupling; K > 1
happens where the Hessian is indefinite with a weak diagonal).

An axis measured on a sample of its slices (every s-th slice) is decided on the sample's coupling
matrix; its masses come from the sampled rows of C against *every* slice, and slices 0..s (the
*window*) show structure finer than s.

*An axis* is anything whose slices have a coupling matrix: nothing here or in the candidate and
decision stages reads which tensor axes the slices run along (:attr:`AxisEvidence.axes`): one tensor
axis, or a merged run of consecutive tensor axes (experts x rows of an MoE weight, one slice per
(expert, row): ``axes=(0, 1)``). A merged run says one thing more, its ``units`` (slices per index of
the outer axes, the rows per expert): a grouping may not straddle them (:meth:`AxisEvidence.fits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from ..blocks import Axis, straddling
from .coupling import TensorCoupling

__all__ = ["AxisEvidence", "SliceCoupling", "nests", "off_block_mass", "ratios"]


class SliceCoupling:
    """Mass-weighted relative coupling between groups of slices, from 2-D prefix sums.

    For groups A and B the coupling is sum_{i in A, j in B} C_ij / sum sqrt(C_ii C_jj): the mean of
    K_ij weighted by the slices' own mass. Slices with little mass have small diagonal entries, so
    their K_ij are large and noisy (an indefinite Hessian, rounding); weighting keeps them from
    deciding for the well-measured slices. Slices without mass weigh nothing.
    """

    def __init__(self, coupling: np.ndarray):
        matrix = np.asarray(coupling, dtype=np.float64)
        diagonal = np.clip(np.diag(matrix), 0.0, None)
        scale = diagonal.max(initial=0.0)
        self.size = matrix.shape[0]
        self.massless = diagonal <= 1e-12 * scale if scale > 0 else np.ones_like(diagonal, dtype=bool)
        self.norms = np.where(self.massless, np.nan, np.sqrt(diagonal))   # ||H_ii||_F (nan: no mass)
        keep = ~(self.massless[:, None] | self.massless[None, :])
        mass = np.where(keep, matrix, 0.0)
        weight = np.where(keep, np.sqrt(np.outer(diagonal, diagonal)), 0.0)
        self._sums = np.zeros((2, self.size + 1, self.size + 1))
        self._sums[0, 1:, 1:], self._sums[1, 1:, 1:] = mass.cumsum(0).cumsum(1), weight.cumsum(0).cumsum(1)
        self._diagonal_sums = np.zeros((2, self.size + 1))
        self._diagonal_sums[0, 1:], self._diagonal_sums[1, 1:] = np.diag(mass).cumsum(), np.diag(weight).cumsum()

    def links(self, start: np.ndarray, size_a: int | np.ndarray, size_b: int | np.ndarray) -> np.ndarray:
        """[2, k]: (mass, weight) between slices start:start+size_a and the next size_b slices."""
        a, b, c = start, start + size_a, start + size_a + size_b
        sums = self._sums
        return sums[:, b, c] - sums[:, a, c] - sums[:, b, b] + sums[:, a, b]

    def between(self, start_a: np.ndarray, size_a: int | np.ndarray, start_b: np.ndarray,
                size_b: int | np.ndarray) -> np.ndarray:
        """[2, k]: (mass, weight) between slices start_a:start_a+size_a and start_b:start_b+size_b
        (disjoint ranges, anywhere on the axis)."""
        a, b, c, d = start_a, start_a + size_a, start_b, start_b + size_b
        sums = self._sums
        return sums[:, b, d] - sums[:, a, d] - sums[:, b, c] + sums[:, a, c]

    def spread(self, start: int, size: int) -> float:
        """90th / 10th percentile of the diagonal norms of the slices start:start+size with mass (1: fewer
        than two of them)."""
        norms = self.norms[start:start + size]
        norms = norms[~np.isnan(norms)]
        return float(np.divide(*np.quantile(norms, [0.9, 0.1]))) if norms.size > 1 else 1.0

    def inside(self, start: np.ndarray, size: int | np.ndarray) -> np.ndarray:
        """[2, k]: (mass, weight) between distinct slices of each group start:start+size."""
        a, b = start, start + size
        sums, diagonal = self._sums, self._diagonal_sums
        return sums[:, b, b] - sums[:, a, b] - sums[:, b, a] + sums[:, a, a] - (diagonal[:, b] - diagonal[:, a])


@dataclass(frozen=True, eq=False)
class AxisEvidence:
    """The measured evidence of one axis of a tensor.

    ``rows`` ([k, length]) are the rows of C between the sampled slices (every ``stride``-th) and
    every slice; ``window`` ([stride + 1, stride + 1]) is C between slices 0..stride, for an axis
    decided on a sample (None when every slice decides); ``units``: for a merged run of axes, the
    slices per index of the axes before each inner one (``(rows,)`` for ``(0, 1)`` of ``[experts,
    rows, columns]``), which no group may straddle.
    """

    axes: tuple[int, ...]
    length: int
    stride: int
    rows: np.ndarray
    window: np.ndarray | None = None
    units: tuple[int, ...] = ()

    @classmethod
    def of(cls, coupling: TensorCoupling, axis: Axis) -> AxisEvidence:
        """The evidence of ``axis`` (one, or a merged run) of a measured tensor (see :class:`TensorCoupling`)."""
        stride = coupling.stride(axis)
        window = coupling.principal(axis, np.arange(stride + 1)) if stride > 1 else None
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        units = tuple(int(np.prod([coupling.shape[a] for a in axes[level:]])) for level in range(1, len(axes)))
        return cls(axes, coupling.length(axis), stride, coupling.rows(axis, coupling.regular(axis)), window, units)

    @property
    def axis(self) -> Axis:
        """The tensor axis the slices run along, or the merged run (a tuple), as a rule's ``axis``."""
        return self.axes[0] if len(self.axes) == 1 else self.axes

    def scaled(self, sample: tuple[int, ...]) -> tuple[int, ...]:
        """Group sizes along the whole axis of a grouping of the sample (every ``stride``-th slice): a
        group of g sampled slices holds g * stride slices, a single slice stands for ``stride``."""
        return tuple(size for g in sample for size in ([g * self.stride] if g > 1 else [1] * self.stride))

    def fits(self, sample: tuple[int, ...]) -> bool:
        """Whether a grouping of the sample, scaled back, straddles no unit of a merged run (always, for one axis)."""
        return not self.units or straddling(self.scaled(sample), self.units) is None

    @cached_property
    def sample(self) -> np.ndarray:
        """Indices of the slices that decide: every ``stride``-th slice (every slice at stride 1)."""
        return np.arange(0, self.length, self.stride)

    @cached_property
    def matrix(self) -> np.ndarray:
        """[k, k]: C between the slices of the sample."""
        return self.rows[:, self.sample]

    @cached_property
    def slices(self) -> SliceCoupling:
        """Relative couplings between groups of the sample's slices."""
        return SliceCoupling(self.matrix)

    @property
    def zero_slices(self) -> int:
        """Sampled slices without Hessian mass (embedding rows of tokens absent from the data)."""
        return int(self.slices.massless.sum())

    @property
    def spread(self) -> float:
        """90th / 10th percentile of the sampled slices' diagonal norms ||H_ii||_F (1: one slice with mass)."""
        return self.slices.spread(0, self.slices.size)


def ratios(mass_weight: np.ndarray, cap: float = 1.0) -> np.ndarray:
    """Coupling of each link: its mass over its weight, at most ``cap`` (1: full coupling); 0 without weight."""
    mass, weight = mass_weight
    return np.minimum(np.divide(mass, weight, out=np.zeros_like(mass), where=weight > 0), cap)


def off_block_mass(rows: np.ndarray, slices: np.ndarray, sizes: Sequence[int]) -> float:
    """Fraction of the coupling mass outside the diagonal blocks of the groups of ``sizes``, from the
    rows ([k, n]) of C of the given ``slices`` (every slice: exact; a regular sample: an estimate)."""
    edges = np.cumsum([0, *sizes])
    group = np.searchsorted(edges, slices, side="right") - 1
    prefix = np.concatenate([np.zeros((len(slices), 1)), rows.cumsum(1)], axis=1)
    rows_at = np.arange(len(slices))
    inside = (prefix[rows_at, edges[group + 1]] - prefix[rows_at, edges[group]]).sum()
    total = rows.sum()
    return max(float((total - inside) / total), 0.0) if total > 0 else 0.0  # no negative rounding residue


def nests(sizes: Sequence[int], parts: Sequence[Sequence[int]]) -> bool:
    """Whether groups of ``sizes`` along the row-major merge of axes lie inside the groups of every axis
    (``parts[j]``: group sizes along axis j, repeated for every index of the axes before it)."""
    edges = set(np.cumsum([0, *sizes]).tolist())
    lengths = [sum(p) for p in parts]
    for j, part in enumerate(parts):
        unit, outer = int(np.prod(lengths[j + 1:])), int(np.prod(lengths[:j]))
        inner = np.cumsum([0, *part]) * unit
        if not edges >= {int(o * lengths[j] * unit + e) for o in range(outer) for e in inner}:
            return False
    return True
