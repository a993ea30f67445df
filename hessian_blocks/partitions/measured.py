"""Derive Adam-mini's partition from the measured Hessian structure, never from parameter names.

For every parameter tensor, :mod:`hessian_blocks.partitions.coupling` measures the slice coupling
C_ij = ||H_ij||_F^2 along each axis (H the within-tensor Hessian; i, j slices along the axis: rows,
columns, tokens, ...). The decision looks only at these numbers and the tensor's shape. It works
with the *relative coupling* K_ij = C_ij / sqrt(C_ii C_jj), the mass between two slices against
the mass of their own diagonal blocks (0 where a slice has no mass: no evidence of coupling).

Along each axis (:func:`group_axis`), couplings between groups of slices are mass-weighted
means of K (sum of C_ij over sum of sqrt(C_ii C_jj)): slices with little mass have small diagonal
entries and noisy, heavy-tailed K, and weighting keeps them from deciding for the others. A link
(two neighbouring groups) couples at most 1 (full coupling; K > 1 happens where the Hessian is
indefinite with a weak diagonal). The *cross coupling* of a grouping is the mean over its links.

1. *Candidates*: every regular contiguous grouping: single slices; two or more groups of equal
   size tiling the axis (heads); with ``max_runs`` = 2 also such groups followed or preceded by
   single slices (a fused q|k|v weight: heads of q and k, then the neurons of v), and one group
   followed or preceded by single slices, repeated (rows interleaved per head, GPT-NeoX's
   [q_h, k_h, v_h]: a q|k block, then the value rows). A group is *distinct* when it couples inside
   at least ``contrast`` times more than across the stronger of the links to its neighbours (a group
   that cuts through a head is not, nor is a group laid over evenly coupled slices; this compares
   the couplings uncapped). Groups among single slices must all be distinct and take in no slice of
   another scale (none above ``max_spread`` times its group's median diagonal norm: one learning
   rate fits the group). A repeated layout places its group freely, so it needs ``contrast**2``;
   it is tried only when no contiguous grouping with single slices is kept, at its shortest period;
   when its singles and its groups differ in scale by more than ``max_spread`` (value rows a hundred
   times the norm of the query and key rows), tilings of whole periods would mix the two and are
   dropped.
2. *Split or not*: when even the weakest candidate leaves more than ``threshold`` between its
   groups, the slices are one group.
3. *Which split*: among single slices and the candidates whose groups are all distinct, the
   finest wins that cuts through no group of another of them at links coupling, on average, more
   than ``threshold / contrast`` and more than that candidate leaves between its own groups: the
   rows of a head stay together, two heads merged into one group may be split, and evenly, weakly
   coupled slices (value neurons) are split into single slices. Judging a cut by the links it cuts,
   not by a mean over all links, keeps many weak links from hiding a few strong ones. *Heads* (equal
   distinct groups of at least 4 slices tiling the axis, each coupled evenly inside: its two halves
   couple with each other at least half as much as inside themselves) protect their groups down to
   ``threshold / contrast**2``: the rows of a key head that couple weakly but evenly (0.1-0.2 at
   initialisation, a thousand times more than across heads) stay one block, as a repeated structure,
   while a single evenly coupled run (the value rows after fused heads) is still split.

Per tensor (:func:`decide_rule`): the axis whose grouping leaves the least Hessian mass off its
blocks wins: the block-diagonal approximation that drops the least (ties: the weaker coupling
between groups, more groups, the lower axis); no axis split: ``"whole"``. When every
axis splits into single slices, the slices of one axis (rows, tokens) are still blocks of many
coordinates, but the coordinates themselves may be decoupled, so the Hessian mass decides. An
entry is off the diagonal when it is off the slice-diagonal blocks of some axis, so the sum of
the axes' off-block mass fractions bounds the off-diagonal mass from above. At most
``mass_threshold`` of it off the diagonal: the Hessian is near diagonal, and is ``"whole"`` when
its diagonal is even (90th/10th percentile of the slices' diagonal norms at most ``max_spread``:
one learning rate fits all, like a norm scale) and ``"elements"`` when it is uneven. A 1-D tensor
with more of its mass off the diagonal, spread over many weak pairs (diffuse coupling), is
``"whole"``; a tensor of two or more axes then keeps the split of its best axis. Every rule's
``why`` records each axis' grouping, its off-block mass fraction, the coupling left between
groups, slices without mass, the diagonal spread where it decided, and how the Hessian was
measured.

An axis measured on a sample of its slices (every s-th slice, see
:mod:`~hessian_blocks.partitions.coupling`) is grouped on the sample's coupling matrix, the grouping
scaled back by s, and its masses taken from the sampled rows of C against every slice. Slices 0..s
check for structure finer than s; where they show it (or the sample has groups of only 2 sampled
slices), the decision is not settled and :class:`Decider` asks for the tensor to be measured again
on every slice.

Slices with no Hessian mass (embedding rows of tokens absent from the data) carry no evidence:
they couple with nothing, stay single, and are counted in ``why``.

A model too large to measure is measured on a smaller instance of the same architecture (fewer
layers, narrower, same head size); :func:`map_rules` carries the rules over to the full model by
module structure (parameter path with layer indices abstracted, module type, shape pattern).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..blocks import Partition, Rule, trainable_shapes
from ..choices import (  # noqa: F401 (re-exported: the thresholds live where the CLI reads them without torch)
    DEFAULT_CONTRAST,
    DEFAULT_MASS_THRESHOLD,
    DEFAULT_MAX_RUNS,
    DEFAULT_MAX_SPREAD,
    DEFAULT_THRESHOLD,
)
from .coupling import TensorCoupling, measure_coupling

Batch = tuple[Any, torch.Tensor]
_RESAMPLED = "; measured again on every slice: a sample of slices missed finer structure"  # in a rule's why


@dataclass
class AxisGrouping:
    """The finest contiguous grouping of one axis and its evidence."""

    axis: int
    sizes: list[int]            # group sizes along the axis, in order
    cross_coupling: float       # mean coupling between neighbouring groups (one group: between its slices)
    off_block_mass: float       # fraction of ||H_WW||_F^2 outside the groups' diagonal blocks
    zero_slices: int            # slices with no Hessian mass
    spread: float = 1.0         # 90th / 10th percentile of the slices' diagonal norms ||H_ii||_F
    cross_error: float = 0.0    # standard errors of cross_coupling and off_block_mass (0: exact)
    off_block_error: float = 0.0
    stacked: int = 1            # single slices that pair up across this many stacked parts (gate|up rows)
    stacked_off_mass: float = 1.0  # fraction of the mass outside those pairs' blocks
    stride: int = 1             # decided on every stride-th slice (1: on every slice)
    sampled_sizes: list[int] | None = None  # the grouping of that sample (None: not sampled)
    finer: bool = False         # the first stride shows structure that the sample cannot see
    weakest: float = 0.0        # coupling the weakest candidate leaves between its groups (above threshold: one group)
    weakest_error: float = 0.0  # its standard error (0: exact)

    @property
    def kept_off_mass(self) -> float:
        """The mass the grouping leaves off its blocks, counting stacked pairs as one block."""
        return min(self.off_block_mass, self.stacked_off_mass)

    @property
    def runs(self) -> list[tuple[int, int]]:
        """Run-length encoding of ``sizes`` as (group size, count) pairs."""
        return _runs(self.sizes)


@dataclass
class Decision:
    """The rule chosen for one tensor, with the groupings of every axis it was chosen from."""

    rule: Rule
    shape: tuple[int, ...]
    method: str
    products: int
    groupings: list[AxisGrouping]
    coupling: TensorCoupling
    agreeing: int = 0           # leave-one-out estimates whose decision is this one
    replicates: int = 0         # leave-one-out estimates checked (0: exact, or a single probe)
    near_threshold: tuple[int, ...] = ()   # axes whose split or not is within the 95 % interval of threshold

    @property
    def settled(self) -> bool:
        """Whether the decision holds without any one probe (always, when measured exactly), no axis
        it rests on is one group or split only by chance (:func:`decide_rule`), and no sampled axis
        shows structure finer than its stride."""
        return self.agreeing == self.replicates and not self.near_threshold and not any(g.finer for g in self.groupings)

    @property
    def resting(self) -> list[AxisGrouping]:
        """The groupings the rule rests on: the split axis', or every axis' when the tensor is not split."""
        return [g for g in self.groupings if self.rule.split != "groups" or g.axis == self.rule.axis]

    @property
    def evidence(self) -> str:
        """The chosen axis' evidence in a few words (off-block mass, coupling left between groups)."""
        return "; ".join(_evidence(g) for g in self.resting) if self.groupings else "one entry"

    @property
    def summary(self) -> str:
        """The split in a few words: 'whole', 'elements', 'axis 0: 4 x 8', 'axis 1: 8 x 2, 16 x 1'."""
        return _describe(_key(self.rule), self.shape)


def check_settings(threshold: float, contrast: float, max_runs: int, mass_threshold: float,
                   max_spread: float = DEFAULT_MAX_SPREAD) -> None:
    """Refuse decision settings that make no sense, before anything is measured."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (a relative coupling), got {threshold}")
    if not contrast >= 1:
        raise ValueError(f"contrast must be >= 1 (a ratio of couplings), got {contrast}")
    if max_runs not in (1, 2):
        raise ValueError(f"max_runs must be 1 (equal groups only) or 2 (also a run of single slices), got {max_runs}")
    if not max_spread >= 1:
        raise ValueError(f"max_spread must be >= 1 (a ratio of diagonal norms), got {max_spread}")
    if not 0 <= mass_threshold <= 1:
        raise ValueError(f"mass_threshold must be a fraction in [0, 1], got {mass_threshold}")


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

    def links(self, start: np.ndarray, size_a: int, size_b: int) -> np.ndarray:
        """[2, k]: (mass, weight) between slices start:start+size_a and the next size_b slices."""
        a, b, c = start, start + size_a, start + size_a + size_b
        sums = self._sums
        return sums[:, b, c] - sums[:, a, c] - sums[:, b, b] + sums[:, a, b]

    def inside(self, start: np.ndarray, size: int) -> np.ndarray:
        """[2, k]: (mass, weight) between distinct slices of each group start:start+size."""
        a, b = start, start + size
        sums, diagonal = self._sums, self._diagonal_sums
        return sums[:, b, b] - sums[:, a, b] - sums[:, b, a] + sums[:, a, a] - (diagonal[:, b] - diagonal[:, a])


def group_axis(
    coupling: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    contrast: float = DEFAULT_CONTRAST,
    max_runs: int = DEFAULT_MAX_RUNS,
    axis: int = 0,
    max_spread: float = DEFAULT_MAX_SPREAD,
) -> AxisGrouping:
    """The finest contiguous grouping of the slices of one axis (see the module docstring).

    ``coupling`` is the symmetric [n, n] matrix C_ij = ||H_ij||_F^2 between slices; ``max_spread``
    bounds how much the slices' diagonal norms may differ inside a group (``np.inf``: no scale test).
    """
    check_settings(threshold, contrast, max_runs, DEFAULT_MASS_THRESHOLD, max_spread)
    matrix = np.asarray(coupling, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape != (n, n):
        raise ValueError(f"coupling must be a square matrix, got shape {matrix.shape}")
    slices = SliceCoupling(matrix)
    candidates = _candidates(slices, max_runs, contrast, max_spread)
    weakest = min(c.cross for c in candidates)
    if weakest > threshold:                          # every grouping leaves strong coupling: one group
        sizes, cross = [n], candidates[0].cross      # report how the single slices couple
    else:
        chosen = _choose(slices, [c for c in candidates if c.distinct], threshold, contrast)
        sizes, cross = chosen.sizes, chosen.cross
    off = _off_block_mass(matrix, np.arange(n), sizes)
    norms = np.sqrt(np.diag(matrix)[~slices.massless])
    spread = float(np.divide(*np.quantile(norms, [0.9, 0.1]))) if norms.size > 1 else 1.0
    return AxisGrouping(axis, list(sizes), cross, off, int(slices.massless.sum()), spread, weakest=weakest)


class Candidate(NamedTuple):
    """A regular grouping of an axis (its group sizes in order), the mean coupling of its links, and
    whether every group in it is distinct from its neighbours (single slices always are)."""

    sizes: tuple[int, ...]
    cross: float
    distinct: bool
    heads: bool = False                 # equal distinct groups tiling the axis, each evenly coupled inside

    @property
    def groups(self) -> int:
        return len(self.sizes)


def _layouts(n: int, max_runs: int) -> Iterable[tuple[list[int], int]]:
    """(group sizes, period) of every regular grouping of ``n`` slices but single slices:
    ``count >= 2`` groups of ``size`` tiling the axis (heads); with ``max_runs`` = 2 also such groups
    followed or preceded by single slices (a fused q|k|v weight: heads of q and k, then the neurons
    of v), and a group followed or preceded by single slices, repeated every ``period`` slices (rows
    interleaved per head, [q_h, k_h, v_h]: a query and key group, then the value rows). Period 0:
    not repeated. Repeated layouts come last, shortest period first."""
    for size in range(2, n // 2 + 1):
        for count in range(2, n // size + 1):
            rest = n - size * count
            if not rest:
                yield [size] * count, 0
            elif max_runs >= 2:
                yield [size] * count + [1] * rest, 0
                yield [1] * rest + [size] * count, 0
    if max_runs < 2:
        return
    for period in range(3, n // 2 + 1):
        if n % period:
            continue
        for size in range(2, period):
            singles = [1] * (period - size)
            yield ([size] + singles) * (n // period), period
            yield (singles + [size]) * (n // period), period


def _candidates(slices: SliceCoupling, max_runs: int, contrast: float, max_spread: float) -> list[Candidate]:
    """The regular groupings of the axis (:func:`_layouts`), single slices first.

    A group is distinct when it couples inside at least ``contrast`` times more than across the
    stronger of the links to its neighbours (a group that cuts through a head is not, nor is a group
    laid over evenly coupled slices). The comparison takes the couplings as measured, above 1
    included: rows of a query and a key head couple thousands of times more with each other than
    with their value rows, which still couple with them above 1. Groupings with single slices are
    kept only when every group is distinct and of one scale (:func:`_one_scale`): the value rows
    beside a query and key head couple with them above 1 too, relative to the heads' tiny diagonal,
    but carry a hundred to a thousand times their norm. A repeated
    layout places its groups more freely, so its groups must be distinct by ``contrast**2`` (a query
    and key head: by 1,000 or more at initialisation; chance groups in a norm scale's noise: by 5-8).
    It is the interleaved form of a fused weight, so it is tried only when no contiguous grouping
    with single slices is kept (a fused GPT-2 ``c_attn`` repeats its first query head every 48
    columns too), and kept only at the shortest period that has one: a pattern repeats per head, and
    a longer period would leave some heads as single slices. Where its single slices and its groups
    differ in scale (:func:`_two_scales`), the tilings of whole periods are dropped: a block of a
    query, key and value head would give value rows and query rows of a hundredth of their norm one
    learning rate, though it keeps more Hessian mass. (A scale test on every tiling would split real
    heads: a query head's rows spread their norms up to 14 times at initialisation.)
    """
    n = slices.size
    single = _ratios(slices.links(np.arange(n - 1), 1, 1))               # link i: slice i -> slice i + 1
    out = [Candidate((1,) * n, float(single.mean()) if n > 1 else 0.0, True)]
    fused, shortest = False, 0          # whether a contiguous grouping with singles is kept; a repeated one's period
    for layout, period in _layouts(n, max_runs):
        if period and (fused or shortest and period > shortest):
            break
        sizes = np.array(layout)
        starts = np.cumsum(sizes) - sizes
        grouped = sizes > 1
        links = _ratios(slices.links(starts[:-1], sizes[:-1], sizes[1:]), cap=np.inf)   # group i -> group i + 1
        around = np.concatenate([[0.0], links, [0.0]])
        inside = _ratios(slices.inside(starts[grouped], sizes[grouped]), cap=np.inf)
        needed = contrast ** 2 if period else contrast                       # a repeated layout is freer: more evidence
        distinct = bool(np.all(inside >= needed * np.maximum(around[:-1], around[1:])[grouped]))
        if not grouped.all() and not (distinct and _one_scale(slices, starts[grouped], sizes[grouped][0], max_spread)):
            continue
        heads = distinct and grouped.all() and _even_inside(slices, starts, layout[0])
        if not period:
            fused = fused or not grouped.all()
        else:
            shortest = period
            if _two_scales(slices, sizes, max_spread):   # tilings of whole periods would mix its two scales
                out = [c for c in out if len(set(c.sizes)) > 1 or c.sizes[0] % period]
        out.append(Candidate(tuple(layout), float(np.minimum(links, 1.0).mean()), distinct, heads))
    return out


def _one_scale(slices: SliceCoupling, starts: np.ndarray, size: int, max_spread: float) -> bool:
    """Whether no slice of a group of ``size`` at ``starts`` has a diagonal norm above ``max_spread``
    times its group's median: the group takes in no neighbouring slice of another scale, and one
    learning rate fits it. Lighter slices are not held against it (their relative couplings are
    noisy and they carry little mass, like slices without mass, which are left out)."""
    norms = slices.norms[starts[:, None] + np.arange(size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # a group without mass has no median: no evidence
        median = np.nanmedian(norms, axis=1, keepdims=True)
    return not np.any(norms > max_spread * median)        # nan compares False


def _two_scales(slices: SliceCoupling, sizes: np.ndarray, max_spread: float) -> bool:
    """Whether the single slices of a grouping of ``sizes`` have a median diagonal norm more than
    ``max_spread`` times the median of its grouped slices, or less than 1 / ``max_spread`` of it
    (value rows beside query and key rows: a hundred to a thousand times)."""
    in_group = np.repeat(sizes > 1, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # no mass on one side: no evidence
        ratio = np.nanmedian(slices.norms[~in_group]) / np.nanmedian(slices.norms[in_group])
    return bool(ratio > max_spread or ratio * max_spread < 1)


def _even_inside(slices: SliceCoupling, starts: np.ndarray, size: int) -> bool:
    """Whether groups of ``size`` (at least 4) at ``starts`` couple evenly inside: their two halves couple
    with each other at least half as much as inside themselves (not two heads, not a band of neighbours)."""
    if size < 4:
        return False
    half = size // 2
    inside = slices.inside(starts, half).sum(axis=1) + slices.inside(starts + half, size - half).sum(axis=1)
    between = slices.links(starts, half, size - half).sum(axis=1)
    return bool(2 * _ratios(between[:, None])[0] >= _ratios(inside[:, None])[0])


def _choose(slices: SliceCoupling, eligible: list[Candidate], threshold: float, contrast: float) -> Candidate:
    """The finest eligible grouping that cuts no group of another one at strong links (see the
    module docstring); single slices are eligible, so there always is one."""
    protecting = [c for c in eligible if c.groups < slices.size]
    for candidate in sorted(eligible, key=lambda c: (-c.groups, c.cross)):
        if not any(_cuts(slices, candidate, other, threshold / contrast / (contrast if other.heads else 1))
                   for other in protecting):
            return candidate
    return min(eligible, key=lambda c: c.cross)


def _cuts(slices: SliceCoupling, candidate: Candidate, grouping: Candidate, weak: float) -> bool:
    """Whether ``candidate`` cuts through groups of ``grouping`` at links coupling more than ``weak``
    and more than ``grouping`` leaves between its own groups, on average."""
    edges = np.cumsum([0, *candidate.sizes])
    inner = np.flatnonzero(~np.isin(edges[1:-1], np.cumsum(grouping.sizes))) + 1   # its edges inside groups
    if not inner.size:
        return False
    cut = _ratios(slices.links(edges[inner - 1], edges[inner] - edges[inner - 1], edges[inner + 1] - edges[inner]))
    return bool(cut.mean() > max(weak, grouping.cross))


def _off_block_mass(rows: np.ndarray, slices: np.ndarray, sizes: Sequence[int]) -> float:
    """Fraction of the coupling mass outside the diagonal blocks of the groups of ``sizes``, from the
    rows ([k, n]) of C of the given ``slices`` (every slice: exact; a regular sample: an estimate)."""
    edges = np.cumsum([0, *sizes])
    group = np.searchsorted(edges, slices, side="right") - 1
    prefix = np.concatenate([np.zeros((len(slices), 1)), rows.cumsum(1)], axis=1)
    rows_at = np.arange(len(slices))
    inside = (prefix[rows_at, edges[group + 1]] - prefix[rows_at, edges[group]]).sum()
    total = rows.sum()
    return max(float((total - inside) / total), 0.0) if total > 0 else 0.0  # no negative rounding residue


def _cross_coupling(matrix: np.ndarray, sizes: Sequence[int]) -> float:
    """Mean coupling of the links between neighbouring groups of ``sizes`` (one group: between its slices)."""
    slices = SliceCoupling(matrix)
    if len(sizes) == 1:
        sizes = [1] * slices.size
    sizes = np.asarray(sizes)
    links = _ratios(slices.links(np.cumsum(sizes)[:-1] - sizes[:-1], sizes[:-1], sizes[1:]))   # group i -> i + 1
    return float(links.mean()) if links.size else 0.0


def _group(coupling: TensorCoupling, axis: int, threshold: float, contrast: float, max_runs: int,
           max_spread: float) -> AxisGrouping:
    """The grouping of one axis of a tensor; of a sampled axis from its sample (see the module docstring)."""
    stride = coupling.stride(axis)
    if stride == 1:
        return group_axis(coupling.axes[axis], threshold, contrast, max_runs, axis, max_spread)
    regular = coupling.regular(axis)
    sample = group_axis(coupling.principal(axis, regular), threshold, contrast, max_runs, axis, max_spread)
    sizes = [size for g in sample.sizes for size in ([g * stride] if g > 1 else [1] * stride)]
    # structure finer than the stride: slices 0..stride that the grouping separates couple distinctly more
    # than the sample's groups do (a group of 2 sampled every 4th slice looks like single slices)
    window = SliceCoupling(coupling.principal(axis, np.arange(stride + 1)))
    separated = np.flatnonzero(np.isin(np.arange(1, stride + 1), np.cumsum(sizes)))  # link k: slice k -> k + 1
    mass, weight = window.links(separated, 1, 1).sum(axis=1)
    fine = mass / weight if weight > 0 else 0.0
    finer = bool(separated.size) and fine > max(threshold / contrast, contrast * sample.cross_coupling)
    # a group of two sampled slices is two coupled neighbours as much as a group: too few to tell
    finer = finer or 2 in sample.sizes
    off = _off_block_mass(coupling.rows(axis, regular), regular, sizes)
    return AxisGrouping(axis, sizes, sample.cross_coupling, off, sample.zero_slices, sample.spread, stride=stride,
                        sampled_sizes=sample.sizes, finer=finer, weakest=sample.weakest)


def _axis_numbers(coupling: TensorCoupling, grouping: AxisGrouping, matrix: np.ndarray) -> tuple[float, float]:
    """(coupling between groups, off-block mass) of ``grouping`` on another estimate ``matrix`` of its axis."""
    axis, regular = grouping.axis, coupling.regular(grouping.axis)
    return (_cross_coupling(coupling.principal(axis, regular, matrix), grouping.sampled_sizes or grouping.sizes),
            _off_block_mass(coupling.rows(axis, regular, matrix), regular, grouping.sizes))


def _jackknife_error(values: Sequence[float]) -> float:
    """Jackknife standard error from leave-one-out values: sqrt((k - 1) / k * sum (v - mean)^2)."""
    values = np.asarray(values, dtype=np.float64)
    k = len(values)
    return float(np.sqrt((k - 1) / k * np.sum((values - values.mean()) ** 2))) if k > 1 else 0.0


def _find_stacked_parts(grouping: AxisGrouping, rows: np.ndarray, slices: np.ndarray, mass_threshold: float,
                        most: int = 4) -> None:
    """Single slices of an axis that is k equal parts stacked (a fused gate|up weight: row i of the
    gate couples with row i of the up projection, far more than with anything else): when pairing
    slice i with i + n/k, i + 2n/k, ... leaves at most ``mass_threshold`` of the mass off those
    pairs' blocks, the slices are the finest contiguous blocks the pairs allow, and the axis is
    compared with the others by the mass left off the pairs. Records the fewest parts that do so.
    ``rows`` ([k, n]) are the rows of C of the measured ``slices``."""
    n, total = rows.shape[1], rows.sum()
    for parts in range(2, most + 1):
        if n % parts or total <= 0:
            continue
        width = n // parts
        # mass between each measured slice and the slices with its index in any part
        paired = rows.reshape(len(slices), parts, width)[np.arange(len(slices)), :, slices % width].sum()
        off = max(float((total - paired) / total), 0.0)
        if off <= mass_threshold:
            grouping.stacked, grouping.stacked_off_mass = parts, off
            return


def _ratios(mass_weight: np.ndarray, cap: float = 1.0) -> np.ndarray:
    """Coupling of each link: its mass over its weight, at most ``cap`` (1: full coupling); 0 without weight."""
    mass, weight = mass_weight
    return np.minimum(np.divide(mass, weight, out=np.zeros_like(mass), where=weight > 0), cap)


def decide_rule(
    coupling: TensorCoupling,
    threshold: float = DEFAULT_THRESHOLD,
    contrast: float = DEFAULT_CONTRAST,
    max_runs: int = DEFAULT_MAX_RUNS,
    mass_threshold: float = DEFAULT_MASS_THRESHOLD,
    max_spread: float = DEFAULT_MAX_SPREAD,
) -> Decision:
    """The split of one tensor from its measured slice couplings (shapes and numbers only).

    A probe estimate is also decided without each of its probes in turn (jackknife): the decision
    is *settled* when every leave-one-out estimate gives the same rule and, on every axis the rule
    rests on (the split axis; every axis of a ``whole`` or ``elements`` rule), the coupling the
    weakest candidate grouping leaves between its groups, which decides whether the axis splits at
    all, lies outside the two-sided 95 % t-interval (k - 1 degrees of freedom for k probes) around
    ``threshold``; *undecided* otherwise (the rule of the full estimate is kept, and ``why`` says
    why). The standard errors of each axis' off-block mass, coupling between groups and weakest
    coupling are the jackknife errors of those numbers.
    """
    decision = _decide(coupling, threshold, contrast, max_runs, mass_threshold, max_spread)
    replicates = coupling.leave_one_out()
    if not replicates:
        return decision
    decided = [_decide(r, threshold, contrast, max_runs, mass_threshold, max_spread) for r in replicates]
    keys = [_key(d.rule) for d in decided]
    for grouping in decision.groupings:
        numbers = np.array([_axis_numbers(coupling, grouping, r.axes[grouping.axis]) for r in replicates])
        grouping.cross_error, grouping.off_block_error = map(_jackknife_error, numbers.T)
        grouping.weakest_error = _jackknife_error([next(g.weakest for g in d.groupings if g.axis == grouping.axis)
                                                   for d in decided])
    critical = float(stats.t.ppf(0.975, len(replicates) - 1))
    near = tuple(g.axis for g in decision.resting if abs(g.weakest - threshold) < critical * g.weakest_error)
    split = "; ".join(f"axis {g.axis} splits at all: weakest grouping leaves {g.weakest:.3g} ± {g.weakest_error:.2g}"
                      for g in decision.resting)
    interval = f"threshold {threshold} outside the 95 % t-interval ({critical:.3g} standard errors)"
    agreeing = sum(k == _key(decision.rule) for k in keys)
    if agreeing == len(keys) and not near:
        verdict = f"settled: all {len(keys)} leave-one-probe-out estimates agree; {split}, {interval}"
    elif agreeing == len(keys):
        verdict = (f"UNDECIDED: {split}; threshold {threshold} within the 95 % t-interval ({critical:.3g} standard "
                   "errors; more probes: --max-probes)")
    else:
        others = sorted({k for k in keys if k != _key(decision.rule)}, key=str)
        verdict = (f"UNDECIDED: {agreeing} of {len(keys)} leave-one-probe-out estimates agree, the others give "
                   + "; ".join(_describe(k, coupling.shape) for k in others) + " (more probes: --max-probes)")
    rule = decision.rule
    evidence = "; ".join(_evidence(g) for g in decision.groupings)
    again = _RESAMPLED if coupling.resampled else ""
    why = (f"{_reason(rule.why)}: {evidence} ({coupling.method}, {coupling.probes} probes per slice, "
           f"{coupling.products} HVPs{again}; {verdict})")
    rule = Rule(rule.param, rule.split, axis=rule.axis, size=rule.size, runs=rule.runs, why=why)
    return Decision(rule, decision.shape, decision.method, decision.products, decision.groupings, coupling,
                    agreeing, len(keys), near)


def _key(rule: Rule) -> tuple:
    return rule.split, rule.axis, rule.size, rule.runs


def _describe(key: tuple, shape: tuple[int, ...]) -> str:
    split, axis, size, runs = key
    if split != "groups":
        return split
    runs = [(size, shape[axis] // size)] if size is not None else list(runs)
    return f"axis {axis}: {_runs_text(runs)}"


def _runs_text(runs: Sequence[tuple[int, int]]) -> str:
    """'8 x 8, 32 x 1'; a repeated pattern once with its count: '4 x (1 x 16, 8 x 1)'."""
    period = _period(runs)
    text = ", ".join(f"{count} x {size}" for size, count in runs[:period])
    return text if period == len(runs) else f"{len(runs) // period} x ({text})"


def _period(runs: Sequence[tuple[int, int]]) -> int:
    """The length of the shortest pattern that ``runs`` repeat (their length: not repeated)."""
    runs = list(runs)
    return next(p for p in range(1, len(runs) + 1) if len(runs) % p == 0 and runs == runs[:p] * (len(runs) // p))


def _reason(why: str) -> str:
    """The reason part of a decided ``why`` (before the evidence)."""
    return why.split(": ", 1)[0] if why else ""


def _decide(
    coupling: TensorCoupling, threshold: float, contrast: float, max_runs: int, mass_threshold: float, max_spread: float
) -> Decision:
    check_settings(threshold, contrast, max_runs, mass_threshold, max_spread)
    shape = coupling.shape
    groupings = [_group(coupling, axis, threshold, contrast, max_runs, max_spread) for axis in sorted(coupling.axes)]
    method = f"{coupling.method}, {coupling.products} HVPs" + (_RESAMPLED if coupling.resampled else "")
    if not groupings:  # a single entry
        rule = Rule(coupling.param, "whole", why=f"one entry ({method})")
        return Decision(rule, shape, coupling.method, coupling.products, [], coupling)
    if len(shape) > 1:
        for grouping in groupings:
            if len(grouping.sizes) == shape[grouping.axis] and grouping.off_block_mass > mass_threshold:
                regular = coupling.regular(grouping.axis)
                _find_stacked_parts(grouping, coupling.rows(grouping.axis, regular), regular, mass_threshold)
    evidence = "; ".join(_evidence(g) for g in groupings)
    split = [g for g in groupings if len(g.sizes) > 1]
    single_slices = all(len(g.sizes) == shape[g.axis] for g in groupings)  # every block would be one coordinate
    # an entry is off the diagonal when it is off the slice-diagonal of some axis: the union bound
    off_diagonal = min(sum(g.off_block_mass for g in groupings), 1.0)
    near_diagonal = off_diagonal <= mass_threshold
    spread = max(g.spread for g in groupings)
    if not split:
        rule = Rule(coupling.param, "whole", why=f"slices couple along every axis: {evidence} ({method})")
    elif single_slices and near_diagonal and spread <= max_spread:
        rule = Rule(coupling.param, "whole",
                    why=f"Hessian near diagonal ({off_diagonal:.0%} off) with an even diagonal (spread {spread:.3g}, "
                                                 f"one learning rate fits): {evidence} ({method})")
    elif single_slices and near_diagonal:
        rule = Rule(coupling.param, "elements", why=f"Hessian near diagonal ({off_diagonal:.0%} off), uneven diagonal "
                                                    f"(spread {spread:.3g}): {evidence} ({method})")
    elif single_slices and len(groupings) == 1:
        rule = Rule(coupling.param, "whole", why=f"no two entries couple strongly, but {off_diagonal:.0%} of the mass "
                                                 f"is off the diagonal (diffuse coupling): {evidence} ({method})")
    else:
        best = min(split, key=lambda g: (g.kept_off_mass, g.cross_coupling, -len(g.sizes), g.axis))
        runs = best.runs
        size, runs_field = (runs[0][0], None) if len(runs) == 1 else (None, tuple(runs))
        rule = Rule(coupling.param, "groups", axis=best.axis, size=size, runs=runs_field,
                    why=f"groups along axis {best.axis}: {evidence} ({method})")
    return Decision(rule, shape, coupling.method, coupling.products, groupings, coupling)


def derive_decisions(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    data: Iterable[Batch],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    contrast: float = DEFAULT_CONTRAST,
    max_runs: int = DEFAULT_MAX_RUNS,
    mass_threshold: float = DEFAULT_MASS_THRESHOLD,
    max_spread: float = DEFAULT_MAX_SPREAD,
    **measure: Any,
) -> list[Decision]:
    """Measure every trainable tensor (or ``params=[...]``) and decide its split, with the evidence.

    ``measure`` goes to :func:`~hessian_blocks.partitions.coupling.measure_coupling` (``params``, ``method``,
    ``probes``, ``max_probes``, ``dense_max``, ``max_slices``, ``seed``, ``dtype``, ``device``, ``strategy``,
    ``progress``).
    With ``max_probes`` above ``probes`` the measurement is sequential: a tensor whose decision is
    not settled (see :func:`decide_rule`) gets as many probes again, until it is settled or has
    ``max_probes`` per slice.
    """
    decide = Decider(threshold=threshold, contrast=contrast, max_runs=max_runs, mass_threshold=mass_threshold,
                     max_spread=max_spread)
    couplings = measure_coupling(model, loss_fn, data, refine=decide.unsettled, resample=decide.finer, **measure)
    return [decide(c) for c in couplings.values()]


class Decider:
    """:func:`decide_rule` with fixed settings, keeping each tensor's latest decision: the check that
    asks a sequential measurement for more probes has already decided the final estimate."""

    def __init__(self, **settings: Any):
        check_settings(**settings)
        self.settings = settings
        self._latest: dict[str, Decision] = {}

    def __call__(self, coupling: TensorCoupling) -> Decision:
        latest = self._latest.get(coupling.param)
        if latest is None or latest.coupling is not coupling:
            latest = self._latest[coupling.param] = decide_rule(coupling, **self.settings)
        return latest

    def unsettled(self, coupling: TensorCoupling) -> bool:
        """Whether the decision changes without one of the probes, or rests on an axis whose split is
        within the 95 % interval of the threshold (a ``refine`` for measure_coupling)."""
        decision = self(coupling)
        return decision.agreeing != decision.replicates or bool(decision.near_threshold)

    def finer(self, coupling: TensorCoupling) -> bool:
        """Whether a sampled axis shows structure finer than its stride (a ``resample`` for
        measure_coupling: measure the tensor again on every slice)."""
        return any(g.finer for g in self(coupling).groupings)


def derive_partition(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    data: Iterable[Batch],
    *,
    small: nn.Module | None = None,
    small_data: Iterable[Batch] | None = None,
    **settings: Any,
) -> Partition:
    """Adam-mini partition of ``model`` derived from its measured Hessian structure.

    Args:
        model: any ``nn.Module`` in eval mode (see :class:`~hessian_blocks.hvp.BlockHessian`).
        loss_fn: ``loss_fn(model_output, targets) -> scalar`` batch mean.
        data: (inputs, targets) batches defining the loss.
        small: a smaller instance of the same architecture (fewer layers, narrower, same head
            size) measured instead of ``model``; its rules are mapped back by :func:`map_rules`.
        small_data: batches for ``small`` (default: ``data``).
        **settings: decision settings ``threshold`` (0.5: above it, every grouping leaves too much
            coupling and the axis is one block), ``contrast`` (4: a distinct group couples inside this many
            times more than to its neighbours; the finest grouping wins that cuts no distinct group
            at links above ``threshold / contrast``, heads at links above ``threshold / contrast**2``),
            ``max_runs`` (2: groups
            may be followed or preceded by single slices, also repeated per head; 1: equal groups
            only), ``mass_threshold`` (0.2: largest off-diagonal mass fraction of a near-diagonal
            Hessian), ``max_spread`` (10: largest 90th/10th percentile ratio of the diagonal for which
            a near-diagonal Hessian is one block, and of the diagonal norms inside a group), and the
            measurement options of :func:`~hessian_blocks.partitions.coupling.measure_coupling` (``method``,
            ``probes`` = 2, ``max_probes``, ``dense_max`` = 256, ``max_slices`` = 32, ``seed``, ``dtype``,
            ``device``, ``strategy``, ``progress``).
    """
    if "params" in settings:
        raise ValueError("derive_partition measures every parameter; use derive_decisions(params=...) for a subset")
    if small is None:
        return Partition.from_rules(model, [d.rule for d in derive_decisions(model, loss_fn, data, **settings)])
    decisions = derive_decisions(small, loss_fn, data if small_data is None else small_data, **settings)
    return Partition.from_rules(model, map_rules(small, [d.rule for d in decisions], model))


# ------------------------------------------------------------------ mapping small -> full

# config fields of the bundled models (first name) and of Hugging Face PretrainedConfig (second)
_CONFIG_FIELDS = {
    "layers": ("n_layer", "num_hidden_layers"),
    "width": ("n_embd", "hidden_size"),
    "heads": ("n_head", "num_attention_heads"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "ffn": ("intermediate_size",),
    "vocab": ("vocab_size",),
}
SMALL_LAYERS, SMALL_KV_HEADS, SMALL_VOCAB = 2, 2, 512


def small_overrides(config: Any) -> dict[str, int]:
    """Config overrides that build a smaller instance of the same architecture (``--small auto``).

    ``config`` is a bundled model's config (``n_layer``, ``n_embd``, ``n_head``, ``vocab_size``)
    or a Hugging Face ``PretrainedConfig`` (``num_hidden_layers``, ``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``,
    ``vocab_size``). The smaller instance keeps the head size, has at most 2 layers, at least 2
    key/value heads (so per-head structure stays visible; at most 2 query heads per key/value
    head with grouped-query attention), the width those heads need, the MLP width in the same
    ratio to it, and at most 512 tokens. Fields already at most that size are left alone. A config
    without layers, width and heads is an error naming what is missing.
    """
    found = {key: next((name for name in names if getattr(config, name, None) is not None), None)
             for key, names in _CONFIG_FIELDS.items()}
    missing = [names[0] + "/" + names[-1] for key, names in _CONFIG_FIELDS.items()
               if key in ("layers", "width", "heads") and found[key] is None]
    if missing:
        raise ValueError(
            f"cannot build a smaller instance of {type(config).__name__} automatically: it has no "
            f"{', '.join(missing)} field; give the smaller instance's config fields yourself "
            "(e.g. --small n_layer=2 --small n_embd=64), or measure the model itself"
        )
    value = {key: int(getattr(config, name)) for key, name in found.items() if name is not None}
    head_dim = value.get("head_dim") or value["width"] // value["heads"]
    kv_heads = value.get("kv_heads", value["heads"])
    if value["heads"] % kv_heads:
        raise ValueError(f"{type(config).__name__}: {value['heads']} attention heads do not share "
                         f"{kv_heads} key/value heads evenly")
    small_kv = min(kv_heads, SMALL_KV_HEADS)
    small_heads = small_kv * min(value["heads"] // kv_heads, 2)
    small_width = value["width"] * small_heads // value["heads"]
    wanted = {"layers": min(value["layers"], SMALL_LAYERS), "heads": small_heads, "kv_heads": small_kv,
              "width": small_width, "head_dim": head_dim, "vocab": min(value.get("vocab", SMALL_VOCAB), SMALL_VOCAB)}
    if "ffn" in value:
        wanted["ffn"] = max(1, round(value["ffn"] * small_width / value["width"]))
    return {found[key]: size for key, size in wanted.items() if found.get(key) is not None and size != value[key]}



def map_rules(small: nn.Module, rules: Sequence[Rule], full: nn.Module) -> list[Rule]:
    """Carry rules measured on ``small`` over to ``full``, a larger instance of the same architecture.

    A full-model parameter is matched to the small-model parameters with the same *structural
    path* (its dotted path with every integer index replaced by ``#``) and the same module type;
    among several (one per layer), the one at the nearest relative depth is taken. Group sizes
    carry over unchanged (the head size is the same); run-length groups are scaled with the axis
    (each run keeps its share of the axis). Any parameter without a counterpart, or whose shape
    does not fit the rule, is an error naming it.
    """
    small_rules = {r.param: r for r in rules}
    small_shapes = trainable_shapes(small)
    small_types = _owner_types(small)
    full_types = _owner_types(full)
    full_shapes = trainable_shapes(full)
    full_spans, small_spans = _layer_spans(full_shapes), _layer_spans(small_shapes)
    candidates: dict[tuple[str, str], list[str]] = {}
    for name in small_shapes:
        if name not in small_rules:
            raise ValueError(f"no rule for small-model parameter '{name}': measure every parameter of the small model")
        candidates.setdefault((_structural_path(name), small_types[name]), []).append(name)
    mapped = []
    for name, shape in full_shapes.items():
        key = (_structural_path(name), full_types[name])
        if key not in candidates:
            raise ValueError(
                f"cannot map rules to '{name}' ({full_types[name]}, shape {list(shape)}): the small model has no "
                f"parameter at path pattern '{key[0]}' of that module type. Build the small instance from the same "
                "architecture (same module tree, fewer layers or narrower), or measure the full model directly."
            )
        source = _nearest_depth(name, candidates[key], full_spans, small_spans)
        mapped.append(_scaled_rule(small_rules[source], small_shapes[source], name, shape))
    return mapped


def _scaled_rule(rule: Rule, small_shape: tuple[int, ...], name: str, shape: tuple[int, ...]) -> Rule:
    why = f"mapped from '{rule.param}' {list(small_shape)} of the measured small model: {rule.why or ''}".rstrip(": ")
    if len(shape) != len(small_shape):
        raise ValueError(
            f"cannot map the rule of '{rule.param}' (shape {list(small_shape)}) to '{name}' (shape {list(shape)}): "
            "the tensors have a different number of dimensions"
        )
    if rule.split != "groups":
        return Rule(name, rule.split, why=why)
    axis = rule.axis % len(shape)
    if rule.size is not None:
        if shape[axis] % rule.size:
            raise ValueError(
                f"cannot map groups of {rule.size} along axis {axis} from '{rule.param}' to '{name}' (shape "
                f"{list(shape)}): {rule.size} does not divide {shape[axis]}. The small model must keep the group "
                "(head) size of the full model."
            )
        return Rule(name, "groups", axis=axis, size=rule.size, why=why)
    period = _period(rule.runs)
    if period < len(rule.runs):   # a pattern repeated per head: repeat it as often as the full axis holds it
        pattern = rule.runs[:period]
        length = sum(size * count for size, count in pattern)
        if shape[axis] % length:
            raise ValueError(
                f"cannot map the run-length groups of '{rule.param}' ({_runs_text(rule.runs)} along axis {axis}) to "
                f"'{name}' (length {shape[axis]}): the repeated pattern of {length} slices does not divide it. The "
                "small model must keep the head size of the full model."
            )
        return Rule(name, "groups", axis=axis, runs=tuple(pattern) * (shape[axis] // length), why=why)
    runs = []
    for size, count in rule.runs:
        covered = size * count * shape[axis]
        if covered % small_shape[axis] or (covered // small_shape[axis]) % size:
            raise ValueError(
                f"cannot map run-length groups {list(map(list, rule.runs))} of '{rule.param}' (axis {axis} of length "
                f"{small_shape[axis]}) to '{name}' (length {shape[axis]}): the run of {count} groups of {size} does "
                "not scale to whole groups. Choose a small instance whose widths divide the full model's."
            )
        runs.append((size, covered // small_shape[axis] // size))
    return Rule(name, "groups", axis=axis, runs=tuple(runs), why=why)


def _runs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return [(s, c) for s, c in runs]


def _structural_path(name: str) -> str:
    return re.sub(r"(?:(?<=\.)|^)\d+(?=\.|$)", "#", name)


def _depths(name: str) -> list[int]:
    return [int(i) for i in re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)]


def _layer_spans(names: Iterable[str]) -> dict[str, list[int]]:
    """Structural path -> largest index at each integer position (the number of layers - 1)."""
    spans: dict[str, list[int]] = {}
    for name in names:
        key, indices = _structural_path(name), _depths(name)
        spans[key] = [max(a, b) for a, b in zip(spans.get(key, indices), indices)]
    return spans


def _relative_depth(name: str, spans: dict[str, list[int]]) -> list[float]:
    return [i / max(span, 1) for i, span in zip(_depths(name), spans[_structural_path(name)])]


def _nearest_depth(name: str, sources: list[str], full_spans: dict, small_spans: dict) -> str:
    """The source at the nearest relative depth (first layer <-> first layer, last <-> last)."""
    target = _relative_depth(name, full_spans)

    def distance(source: str) -> float:
        return sum(abs(a - b) for a, b in zip(_relative_depth(source, small_spans), target))

    return min(sources, key=distance)


def _owner_types(model: nn.Module) -> dict[str, str]:
    """Parameter name -> type name of the module that owns it."""
    types = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            types[f"{module_name}.{param_name}" if module_name else param_name] = type(module).__name__
    return types


def _evidence(grouping: AxisGrouping) -> str:
    zero = f", {grouping.zero_slices} slices without mass" if grouping.zero_slices else ""
    if grouping.stride > 1:
        zero += (f", decided on every {grouping.stride}{'nd' if grouping.stride == 2 else 'th'} slice"
                 + (" (UNSURE: slices 0..stride couple otherwise, measure every slice: max_slices=0)"
                    if grouping.finer else ""))
    cross = f"{grouping.cross_coupling:.3g}" + (f" ± {grouping.cross_error:.2g}" if grouping.cross_error else "")
    if len(grouping.sizes) == 1:
        return f"axis {grouping.axis}: one group (neighbouring slices couple at {cross}{zero})"
    runs = _runs_text(grouping.runs)
    off = f"{grouping.off_block_mass:.1%}" + (f" ± {grouping.off_block_error:.1%}" if grouping.off_block_error else "")
    if grouping.stacked > 1:
        width = len(grouping.sizes) // grouping.stacked
        off += (f", {grouping.stacked_off_mass:.1%} off the pairs of {grouping.stacked} stacked parts "
                f"(slice i with i + {width})")
    return f"axis {grouping.axis}: {runs} (off-block mass {off}, coupling between groups {cross}{zero})"


__all__ = ["DEFAULT_THRESHOLD", "AxisGrouping", "Decider", "Decision", "decide_rule", "derive_decisions",
           "derive_partition", "group_axis", "map_rules", "small_overrides"]
