"""The split of one tensor from its measured evidence: a frozen :class:`Decision` with a structured reason.

Per axis (:func:`group`): the candidates (:mod:`~hessian_blocks.partitions.candidates`) are judged
on the axis' evidence (:mod:`~hessian_blocks.partitions.evidence`).

1. *Split or not*: when even the weakest candidate leaves more than ``threshold`` between its
   groups, the slices are one group.
2. *Which split* (:func:`choose`): among single slices and the candidates whose groups are all
   distinct, the finest wins that cuts through no group of another of them at links coupling, on
   average, more than ``threshold / contrast`` and more than that candidate leaves between its own
   groups: the rows of a head stay together, two heads merged into one group may be split, and
   evenly, weakly coupled slices (value neurons) are split into single slices. Judging a cut by the
   links it cuts, not by a mean over all links, keeps many weak links from hiding a few strong ones.
   *Heads* protect their groups down to ``threshold / contrast**2``: the rows of a key head that
   couple weakly but evenly (0.1-0.2 at initialisation, a thousand times more than across heads)
   stay one block, as a repeated structure, while a single evenly coupled run (the value rows after
   fused heads) is still split. Equal groups beside single slices of a heavier scale (the query and
   key heads of a fused weight beside its value rows) are heads too.
3. A sampled axis is grouped on its sample and the grouping scaled back by the stride; where the
   window (slices 0..stride) shows finer structure, or the sample has groups of only 2 sampled
   slices, the grouping is marked ``finer`` (measure every slice again).
4. *Stacked parts*: single slices of a tensor of two or more axes that leave more than
   ``mass_threshold`` off their blocks are folded into 2-4 equal stacked parts (a fused gate|up
   weight: row i of the gate couples with row i of the up projection).

Per tensor (:func:`decide_rule`, the reasons of :class:`Reason`): the axis whose grouping leaves the
least Hessian mass off its blocks wins (ties: the weaker coupling between groups, more groups, the
lower axis); no axis split: ``"whole"``. A merged run of axes (experts x rows of a 3-D tensor)
refines its axes' groupings, so it always leaves more mass off: it wins when the winner is one of
its axes, each of its axes splits, and its groups nest inside theirs (experts apart, rows apart, and
inside each expert the rows' own grouping: one block per (expert, row), :func:`_merged_run`). When
every axis splits into single slices the coordinates themselves may be decoupled: the sum of the
single axes' off-block mass fractions bounds the off-diagonal mass from above; at most
``mass_threshold`` of it is a near-diagonal Hessian, ``"whole"`` when its diagonal is even
(90th/10th percentile of the slices' diagonal norms at most ``max_spread``: one learning rate fits)
and ``"elements"`` when uneven. A 1-D tensor with more of its mass off the diagonal, spread over
many weak pairs (diffuse coupling), is ``"whole"``; a tensor of two or more axes keeps the split of
its best axis.

A probe estimate is also decided without each of its probes in turn (jackknife, :class:`Confidence`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Sequence

import numpy as np
from scipy import stats

from ..blocks import Axis, Rule, runs_of
from ..choices import (
    DEFAULT_CONTRAST,
    DEFAULT_MASS_THRESHOLD,
    DEFAULT_MAX_RUNS,
    DEFAULT_MAX_SPREAD,
    DEFAULT_THRESHOLD,
)
from . import render
from .candidates import Candidate, Family, candidates, coupling_left
from .coupling import TensorCoupling, axis_order
from .evidence import AxisEvidence, SliceCoupling, nests, off_block_mass, ratios

__all__ = ["AxisErrors", "AxisGrouping", "Confidence", "Decision", "DecisionSettings", "Reason", "StackedParts",
           "choose", "decide_rule", "group", "group_axis"]

RuleKey = tuple  # (split, axis, size, runs): what a rule decides, without its why


@dataclass(frozen=True)
class DecisionSettings:
    """The decision's thresholds, checked once (the CLI's ``--threshold`` ... ``--max-spread``).

    ``threshold``: above it, every grouping of an axis leaves too much coupling and the axis is one
    block. ``contrast``: a distinct group couples inside this many times more than to its
    neighbours; the finest grouping wins that cuts no distinct group at links above ``threshold /
    contrast`` (heads: ``threshold / contrast**2``). ``max_runs``: 1, equal groups only; 2, also
    single slices before or after them and a group and single slices repeated per head.
    ``mass_threshold``: largest off-diagonal mass fraction of a near-diagonal Hessian.
    ``max_spread``: largest 90th/10th percentile ratio of the diagonal for which a near-diagonal
    Hessian is one block, and of the diagonal norms inside a group.
    """

    threshold: float = DEFAULT_THRESHOLD
    contrast: float = DEFAULT_CONTRAST
    max_runs: int = DEFAULT_MAX_RUNS
    mass_threshold: float = DEFAULT_MASS_THRESHOLD
    max_spread: float = DEFAULT_MAX_SPREAD

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0 (a relative coupling), got {self.threshold}")
        if not self.contrast >= 1:
            raise ValueError(f"contrast must be >= 1 (a ratio of couplings), got {self.contrast}")
        if self.max_runs not in (1, 2):
            raise ValueError(f"max_runs must be 1 (equal groups only) or 2 (also a run of single slices), "
                             f"got {self.max_runs}")
        if not self.max_spread >= 1:
            raise ValueError(f"max_spread must be >= 1 (a ratio of diagonal norms), got {self.max_spread}")
        if not 0 <= self.mass_threshold <= 1:
            raise ValueError(f"mass_threshold must be a fraction in [0, 1], got {self.mass_threshold}")


@dataclass(frozen=True)
class StackedParts:
    """Single slices that pair up across ``parts`` equal stacked parts (slice i with i + n/parts, ...),
    leaving ``off_mass`` of the mass off those pairs' blocks."""

    parts: int
    off_mass: float


@dataclass(frozen=True)
class AxisGrouping:
    """The grouping of one axis and its evidence.

    ``axes``: the tensor axes the slices run along (one, or a merged run; see :class:`AxisEvidence`); ``sizes``: group
    sizes along the axis, in order; ``cross_coupling``: mean coupling between
    neighbouring groups (one group: between its slices); ``off_block_mass``: fraction of ||H_WW||_F^2
    outside the groups' diagonal blocks; ``zero_slices``: slices with no Hessian mass; ``spread``:
    90th / 10th percentile of the slices' diagonal norms; ``weakest``: coupling the weakest candidate
    leaves between its groups (above threshold: one group); ``family``: the candidate family of the
    grouping (None: one group); ``stride``: decided on every stride-th slice, with ``sampled_sizes``
    the grouping of that sample (None: every slice) and ``finer`` whether the first stride shows
    structure the sample cannot see; ``stacked``: the stacked parts its single slices pair up across.
    """

    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    cross_coupling: float
    off_block_mass: float
    zero_slices: int
    spread: float
    weakest: float
    family: Family | None = None
    stride: int = 1
    sampled_sizes: tuple[int, ...] | None = None
    finer: bool = False
    stacked: StackedParts | None = None

    @property
    def axis(self) -> Axis:
        """The tensor axis the slices run along, or the merged run (a tuple), as a rule's ``axis``."""
        return self.axes[0] if len(self.axes) == 1 else self.axes

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """Run-length encoding of ``sizes`` as (group size, count) pairs."""
        return runs_of(self.sizes)

    @property
    def single_slices(self) -> bool:
        """Whether every slice is its own group."""
        return len(self.sizes) == sum(self.sizes)

    @property
    def kept_off_mass(self) -> float:
        """The mass the grouping leaves off its blocks, counting stacked pairs as one block."""
        return min(self.off_block_mass, 1.0 if self.stacked is None else self.stacked.off_mass)


def group(evidence: AxisEvidence, settings: DecisionSettings, stacked: bool = False) -> AxisGrouping:
    """The grouping of one axis (see the module docstring); ``stacked``: look for stacked parts where
    the slices stay single (a tensor of two or more axes)."""
    slices = evidence.slices
    found = [c for c in candidates(slices, settings) if evidence.fits(c.sizes)]   # (a merged run: within experts)
    weakest = min(c.cross for c in found)
    if weakest > settings.threshold:                 # every grouping leaves strong coupling: one group
        sample, cross, family = (slices.size,), found[0].cross, None   # report how the single slices couple
    else:
        chosen = choose(slices, [c for c in found if c.distinct], settings)
        sample, cross, family = chosen.sizes, chosen.cross, chosen.family
    stride, finer = evidence.stride, False
    sizes = evidence.scaled(sample)
    if stride > 1:
        finer = _finer(evidence, sizes, cross, settings) or 2 in sample
    off = off_block_mass(evidence.rows, evidence.sample, sizes)
    parts = None
    if stacked and len(sizes) == evidence.length and off > settings.mass_threshold:
        parts = _stacked_parts(evidence.rows, evidence.sample, settings.mass_threshold)
    return AxisGrouping(evidence.axes, sizes, cross, off, evidence.zero_slices, evidence.spread, weakest, family,
                        stride, sample if stride > 1 else None, finer, parts)


def group_axis(coupling: np.ndarray, settings: DecisionSettings | None = None, axis: int = 0) -> AxisGrouping:
    """The grouping of an axis from its symmetric [n, n] slice-coupling matrix C_ij = ||H_ij||_F^2."""
    matrix = np.asarray(coupling, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape != (n, n):
        raise ValueError(f"coupling must be a square matrix, got shape {matrix.shape}")
    return group(AxisEvidence((axis,), n, 1, matrix), settings or DecisionSettings())


def choose(slices: SliceCoupling, eligible: list[Candidate], settings: DecisionSettings) -> Candidate:
    """The finest eligible grouping that cuts no group of another one at strong links (see the
    module docstring); single slices are eligible, so there always is one. Ties: the weaker coupling
    between groups, then the candidates' order."""
    protecting = [c for c in eligible if c.groups < slices.size]
    weak = settings.threshold / settings.contrast
    for candidate in sorted(eligible, key=lambda c: (-c.groups, c.cross)):
        if not any(_cuts(slices, candidate, other, weak / (settings.contrast if other.heads else 1))
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
    cut = ratios(slices.links(edges[inner - 1], edges[inner] - edges[inner - 1], edges[inner + 1] - edges[inner]))
    return bool(cut.mean() > max(weak, grouping.cross))


def _finer(evidence: AxisEvidence, sizes: Sequence[int], cross: float, settings: DecisionSettings) -> bool:
    """Whether slices 0..stride that the scaled-back grouping separates couple distinctly more than
    the sample's groups do (a group of 2 sampled every 4th slice looks like single slices)."""
    window = SliceCoupling(evidence.window)
    separated = np.flatnonzero(np.isin(np.arange(1, evidence.stride + 1), np.cumsum(sizes)))  # link k: k -> k + 1
    mass, weight = window.links(separated, 1, 1).sum(axis=1)
    fine = mass / weight if weight > 0 else 0.0
    return bool(separated.size) and bool(fine > max(settings.threshold / settings.contrast, settings.contrast * cross))


def _stacked_parts(rows: np.ndarray, slices: np.ndarray, mass_threshold: float, most: int = 4) -> StackedParts | None:
    """The fewest equal stacked parts (2 to ``most``) such that pairing slice i with i + n/k, i + 2n/k,
    ... leaves at most ``mass_threshold`` of the mass off those pairs' blocks, from the rows ([k, n])
    of C of the measured ``slices``: the slices are then the finest contiguous blocks the pairs allow,
    and the axis is compared with the others by the mass left off the pairs."""
    n, total = rows.shape[1], rows.sum()
    for parts in range(2, most + 1):
        if n % parts or total <= 0:
            continue
        width = n // parts
        # mass between each measured slice and the slices with its index in any part
        paired = rows.reshape(len(slices), parts, width)[np.arange(len(slices)), :, slices % width].sum()
        off = max(float((total - paired) / total), 0.0)
        if off <= mass_threshold:
            return StackedParts(parts, off)
    return None


class Reason(Enum):
    """Why a tensor gets its rule; the value is how its ``why`` begins (see :func:`render.why`)."""

    ONE_ENTRY = "one entry"
    COUPLED = "slices couple along every axis"
    EVEN_DIAGONAL = ("Hessian near diagonal ({off_diagonal:.0%} off) with an even diagonal (spread {spread:.3g}, "
                     "one learning rate fits)")
    UNEVEN_DIAGONAL = "Hessian near diagonal ({off_diagonal:.0%} off), uneven diagonal (spread {spread:.3g})"
    DIFFUSE = ("no two entries couple strongly, but {off_diagonal:.0%} of the mass is off the diagonal "
               "(diffuse coupling)")
    GROUPS = "groups along axis {axis}"

    @property
    def split(self) -> str:
        """The rule's split: 'groups', 'elements' or 'whole'."""
        return {Reason.GROUPS: "groups", Reason.UNEVEN_DIAGONAL: "elements"}.get(self, "whole")


@dataclass(frozen=True)
class AxisErrors:
    """Jackknife standard errors of one axis' numbers (0: exact)."""

    cross_coupling: float = 0.0
    off_block_mass: float = 0.0
    weakest: float = 0.0


@dataclass(frozen=True)
class Confidence:
    """How a probe estimate's decision holds without each of its probes (jackknife).

    ``agreeing`` of the ``replicates`` leave-one-probe-out estimates give the rule; ``others`` are
    the other rules they give; ``errors`` the standard errors of each grouping's numbers;
    ``near_threshold`` the axes the rule rests on whose weakest coupling lies within the two-sided
    95 % t-interval (``critical`` standard errors) of ``threshold``.
    """

    replicates: int
    agreeing: int
    others: tuple[RuleKey, ...]
    errors: tuple[AxisErrors, ...]
    near_threshold: tuple[int, ...]
    critical: float


@dataclass(frozen=True, eq=False)
class Decision:
    """The split of one tensor: the groupings of every axis it was chosen from, the winning one
    (``chosen``, for ``Reason.GROUPS``), the numbers its reason names, and how it holds without each
    probe (``confidence``; None when exact or from one probe)."""

    coupling: TensorCoupling
    settings: DecisionSettings
    reason: Reason
    groupings: tuple[AxisGrouping, ...] = ()
    chosen: AxisGrouping | None = None
    off_diagonal: float = 0.0
    spread: float = 1.0
    confidence: Confidence | None = None

    @property
    def key(self) -> RuleKey:
        """(split, axis, size, runs): the rule without its ``why``."""
        if self.chosen is None:
            return self.reason.split, None, None, None
        runs = self.chosen.runs
        return ("groups", self.chosen.axis) + ((runs[0][0], None) if len(runs) == 1 else (None, runs))

    @cached_property
    def rule(self) -> Rule:
        """The rule, its ``why`` rendered from the evidence (:func:`render.why`)."""
        split, axis, size, runs = self.key
        return Rule(self.coupling.param, split, axis=axis, size=size, runs=runs, why=render.why(self))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.coupling.shape

    @property
    def products(self) -> int:
        """Hessian-vector products the measurement spent."""
        return self.coupling.products

    @property
    def errors(self) -> tuple[AxisErrors, ...]:
        """Standard errors of each grouping's numbers (zeros: exact, or one probe)."""
        return self.confidence.errors if self.confidence else (AxisErrors(),) * len(self.groupings)

    @property
    def resting(self) -> tuple[AxisGrouping, ...]:
        """The groupings the rule rests on: the split axis', or every axis' when the tensor is not split."""
        return tuple(g for g in self.groupings if self.chosen is None or g.axis == self.chosen.axis)

    @property
    def settled(self) -> bool:
        """Whether the decision holds without any one probe (always, when measured exactly), no axis
        it rests on is one group or split only by chance, and no sampled axis shows structure finer
        than its stride."""
        held = self.confidence is None or (self.confidence.agreeing == self.confidence.replicates
                                           and not self.confidence.near_threshold)
        return held and not any(g.finer for g in self.groupings)


def decide_rule(coupling: TensorCoupling, settings: DecisionSettings | None = None) -> Decision:
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
    settings = settings or DecisionSettings()
    decision = _decide(coupling, settings)
    replicates = coupling.leave_one_out()
    if not replicates:
        return decision
    decided = [_decide(r, settings) for r in replicates]
    errors = []
    for grouping in decision.groupings:
        numbers = np.array([_axis_numbers(r, grouping, settings) for r in replicates])
        cross, off = map(_jackknife_error, numbers.T)
        weakest = _jackknife_error([next(g.weakest for g in d.groupings if g.axis == grouping.axis) for d in decided])
        errors.append(AxisErrors(cross, off, weakest))
    critical = float(stats.t.ppf(0.975, len(replicates) - 1))
    resting = {g.axis for g in decision.resting}
    near = tuple(g.axis for g, e in zip(decision.groupings, errors)
                 if g.axis in resting and abs(g.weakest - settings.threshold) < critical * e.weakest)
    keys = [d.key for d in decided]
    others = tuple(sorted({k for k in keys if k != decision.key}, key=str))
    confidence = Confidence(len(keys), sum(k == decision.key for k in keys), others, tuple(errors), near, critical)
    return Decision(coupling, settings, decision.reason, decision.groupings, decision.chosen, decision.off_diagonal,
                    decision.spread, confidence)


def _decide(coupling: TensorCoupling, settings: DecisionSettings) -> Decision:
    """The decision of one estimate, without the jackknife."""
    shape = coupling.shape
    groupings = tuple(group(AxisEvidence.of(coupling, axis), settings, stacked=len(shape) > 1)
                      for axis in sorted(coupling.axes, key=axis_order))
    if not groupings:  # a single entry
        return Decision(coupling, settings, Reason.ONE_ENTRY)
    split = [g for g in groupings if len(g.sizes) > 1]
    single = [g for g in groupings if len(g.axes) == 1]        # (a merged run refines them: it adds nothing here)
    single_slices = all(g.single_slices for g in single)  # every block would be one coordinate
    # an entry is off the diagonal when it is off the slice-diagonal of some axis: the union bound
    off_diagonal = min(sum(g.off_block_mass for g in single), 1.0)
    near_diagonal = off_diagonal <= settings.mass_threshold
    spread = max(g.spread for g in single)
    chosen = None
    if not split:
        reason = Reason.COUPLED
    elif single_slices and near_diagonal and spread <= settings.max_spread:
        reason = Reason.EVEN_DIAGONAL
    elif single_slices and near_diagonal:
        reason = Reason.UNEVEN_DIAGONAL
    elif single_slices and len(single) == 1:
        reason = Reason.DIFFUSE
    else:
        reason = Reason.GROUPS
        chosen = _merged_run(min(split, key=lambda g: (g.kept_off_mass, g.cross_coupling, -len(g.sizes), g.axes)),
                             groupings)
    return Decision(coupling, settings, reason, groupings, chosen, off_diagonal, spread)


def _axis_numbers(replicate: TensorCoupling, grouping: AxisGrouping, settings: DecisionSettings) -> tuple[float, float]:
    """(coupling between groups, off-block mass) of ``grouping`` on another estimate of its axis."""
    evidence = AxisEvidence.of(replicate, grouping.axis)
    return (coupling_left(evidence.slices, grouping.sampled_sizes or grouping.sizes, grouping.family, settings),
            off_block_mass(evidence.rows, evidence.sample, grouping.sizes))


def _jackknife_error(values: Sequence[float]) -> float:
    """Jackknife standard error from leave-one-out values: sqrt((k - 1) / k * sum (v - mean)^2)."""
    values = np.asarray(values, dtype=np.float64)
    k = len(values)
    return float(np.sqrt((k - 1) / k * np.sum((values - values.mean()) ** 2))) if k > 1 else 0.0


def _merged_run(chosen: AxisGrouping, groupings: Sequence[AxisGrouping]) -> AxisGrouping:
    """A merged run of axes that splits, whose axes each split and whose groups nest inside theirs, in
    place of ``chosen`` when that is one of its axes (see the module docstring)."""
    for merged in (g for g in groupings if len(g.axes) > 1 and len(g.sizes) > 1 and chosen.axes[0] in g.axes):
        parts = [next((g for g in groupings if g.axes == (axis,)), None) for axis in merged.axes]
        if len(chosen.axes) == 1 and all(p is not None and len(p.sizes) > 1 for p in parts) \
                and nests(merged.sizes, [p.sizes for p in parts]):
            return merged
    return chosen
