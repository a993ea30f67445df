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
rows, which still couple with them above 1. A group is not held to a link that says nothing of where
it ends (:func:`_telling`: the link to a run of single slices of another scale, and a link to a group
that couples as strongly with a third group distinct from this one, like the one key head of
multi-query attention beside the last of the query heads it is shared by). Each family states which
of its groupings it keeps, and :func:`candidates` states, in one place, which family is tried when
and which rules out another.

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

__all__ = ["Candidate", "Family", "candidates", "coupling_left", "equal_groups", "groups_with_singles",
           "repeated_layouts", "single_slices"]


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

    ``heads``: equal distinct groups, each evenly coupled inside, tiling the axis or beside single
    slices of more than ``max_spread`` times their median diagonal norm (the query and key heads of
    a fused weight beside its value rows). ``period``: the
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
    found = [single_slices(slices), *equal_groups(slices, settings)]
    if settings.max_runs >= 2:
        fused = groups_with_singles(slices, settings)
        repeated = [] if fused else repeated_layouts(slices, settings)
        if any(c.two_scales for c in repeated):
            period = repeated[0].period
            found = [c for c in found if c.family is not Family.EQUAL_GROUPS or c.sizes[0] % period]
        found += fused + repeated
    return sorted(found, key=lambda c: c.order)


def coupling_left(slices: SliceCoupling, sizes: Sequence[int], family: Family | None,
                  settings: DecisionSettings) -> float:
    """The coupling a grouping of ``family`` leaves between its groups (:attr:`Candidate.cross`) on the
    evidence ``slices`` (another estimate of the axis); one group (``family`` None): the coupling
    between single slices, which the decision reports for it."""
    if family is None or len(sizes) == slices.size:
        return single_slices(slices).cross
    return _links(slices, sizes, settings.contrast ** (2 if family is Family.REPEATED else 1), settings)[0]


def single_slices(slices: SliceCoupling) -> Candidate:
    """Every slice its own group: its links are the neighbouring slices' couplings (capped at 1)."""
    n = slices.size
    single = ratios(slices.links(np.arange(n - 1), 1, 1))               # link i: slice i -> slice i + 1
    return Candidate(Family.SINGLE_SLICES, (1,) * n, float(single.mean()) if n > 1 else 0.0, True, (0, 1, n, 0))


def equal_groups(slices: SliceCoupling, settings: DecisionSettings) -> list[Candidate]:
    """Two or more groups of one size tiling the axis, distinct or not (a grouping that is not distinct
    still bounds how weakly the axis can be split at all). *Heads* are distinct groups of at least 4
    slices each coupled evenly inside (:func:`_even_inside`)."""
    n, found = slices.size, []
    for size in range(2, n // 2 + 1):
        if n % size == 0:
            layout = (size,) * (n // size)
            cross, distinct = _links(slices, layout, settings.contrast, settings)
            heads = distinct and _even_inside(slices, np.arange(0, n, size), size)
            found.append(Candidate(Family.EQUAL_GROUPS, layout, cross, distinct, (0, size, n // size, 0), heads))
    return found


def groups_with_singles(slices: SliceCoupling, settings: DecisionSettings) -> list[Candidate]:
    """Two or more equal groups followed or preceded by single slices, kept only when every group is
    distinct and of one scale (:func:`_one_scale`): the value rows beside a query and key head couple
    with them above 1 too, relative to the heads' tiny diagonal, but carry a hundred to a thousand
    times their norm. Evenly coupled groups beside single slices of such a heavier scale are *heads*
    (they keep their groups down to ``threshold / contrast**2``: a query head of multi-query attention
    couples inside at 0.03-0.3 at initialisation, the key head shared by all of them at 0.05-0.1)."""
    n, found = slices.size, []
    for size in range(2, n // 2 + 1):
        for count in range(2, n // size + 1):
            rest = n - size * count
            if not rest:
                continue
            for singles_first, layout in enumerate([(size,) * count + (1,) * rest, (1,) * rest + (size,) * count]):
                cross, distinct = _links(slices, layout, settings.contrast, settings)
                if distinct and _one_scale(slices, layout, settings.max_spread):
                    starts = np.arange(count) * size + (rest if singles_first else 0)
                    heads = (_scale_ratio(slices, np.array(layout)) > settings.max_spread   # nan compares False
                             and _even_inside(slices, starts, size))
                    found.append(Candidate(Family.GROUPS_WITH_SINGLES, layout, cross, True,
                                           (0, size, count, singles_first), heads))
    return found


def repeated_layouts(slices: SliceCoupling, settings: DecisionSettings) -> list[Candidate]:
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
                cross, distinct = _links(slices, layout, settings.contrast ** 2, settings)
                if distinct and _one_scale(slices, layout, settings.max_spread):
                    found.append(Candidate(Family.REPEATED, layout, cross, True, (period, size, n // period,
                                                                                   singles_first),
                                           period=period, two_scales=_two_scales(slices, layout, settings.max_spread)))
        if found:
            return found
    return []


def _links(slices: SliceCoupling, layout: Sequence[int], contrast: float,
           settings: DecisionSettings) -> tuple[float, bool]:
    """(mean coupling of the links between neighbouring groups, capped at 1; whether every group of
    more than one slice is distinct: couples inside at least ``contrast`` times more than its stronger
    link or, where a link says nothing of where the group ends (:func:`_telling`), than its stronger
    telling link and at least ``threshold / contrast**2``, the coupling down to which heads keep their
    groups). A grouping distinct only so leaves the coupling of its telling links between its groups:
    the others are cut by every grouping that separates those groups."""
    sizes = np.array(layout)
    starts = np.cumsum(sizes) - sizes
    grouped = sizes > 1
    links = ratios(slices.links(starts[:-1], sizes[:-1], sizes[1:]), cap=np.inf)   # group i -> group i + 1
    inside = np.zeros(len(sizes))
    inside[grouped] = ratios(slices.inside(starts[grouped], sizes[grouped]), cap=np.inf)

    def failing(links: np.ndarray) -> np.ndarray:
        around = np.concatenate([[0.0], links, [0.0]])
        return grouped & (inside < contrast * np.maximum(around[:-1], around[1:]))

    said = np.ones(len(links), dtype=bool)
    held = failing(links)
    if held.any():
        said = _telling(slices, sizes, starts, inside, links, contrast, settings.max_spread)
        held &= failing(np.where(said, links, 0.0)) | (inside < settings.threshold / settings.contrast ** 2)
    capped = np.minimum(links, 1.0)
    if held.any():
        return float(capped.mean()), False
    return float(capped[said].mean()) if said.any() else 0.0, True


def _telling(slices: SliceCoupling, sizes: np.ndarray, starts: np.ndarray, inside: np.ndarray, links: np.ndarray,
             contrast: float, max_spread: float) -> np.ndarray:
    """Which links between neighbouring groups say where a group ends. Two kinds do not:

    - where the single slices of a grouping form one run (a fused weight's value rows) with more than
      ``max_spread`` times the median diagonal norm of its groups, the link between that run and the
      group beside it, when the slice beside the group has more than ``max_spread`` times the group's
      median norm: no group of one scale takes that slice in (the one key head of multi-query
      attention beside the value rows, of ten thousand times its norm);
    - a link between two groups that couple more than ``contrast`` times more with each other than
      inside either, when one of them, of one scale (the 90th/10th percentile of its diagonal norms at
      most ``max_spread``), couples within ``contrast`` as strongly with a third group that is distinct
      from the other (``contrast`` times more inside each than between them): the one key head of
      multi-query attention couples with every query head a thousand times more than inside itself,
      and no contiguous block holds it with all of them, so its neighbour says nothing about where a
      query head ends. (GPT-NeoX's query and key head couple with no third group; a group of the key
      head and the value rows, of two scales, is no shared head.)
    """
    telling, single = np.ones(len(links), dtype=bool), sizes == 1
    boundary = np.flatnonzero(single[:-1] != single[1:])   # links between a group and a single slice
    if boundary.size == 1 and _scale_ratio(slices, sizes) > max_spread:   # nan (no mass) compares False
        (link,) = boundary
        group, beside = (link, link + 1) if single[link + 1] else (link + 1, link)
        if slices.norms[starts[beside]] > max_spread * _median_norm(slices, starts[group], sizes[group]):
            telling[link] = False
    grouped = np.flatnonzero(~single)
    strong = ~single[:-1] & ~single[1:] & (links > contrast * np.maximum(inside[:-1], inside[1:]))
    for link in np.flatnonzero(strong):
        third = grouped[(grouped != link) & (grouped != link + 1)]
        for hub, other in ((link, link + 1), (link + 1, link)):
            if slices.spread(starts[hub], sizes[hub]) > max_spread:
                continue
            with_hub = ratios(slices.between(starts[hub], sizes[hub], starts[third], sizes[third]), cap=np.inf)
            with_other = ratios(slices.between(starts[other], sizes[other], starts[third], sizes[third]), cap=np.inf)
            if np.any((contrast * with_hub >= links[link])
                      & (contrast * with_other <= np.minimum(inside[other], inside[third]))):
                telling[link] = False
    return telling


def _one_scale(slices: SliceCoupling, layout: Sequence[int], max_spread: float) -> bool:
    """Whether no group (all of one size) takes in slices of another scale: slices with diagonal norms
    above ``max_spread`` times the group's median at either end of it, or two such slices side by side
    anywhere in it (the value rows of a head between two query and key heads). One learning rate then
    fits the group. A single heavier slice inside a group is not another scale: a query head's rows
    spread their norms 10-14 times at initialisation, while value rows come in runs of a head's rows,
    with a hundred to ten thousand times their norm. Lighter slices are not held against a group
    (their relative couplings are noisy and they carry little mass, like slices without mass, which are
    left out)."""
    sizes = np.array(layout)
    starts = (np.cumsum(sizes) - sizes)[sizes > 1]
    norms = slices.norms[starts[:, None] + np.arange(sizes.max())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # a group without mass has no median: no evidence
        median = np.nanmedian(norms, axis=1, keepdims=True)
    heavy = norms > max_spread * median                     # nan compares False
    at_an_end = np.logical_and.accumulate(heavy, axis=1) | np.logical_and.accumulate(heavy[:, ::-1], axis=1)
    in_a_run = heavy[:, 1:] & heavy[:, :-1]                 # two heavy neighbours: a run of another scale
    return not (np.any(at_an_end) or np.any(in_a_run))


def _two_scales(slices: SliceCoupling, layout: Sequence[int], max_spread: float) -> bool:
    """Whether the single slices of a grouping have a median diagonal norm more than ``max_spread``
    times the median of its grouped slices, or less than 1 / ``max_spread`` of it (value rows beside
    query and key rows: a hundred to a thousand times)."""
    ratio = _scale_ratio(slices, np.array(layout))
    return bool(ratio > max_spread or ratio * max_spread < 1)


def _median_norm(slices: SliceCoupling, start: int, size: int) -> float:
    """The median diagonal norm of the slices start:start+size (nan: no mass)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # a group without mass has no median: no evidence
        return float(np.nanmedian(slices.norms[start:start + size]))


def _scale_ratio(slices: SliceCoupling, sizes: np.ndarray) -> float:
    """Median diagonal norm of the single slices of a grouping over that of its grouped slices (nan:
    no single slices, or no mass on one side)."""
    in_group = np.repeat(sizes > 1, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # no mass on one side: no evidence
        return float(np.nanmedian(slices.norms[~in_group]) / np.nanmedian(slices.norms[in_group]))


def _even_inside(slices: SliceCoupling, starts: np.ndarray, size: int) -> bool:
    """Whether groups of ``size`` (at least 4) at ``starts`` couple evenly inside: their two halves couple
    with each other at least half as much as inside themselves (not two heads, not a band of neighbours)."""
    if size < 4:
        return False
    half = size // 2
    inside = slices.inside(starts, half).sum(axis=1) + slices.inside(starts + half, size - half).sum(axis=1)
    between = slices.links(starts, half, size - half).sum(axis=1)
    return bool(2 * ratios(between[:, None])[0] >= ratios(inside[:, None])[0])
