"""How a decision reads: the ``why`` a partition file keeps, and the rows of the CLI's table.

Every rule's ``why`` is ``<reason>: <evidence of every axis> (<how it was measured>[; <verdict>])``:
the reason with its numbers (:class:`~hessian_blocks.partitions.decide.Reason`), each axis' grouping
with its off-block mass, the coupling left between groups, slices without mass, the sample it was
decided on, and stacked parts; then the method, probes and HVPs; for a probe estimate, whether the
decision holds without each probe and the split-or-not test at 95 %. The text is made here only;
nothing reads it back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .decide import AxisErrors, AxisGrouping, Decision, RuleKey

__all__ = ["RESAMPLED", "axis_text", "describe", "evidence_text", "repeat_period", "runs_text", "summary", "table_rows",
           "why"]

RESAMPLED = "; measured again on every slice: a sample of slices missed finer structure"


def why(decision: Decision) -> str:
    """The ``why`` of the decision's rule (see the module docstring)."""
    coupling = decision.coupling
    again = RESAMPLED if coupling.resampled else ""
    reason = decision.reason.value.format(off_diagonal=decision.off_diagonal, spread=decision.spread,
                                          axis=axis_text(decision.chosen.axis) if decision.chosen else None)
    if not decision.groupings:
        return f"{reason} ({coupling.method}, {coupling.products} HVPs{again})"
    every_axis = "; ".join(map(_axis_evidence, decision.groupings, decision.errors))
    confidence = decision.confidence
    if confidence is None:
        return f"{reason}: {every_axis} ({coupling.method}, {coupling.products} HVPs{again})"
    threshold = decision.settings.threshold
    errors = dict(zip((g.axis for g in decision.groupings), decision.errors))
    split = "; ".join(f"axis {axis_text(g.axis)} splits at all: weakest grouping leaves {g.weakest:.3g} "
                      f"± {errors[g.axis].weakest:.2g}" for g in decision.resting)
    total = confidence.replicates
    if confidence.agreeing == total and not confidence.near_threshold:
        verdict = (f"settled: all {total} leave-one-probe-out estimates agree; {split}, threshold {threshold} outside "
                   f"the 95 % t-interval ({confidence.critical:.3g} standard errors)")
    elif confidence.agreeing == total:
        verdict = (f"UNDECIDED: {split}; threshold {threshold} within the 95 % t-interval ({confidence.critical:.3g} "
                   "standard errors; more probes: --max-probes)")
    else:
        verdict = (f"UNDECIDED: {confidence.agreeing} of {total} leave-one-probe-out estimates agree, the others give "
                   + "; ".join(describe(k, coupling.shape) for k in confidence.others) + " (more probes: --max-probes)")
    return (f"{reason}: {every_axis} ({coupling.method}, {coupling.probes} probes per slice, {coupling.products} "
            f"HVPs{again}; {verdict})")


def evidence_text(decision: Decision) -> str:
    """The evidence of the axes the rule rests on, in a few words (the table's column)."""
    if not decision.groupings:
        return "one entry"
    resting = {g.axis for g in decision.resting}
    return "; ".join(_axis_evidence(g, e) for g, e in zip(decision.groupings, decision.errors) if g.axis in resting)


def summary(decision: Decision) -> str:
    """The split in a few words: 'whole', 'elements', 'axis 0: 4 x 8', 'axis 1: 8 x 2, 16 x 1'."""
    return describe(decision.key, decision.shape)


def table_rows(decisions: Sequence[Decision]) -> list[dict[str, str]]:
    """One row per decision: parameter, shape, split (marked when undecided), evidence."""
    return [{"parameter": d.coupling.param, "shape": "x".join(map(str, d.shape)),
             "split": summary(d) + ("" if d.settled else " (undecided)"), "evidence": evidence_text(d)}
            for d in decisions]


def describe(key: RuleKey, shape: tuple[int, ...]) -> str:
    """A rule's (split, axis, size, runs) in a few words, for a tensor of ``shape``."""
    split, axis, size, runs = key
    if split != "groups":
        return split
    length = math.prod(shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
    runs = [(size, length // size)] if size is not None else list(runs)
    return f"axis {axis_text(axis)}: {runs_text(runs)}"


def axis_text(axis: int | tuple[int, ...]) -> str:
    """An axis as a partition file writes it: ``0``, or ``[0, 1]`` for a merged run."""
    return str(axis) if isinstance(axis, int) else str(list(axis))


def runs_text(runs: Sequence[tuple[int, int]]) -> str:
    """'8 x 8, 32 x 1'; a repeated pattern once with its count: '4 x (1 x 16, 8 x 1)'."""
    period = repeat_period(runs)
    text = ", ".join(f"{count} x {size}" for size, count in runs[:period])
    return text if period == len(runs) else f"{len(runs) // period} x ({text})"


def repeat_period(runs: Sequence[tuple[int, int]]) -> int:
    """The length of the shortest pattern that ``runs`` repeat (their length: not repeated)."""
    runs = list(runs)
    return next(p for p in range(1, len(runs) + 1) if len(runs) % p == 0 and runs == runs[:p] * (len(runs) // p))


def _axis_evidence(grouping: AxisGrouping, errors: AxisErrors) -> str:
    zero = f", {grouping.zero_slices} slices without mass" if grouping.zero_slices else ""
    if grouping.stride > 1:
        zero += (f", decided on every {grouping.stride}{'nd' if grouping.stride == 2 else 'th'} slice"
                 + (" (UNSURE: slices 0..stride couple otherwise, measure every slice: max_slices=0)"
                    if grouping.finer else ""))
    cross = f"{grouping.cross_coupling:.3g}" + (f" ± {errors.cross_coupling:.2g}" if errors.cross_coupling else "")
    if len(grouping.sizes) == 1:
        return f"axis {axis_text(grouping.axis)}: one group (neighbouring slices couple at {cross}{zero})"
    off = f"{grouping.off_block_mass:.1%}" + (f" ± {errors.off_block_mass:.1%}" if errors.off_block_mass else "")
    if grouping.stacked is not None:
        width = len(grouping.sizes) // grouping.stacked.parts
        off += (f", {grouping.stacked.off_mass:.1%} off the pairs of {grouping.stacked.parts} stacked parts "
                f"(slice i with i + {width})")
    return (f"axis {axis_text(grouping.axis)}: {runs_text(grouping.runs)} (off-block mass {off}, coupling between "
            f"groups {cross}{zero})")
