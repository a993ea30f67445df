"""Derive Adam-mini's partition from the measured Hessian structure, never from parameter names.

For every parameter tensor, :mod:`hessian_blocks.coupling` measures the slice coupling
C_ij = ||H_ij||_F^2 along each axis (H the within-tensor Hessian; i, j slices along the axis: rows,
columns, tokens, ...). The decision looks only at these numbers and the tensor's shape. It works
with the *relative coupling* K_ij = C_ij / sqrt(C_ii C_jj), the mass between two slices against
the mass of their own diagonal blocks (0 where a slice has no mass: no evidence of coupling).

Along each axis (:func:`group_axis`):

1. *Merge*: neighbouring groups are merged, strongest first, while their mean relative coupling
   exceeds ``threshold / 4`` (generous: step 2 removes groups that are not blocks). Groups stay
   contiguous, so only couplings between neighbouring slices shape them.
2. *Keep distinct groups only*: a merged group is kept when its inside coupling is at least
   ``contrast`` times its coupling to each neighbouring group (an attention head against the next
   head); otherwise it is a chain of strongly coupled pairs in a uniformly coupled background and
   goes back to single slices. A group spanning the whole axis is kept when its inside coupling
   exceeds ``threshold``.
3. *Accept*: the grouping stands when the mean relative coupling between neighbouring groups is
   at most ``threshold`` (the off-block-diagonal mass is small against the diagonal blocks) and
   it is regular: at most ``max_runs`` runs of equal groups (a fused q|k|v weight is two runs:
   heads of q and k, then single neurons of v), each run of multi-slice groups repeating (heads
   come in numbers; a lone cluster among single slices is not a block pattern). Otherwise the axis is split into single slices
   when no two neighbouring slices couple by more than ``threshold`` (the groups were scattered
   weak pairs), and is one group when some do.

Per tensor (:func:`decide_rule`): the axis whose grouping leaves the weakest coupling between
groups wins (ties: more groups, then the lower axis). No axis split: ``"whole"``. Single slices
along every axis (for a tensor of two or more axes, with at most ``mass_threshold`` of the
Frobenius mass off the diagonal on each axis): ``"elements"`` (a one-coordinate block cannot hide any coupling, so most of the mass must
be diagonal). Every rule's ``why`` records each axis' grouping, its off-block mass fraction, the
coupling left between groups, slices without mass, and how the Hessian was measured.

Slices with no Hessian mass (embedding rows of tokens absent from the data) carry no evidence:
they couple with nothing, stay single, and are counted in ``why``.

A model too large to measure is measured on a smaller instance of the same architecture (fewer
layers, narrower, same head size); :func:`map_rules` carries the rules over to the full model by
module structure (parameter path with layer indices abstracted, module type, shape pattern).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .blocks import Partition, Rule, trainable_shapes
from .coupling import TensorCoupling, measure_coupling

DEFAULT_THRESHOLD = 0.5
DEFAULT_MASS_THRESHOLD = 0.5
DEFAULT_CONTRAST = 10.0
DEFAULT_MAX_RUNS = 2
Batch = tuple[Any, torch.Tensor]


@dataclass
class AxisGrouping:
    """The finest contiguous grouping of one axis and its evidence."""

    axis: int
    sizes: list[int]            # group sizes along the axis, in order
    cross_coupling: float       # mean relative coupling between neighbouring groups (one group: slices)
    off_block_mass: float       # fraction of ||H_WW||_F^2 outside the groups' diagonal blocks
    zero_slices: int            # slices with no Hessian mass

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

    @property
    def evidence(self) -> str:
        """The chosen axis' evidence in a few words (off-block mass, coupling left between groups)."""
        chosen = [g for g in self.groupings if self.rule.split == "groups" and g.axis == self.rule.axis]
        shown = chosen or self.groupings
        return "; ".join(_evidence(g) for g in shown) if shown else "one entry"

    @property
    def summary(self) -> str:
        """The split in a few words: 'whole', 'elements', 'axis 0: 4 x 8', 'axis 1: 8 x 2, 16 x 1'."""
        rule = self.rule
        if rule.split != "groups":
            return rule.split
        runs = [(rule.size, self.shape[rule.axis] // rule.size)] if rule.size is not None else list(rule.runs)
        return f"axis {rule.axis}: " + ", ".join(f"{count} x {size}" for size, count in runs)


def check_settings(threshold: float, contrast: float, max_runs: int, mass_threshold: float) -> None:
    """Refuse decision settings that make no sense, before anything is measured."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (a relative coupling), got {threshold}")
    if not contrast >= 1:
        raise ValueError(f"contrast must be >= 1 (inside vs neighbour coupling), got {contrast}")
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    if not 0 <= mass_threshold <= 1:
        raise ValueError(f"mass_threshold must be a fraction in [0, 1], got {mass_threshold}")


def relative_coupling(coupling: np.ndarray) -> np.ndarray:
    """K_ij = C_ij / sqrt(C_ii C_jj): slice coupling relative to the slices' own blocks.

    Independent of the slices' scale. Pairs involving a slice without mass (C_ii = 0) get 0: no
    evidence of coupling. K can exceed 1 where the Hessian is indefinite with a weak diagonal.
    """
    matrix = np.asarray(coupling, dtype=np.float64)
    diagonal = np.clip(np.diag(matrix), 0.0, None)
    scale = diagonal.max(initial=0.0)
    massless = diagonal <= 1e-12 * scale if scale > 0 else np.ones_like(diagonal, dtype=bool)
    norm = np.sqrt(np.outer(diagonal, diagonal))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(massless[:, None] | massless[None, :], 0.0, matrix / norm)
    return relative


def group_axis(
    coupling: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    contrast: float = DEFAULT_CONTRAST,
    max_runs: int = DEFAULT_MAX_RUNS,
    axis: int = 0,
) -> AxisGrouping:
    """The finest contiguous grouping of the slices of one axis (see the module docstring).

    ``coupling`` is the symmetric [n, n] matrix C_ij = ||H_ij||_F^2 between slices.
    """
    check_settings(threshold, contrast, max_runs, DEFAULT_MASS_THRESHOLD)
    matrix = np.asarray(coupling, dtype=np.float64)
    n = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape != (n, n):
        raise ValueError(f"coupling must be a square matrix, got shape {matrix.shape}")
    relative = relative_coupling(matrix)
    segments = _keep_distinct(relative, _merge_adjacent(relative, threshold / 4), threshold, contrast)
    cross = _neighbour_coupling(relative, segments)
    if cross > threshold or not _regular(segments, max_runs):
        singles = [(i, i + 1) for i in range(n)]
        neighbours = np.diagonal(relative, offset=1)
        if neighbours.size and neighbours.max() <= threshold:  # scattered pairs below threshold: single slices
            segments, cross = singles, _neighbour_coupling(relative, singles)
        else:
            segments = [(0, n)]
    if len(segments) == 1:  # report how strongly the slices couple
        cross = _neighbour_coupling(relative, [(i, i + 1) for i in range(n)])
    total = matrix.sum()
    inside = sum(matrix[a:b, a:b].sum() for a, b in segments)
    off = float((total - inside) / total) if total > 0 else 0.0
    scale = np.abs(matrix).max(initial=0.0)
    zero = int(np.sum(np.diag(matrix) <= 1e-12 * scale)) if scale > 0 else n
    return AxisGrouping(axis, [b - a for a, b in segments], cross, off, zero)


def _merge_adjacent(relative: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Merge neighbouring groups, strongest first, while their mean relative coupling exceeds ``threshold``."""
    n = relative.shape[0]
    block_mean = _block_means(relative)
    segments = [(i, i + 1) for i in range(n)]
    between = [block_mean(segments[k], segments[k + 1]) for k in range(n - 1)]
    while between:
        k = int(np.argmax(between))
        if between[k] <= threshold:
            break
        segments[k : k + 2] = [(segments[k][0], segments[k + 1][1])]
        del between[k]
        if k > 0:
            between[k - 1] = block_mean(segments[k - 1], segments[k])
        if k < len(between):
            between[k] = block_mean(segments[k], segments[k + 1])
    return segments


def _block_means(relative: np.ndarray) -> Callable[[tuple[int, int], tuple[int, int]], float]:
    """Mean of ``relative`` over a block of slices, in O(1) from 2-D prefix sums."""
    prefix = np.zeros((relative.shape[0] + 1, relative.shape[1] + 1))
    prefix[1:, 1:] = relative.cumsum(0).cumsum(1)

    def mean(rows: tuple[int, int], cols: tuple[int, int]) -> float:
        (a, b), (c, d) = rows, cols
        return float(prefix[b, d] - prefix[a, d] - prefix[b, c] + prefix[a, c]) / ((b - a) * (d - c))

    return mean


def _keep_distinct(
    relative: np.ndarray, segments: list[tuple[int, int]], threshold: float, contrast: float
) -> list[tuple[int, int]]:
    """Dissolve merged groups that are not distinct from their neighbours.

    A group is kept when the mean coupling inside it is at least ``contrast`` times its mean
    coupling to each neighbouring group (a group spanning the whole axis: when its inside coupling
    exceeds ``threshold``). Otherwise it is a chain of pairs in a uniformly coupled background, not
    a block, and goes back to single slices.
    """
    kept = []
    for k, (a, b) in enumerate(segments):
        if b - a == 1:
            kept.append((a, b))
            continue
        inside = relative[a:b, a:b]
        within = (inside.sum() - np.trace(inside)) / ((b - a) * (b - a - 1))
        neighbours = [relative[a:b, c:d].mean() for c, d in segments[max(k - 1, 0) : k + 2] if (c, d) != (a, b)]
        distinct = within >= contrast * max(neighbours) if neighbours else within > threshold
        kept.extend([(a, b)] if distinct else [(i, i + 1) for i in range(a, b)])
    return kept


def _neighbour_coupling(relative: np.ndarray, segments: list[tuple[int, int]]) -> float:
    """Mean relative coupling between neighbouring groups (0 for one group)."""
    pairs = [relative[a:b, c:d].mean() for (a, b), (c, d) in zip(segments, segments[1:])]
    return float(np.mean(pairs)) if pairs else 0.0


def decide_rule(
    coupling: TensorCoupling,
    threshold: float = DEFAULT_THRESHOLD,
    contrast: float = DEFAULT_CONTRAST,
    max_runs: int = DEFAULT_MAX_RUNS,
    mass_threshold: float = DEFAULT_MASS_THRESHOLD,
) -> Decision:
    """The split of one tensor from its measured slice couplings (shapes and numbers only)."""
    shape = coupling.shape
    groupings = [group_axis(matrix, threshold, contrast, max_runs, axis) for axis, matrix in sorted(coupling.axes.items())]
    method = f"{coupling.method}, {coupling.products} HVPs"
    if not groupings:  # a single entry
        rule = Rule(coupling.param, "whole", why=f"one entry ({method})")
        return Decision(rule, shape, coupling.method, coupling.products, [], coupling)
    evidence = "; ".join(_evidence(g) for g in groupings)
    split = [g for g in groupings if len(g.sizes) > 1]
    if not split:
        rule = Rule(coupling.param, "whole", why=f"slices couple along every axis: {evidence} ({method})")
    elif len(split) == len(groupings) and all(len(g.sizes) == shape[g.axis] for g in groupings) \
            and (len(groupings) == 1 or max(g.off_block_mass for g in groupings) <= mass_threshold):
        rule = Rule(coupling.param, "elements", why=f"Hessian near diagonal: {evidence} ({method})")
    else:
        best = min(split, key=lambda g: (g.cross_coupling, -len(g.sizes), g.axis))
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
    **measure: Any,
) -> list[Decision]:
    """Measure every trainable tensor (or ``params=[...]``) and decide its split, with the evidence.

    ``measure`` goes to :func:`~hessian_blocks.coupling.measure_coupling` (``params``, ``method``,
    ``probes``, ``dense_max``, ``seed``, ``dtype``, ``device``, ``strategy``, ``progress``).
    """
    check_settings(threshold, contrast, max_runs, mass_threshold)
    couplings = measure_coupling(model, loss_fn, data, **measure)
    return [decide_rule(c, threshold, contrast, max_runs, mass_threshold) for c in couplings.values()]


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
        **settings: decision thresholds ``threshold`` (0.5: largest mean relative coupling left
            between neighbouring blocks), ``contrast`` (10: how much stronger a merged group's
            inside coupling must be than its coupling to its neighbours), ``max_runs`` (2),
            ``mass_threshold`` (0.5: largest off-diagonal mass fraction for "elements"), and the
            measurement options of :func:`~hessian_blocks.coupling.measure_coupling` (``method``,
            ``probes`` = 4, ``dense_max`` = 1024, ``seed``, ``dtype``, ``device``, ``strategy``,
            ``progress``).
    """
    if "params" in settings:
        raise ValueError("derive_partition measures every parameter; use derive_decisions(params=...) for a subset")
    if small is None:
        return Partition.from_rules(model, [d.rule for d in derive_decisions(model, loss_fn, data, **settings)])
    decisions = derive_decisions(small, loss_fn, data if small_data is None else small_data, **settings)
    return Partition.from_rules(model, map_rules(small, [d.rule for d in decisions], model))


# ------------------------------------------------------------------ mapping small -> full


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
    runs = []
    for size, count in rule.runs:
        covered = size * count * shape[axis]
        if covered % small_shape[axis] or (covered // small_shape[axis]) % size:
            raise ValueError(
                f"cannot map run-length groups {list(map(list, rule.runs))} of '{rule.param}' (axis {axis} of length "
                f"{small_shape[axis]}) to '{name}' (length {shape[axis]}): the run of {count} groups of {size} does not "
                "scale to whole groups. Choose a small instance whose widths divide the full model's."
            )
        runs.append((size, covered // small_shape[axis] // size))
    return Rule(name, "groups", axis=axis, runs=tuple(runs), why=why)


def _regular(segments: list[tuple[int, int]], max_runs: int) -> bool:
    """At most ``max_runs`` runs, and every run of groups larger than one slice repeats (heads, not a lone cluster)."""
    runs = _runs([b - a for a, b in segments])
    return len(runs) <= max_runs and all(count >= 2 or size == 1 or len(runs) == 1 for size, count in runs)


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


def _mean_block(relative: np.ndarray, a: int, b: int, c: int, d: int) -> float:
    """Mean relative coupling between the slices a:b and c:d."""
    return float(relative[a:b, c:d].mean())


def _evidence(grouping: AxisGrouping) -> str:
    zero = f", {grouping.zero_slices} slices without mass" if grouping.zero_slices else ""
    if len(grouping.sizes) == 1:
        return f"axis {grouping.axis}: one group (neighbouring slices couple at {grouping.cross_coupling:.3g}{zero})"
    runs = ", ".join(f"{count} x {size}" for size, count in grouping.runs)
    return (f"axis {grouping.axis}: {runs} (off-block mass {grouping.off_block_mass:.1%}, "
            f"coupling between groups {grouping.cross_coupling:.3g}{zero})")


__all__ = ["DEFAULT_THRESHOLD", "AxisGrouping", "Decision", "decide_rule", "derive_decisions", "derive_partition",
           "group_axis", "map_rules"]
