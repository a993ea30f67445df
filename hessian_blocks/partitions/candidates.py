"""Candidate groupings of one axis, one named family at a time.

Every candidate is a *regular* contiguous grouping of the slices of an axis (rows, columns, tokens):

- :data:`Family.SINGLE_SLICES`: every slice its own group; always a candidate.
- :data:`Family.EQUAL_GROUPS`: two or more groups of one size tiling the axis (heads).
- :data:`Family.GROUPS_WITH_SINGLES` (``max_runs`` = 2): equal groups followed or preceded by single
  slices (a fused q|k|v weight: heads of q and k, then the neurons of v).
- :data:`Family.REPEATED` (``max_runs`` = 2): one group followed or preceded by single slices,
  repeated every ``period`` slices (rows interleaved per head, GPT-NeoX's [q_h, k_h, v_h]: a q|k
  block, then the value rows).

A group is *distinct* when it couples inside at least ``contrast`` times more than across the
stronger of the links to its neighbours (a group that cuts through a head is not, nor is a group
laid over evenly coupled slices). The comparison takes the couplings as measured, above 1 included:
rows of a query and a key head couple thousands of times more with each other than with their value
rows, which still couple with them above 1. Each family states which of its groupings it keeps, and
:func:`candidates` states, in one place, which family is tried when and which rules out another.

A new family is a function here returning its kept :class:`Candidate` objects (with an ``order``
that places it among the others), called from :func:`candidates`; the decision
(:mod:`~hessian_blocks.partitions.decide`) takes any candidate list.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .evidence import SliceCoupling, ratios

if TYPE_CHECKING:
    from .decide import DecisionSettings

__all__ = ["Candidate", "Family", "candidates", "equal_groups", "groups_with_singles", "repeated_layouts",
           "single_slices"]


class Family(Enum):
    """The named families of regular groupings."""

    SINGLE_SLICES = "single slices"
    EQUAL_GROUPS = "equal groups"
    GROUPS_WITH_SINGLES = "groups with single slices"
    REPEATED = "repeated per-head layout"


@dataclass(frozen=True)
class Candidate:
    """A regular grouping of an axis (its group sizes in order), the mean coupling of its links, and
    whether every group in it is distinct from its neighbours (single slices always are).

    ``heads``: equal distinct groups tiling the axis, each evenly coupled inside. ``period``: the
    slices of one repetition of a repeated layout (0: not repeated); ``two_scales``: its single slices
    and its groups differ in median diagonal norm by more than ``max_spread``. ``order``: the position
    among all candidates (period, group size, group count, singles first), which breaks ties.
    """

    family: Family
    sizes: tuple[int, ...]
    cross: float
    distinct: bool
    order: tuple[int, int, int, int]
    heads: bool = False
    period: int = 0
    two_scales: bool = False

    @property
    def groups(self) -> int:
        return len(self.sizes)


def candidates(slices: SliceCoupling, settings: DecisionSettings) -> list[Candidate]:
    """Every candidate grouping of an axis, single slices first, in :attr:`Candidate.order`.

    Groupings with single slices are the contiguous form of a fused weight; a repeated layout is its
    interleaved form, tried only when no contiguous one is kept (a fused GPT-2 ``c_attn`` repeats its
    first query head every 48 columns too). Where a repeated layout's single slices and groups
    differ in scale, the equal groups tiling whole periods are dropped: a block of a query, key and
    value head would give value rows and query rows of a hundredth of their norm one learning rate,
    though it keeps more Hessian mass. (A scale test on every tiling would split real heads: a query
    head's rows spread their norms up to 14 times at initialisation.)
    """
    contrast, max_spread = settings.contrast, settings.max_spread
    found = [single_slices(slices), *equal_groups(slices, contrast)]
    if settings.max_runs >= 2:
        fused = groups_with_singles(slices, contrast, max_spread)
        repeated = [] if fused else repeated_layouts(slices, contrast, max_spread)
        if any(c.two_scales for c in repeated):
            period = repeated[0].period
            found = [c for c in found if c.family is not Family.EQUAL_GROUPS or c.sizes[0] % period]
        found += fused + repeated
    return sorted(found, key=lambda c: c.order)


def single_slices(slices: SliceCoupling) -> Candidate:
    """Every slice its own group: its links are the neighbouring slices' couplings (capped at 1)."""
    n = slices.size
    single = ratios(slices.links(np.arange(n - 1), 1, 1))               # link i: slice i -> slice i + 1
    return Candidate(Family.SINGLE_SLICES, (1,) * n, float(single.mean()) if n > 1 else 0.0, True, (0, 1, n, 0))


def equal_groups(slices: SliceCoupling, contrast: float) -> list[Candidate]:
    """Two or more groups of one size tiling the axis, distinct or not (a grouping that is not distinct
    still bounds how weakly the axis can be split at all). *Heads* are distinct groups of at least 4
    slices each coupled evenly inside (:func:`_even_inside`)."""
    n, found = slices.size, []
    for size in range(2, n // 2 + 1):
        if n % size == 0:
            layout = (size,) * (n // size)
            cross, distinct = _links(slices, layout, contrast)
            heads = distinct and _even_inside(slices, np.arange(0, n, size), size)
            found.append(Candidate(Family.EQUAL_GROUPS, layout, cross, distinct, (0, size, n // size, 0), heads))
    return found


def groups_with_singles(slices: SliceCoupling, contrast: float, max_spread: float) -> list[Candidate]:
    """Two or more equal groups followed or preceded by single slices, kept only when every group is
    distinct and of one scale (:func:`_one_scale`): the value rows beside a query and key head couple
    with them above 1 too, relative to the heads' tiny diagonal, but carry a hundred to a thousand
    times their norm."""
    n, found = slices.size, []
    for size in range(2, n // 2 + 1):
        for count in range(2, n // size + 1):
            rest = n - size * count
            if not rest:
                continue
            for singles_first, layout in enumerate([(size,) * count + (1,) * rest, (1,) * rest + (size,) * count]):
                cross, distinct = _links(slices, layout, contrast)
                if distinct and _one_scale(slices, layout, max_spread):
                    found.append(Candidate(Family.GROUPS_WITH_SINGLES, layout, cross, True,
                                           (0, size, count, singles_first)))
    return found


def repeated_layouts(slices: SliceCoupling, contrast: float, max_spread: float) -> list[Candidate]:
    """One group followed or preceded by single slices, repeated to tile the axis, at the shortest
    period that has any kept: a pattern repeats per head, and a longer period would leave some heads
    as single slices. A repeated layout places its groups more freely, so they must be distinct by
    ``contrast**2`` (a query and key head: by 1,000 or more at initialisation; chance groups in a
    norm scale's noise: by 5-8), and of one scale."""
    n = slices.size
    for period in range(3, n // 2 + 1):
        if n % period:
            continue
        found = []
        for size in range(2, period):
            singles = (1,) * (period - size)
            for singles_first, pattern in enumerate([(size, *singles), (*singles, size)]):
                layout = pattern * (n // period)
                cross, distinct = _links(slices, layout, contrast ** 2)
                if distinct and _one_scale(slices, layout, max_spread):
                    found.append(Candidate(Family.REPEATED, layout, cross, True, (period, size, n // period,
                                                                                   singles_first),
                                           period=period, two_scales=_two_scales(slices, layout, max_spread)))
        if found:
            return found
    return []


def _links(slices: SliceCoupling, layout: Sequence[int], contrast: float) -> tuple[float, bool]:
    """(mean coupling of the links between neighbouring groups, capped at 1; whether every group of
    more than one slice couples inside at least ``contrast`` times more than its stronger link)."""
    sizes = np.array(layout)
    starts = np.cumsum(sizes) - sizes
    grouped = sizes > 1
    links = ratios(slices.links(starts[:-1], sizes[:-1], sizes[1:]), cap=np.inf)   # group i -> group i + 1
    around = np.concatenate([[0.0], links, [0.0]])
    inside = ratios(slices.inside(starts[grouped], sizes[grouped]), cap=np.inf)
    distinct = bool(np.all(inside >= contrast * np.maximum(around[:-1], around[1:])[grouped]))
    return float(np.minimum(links, 1.0).mean()), distinct


def _one_scale(slices: SliceCoupling, layout: Sequence[int], max_spread: float) -> bool:
    """Whether no slice of a group (all of one size) has a diagonal norm above ``max_spread`` times its
    group's median: the group takes in no neighbouring slice of another scale, and one learning rate
    fits it. Lighter slices are not held against it (their relative couplings are noisy and they
    carry little mass, like slices without mass, which are left out)."""
    sizes = np.array(layout)
    starts = (np.cumsum(sizes) - sizes)[sizes > 1]
    norms = slices.norms[starts[:, None] + np.arange(sizes.max())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # a group without mass has no median: no evidence
        median = np.nanmedian(norms, axis=1, keepdims=True)
    return not np.any(norms > max_spread * median)        # nan compares False


def _two_scales(slices: SliceCoupling, layout: Sequence[int], max_spread: float) -> bool:
    """Whether the single slices of a grouping have a median diagonal norm more than ``max_spread``
    times the median of its grouped slices, or less than 1 / ``max_spread`` of it (value rows beside
    query and key rows: a hundred to a thousand times)."""
    sizes = np.array(layout)
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
    return bool(2 * ratios(between[:, None])[0] >= ratios(inside[:, None])[0])
