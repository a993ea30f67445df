"""Derive Adam-mini's partition from the measured Hessian structure, never from parameter names.

The partitioner is a pipeline of pure stages, each in its own module, each taking the last one's
frozen result:

1. *measure* (:mod:`~hessian_blocks.partitions.coupling`): for every tensor and axis, the slice
   coupling C_ij = ||H_ij||_F^2 from exact Hessian-vector products -> :class:`TensorCoupling`
   (per-probe estimates kept; long axes on a sample of their slices);
2. *evidence* (:mod:`~hessian_blocks.partitions.evidence`): per axis, relative couplings between
   groups of slices, diagonal norms, masses -> :class:`AxisEvidence`;
3. *candidates* (:mod:`~hessian_blocks.partitions.candidates`): the regular groupings of an axis, one
   named family at a time -> :class:`Candidate` list;
4. *decide* (:mod:`~hessian_blocks.partitions.decide`): per axis the winning grouping, per tensor
   the rule with a structured :class:`Reason`, and whether it holds without each probe ->
   :class:`Decision` (settings: one frozen :class:`DecisionSettings`);
5. *render* (:mod:`~hessian_blocks.partitions.render`): the ``why`` and the table's rows;
6. *transfer* (:mod:`~hessian_blocks.partitions.transfer`): rules of a smaller instance mapped to
   the full model.

This module runs them: :func:`derive_decisions` measures (sequentially: a tensor whose decision is
not settled gets more probes; a sampled tensor whose sample missed finer structure is measured again
on every slice) and decides; :func:`derive` also maps a smaller instance's rules and builds the
partition; :func:`derive_partition` is its partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from ..blocks import Partition
from ..hvp import Batch, LossFn
from .coupling import TensorCoupling, load_couplings, measure_coupling, save_couplings
from .decide import Decision, DecisionSettings, decide_rule
from .transfer import map_rules

__all__ = ["CouplingsFile", "Decider", "Derivation", "derive", "derive_decisions", "derive_partition"]


@dataclass(frozen=True)
class CouplingsFile:
    """Where a measurement is kept (the slow part of deriving a partition): read when ``path`` exists,
    else measured and written there. ``settings`` (JSON values: the model, data, probes, ... the
    measurement is made with) are stored with it; a file written with other settings, or holding
    other tensors, is refused with the fix."""

    path: str | Path
    settings: Mapping[str, Any]


class Decider:
    """:func:`decide_rule` with fixed settings, keeping each tensor's latest decision: the check that
    asks a sequential measurement for more probes has already decided the final estimate."""

    def __init__(self, settings: DecisionSettings):
        self.settings = settings
        self._latest: dict[str, Decision] = {}

    def __call__(self, coupling: TensorCoupling) -> Decision:
        latest = self._latest.get(coupling.param)
        if latest is None or latest.coupling is not coupling:
            latest = self._latest[coupling.param] = decide_rule(coupling, self.settings)
        return latest

    def unsettled(self, coupling: TensorCoupling) -> bool:
        """Whether the decision changes without one of the probes, or rests on an axis whose split is
        within the 95 % interval of the threshold (a ``refine`` for measure_coupling)."""
        confidence = self(coupling).confidence
        return confidence is not None and (confidence.agreeing != confidence.replicates
                                           or bool(confidence.near_threshold))

    def finer(self, coupling: TensorCoupling) -> bool:
        """Whether a sampled axis shows structure finer than its stride (a ``resample`` for
        measure_coupling: measure the tensor again on every slice)."""
        return any(g.finer for g in self(coupling).groupings)


def derive_decisions(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch],
    *,
    settings: DecisionSettings | None = None,
    couplings: CouplingsFile | None = None,
    progress: Callable[[int], None] | None = None,
    **measure: Any,
) -> list[Decision]:
    """Measure every trainable tensor (or ``params=[...]``) and decide its split, with the evidence.

    ``measure`` goes to :func:`~hessian_blocks.partitions.coupling.measure_coupling` (``params``,
    ``method``, ``probes``, ``max_probes``, ``dense_max``, ``max_slices``, ``seed``, ``dtype``,
    ``device``, ``strategy``); ``progress`` is called with the number of Hessian-vector products done
    after each chunk. With ``max_probes`` above ``probes`` the measurement is sequential: a tensor
    whose decision is not settled (see :func:`~hessian_blocks.partitions.decide.decide_rule`) gets
    as many probes again, until it is settled or has ``max_probes`` per slice. With ``couplings``
    the measurement is read from that file when it exists, else kept there.
    """
    decide = Decider(settings or DecisionSettings())
    if couplings is not None and Path(couplings.path).exists():
        measured = load_couplings(couplings.path, settings=dict(couplings.settings))
        wanted = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
        if measure.get("params") is not None:
            wanted = {name: wanted.get(name) for name in measure["params"]}
        if {name: c.shape for name, c in measured.items()} != wanted:
            raise ValueError(f"{couplings.path} does not hold the tensors of this model; delete it or give another "
                             "path")
    else:
        measured = measure_coupling(model, loss_fn, data, refine=decide.unsettled, resample=decide.finer,
                                    progress=progress, **measure)
        if couplings is not None:
            save_couplings(measured, couplings.path, settings=dict(couplings.settings))
    return [decide(c) for c in measured.values()]


@dataclass(frozen=True)
class Derivation:
    """A derived partition of a model and the decisions it came from: those of the model itself, or
    of the smaller instance measured instead (``measured``), whose rules were mapped."""

    partition: Partition
    decisions: tuple[Decision, ...]
    measured: nn.Module


def derive(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch] | None,
    *,
    small: nn.Module | None = None,
    small_data: Iterable[Batch] | None = None,
    settings: DecisionSettings | None = None,
    couplings: CouplingsFile | None = None,
    progress: Callable[[int], None] | None = None,
    **measure: Any,
) -> Derivation:
    """Adam-mini partition of ``model`` derived from its measured Hessian structure, with its decisions.

    Args:
        model: any ``nn.Module`` in eval mode (see :class:`~hessian_blocks.hvp.BlockHessian`).
        loss_fn: ``loss_fn(model_output, targets) -> scalar`` batch mean.
        data: (inputs, targets) batches defining the loss.
        small: a smaller instance of the same architecture (fewer layers, narrower, same head
            size) measured instead of ``model``; its rules are mapped back by
            :func:`~hessian_blocks.partitions.transfer.map_rules`.
        small_data: batches for ``small`` (default: ``data``).
        settings: the decision's thresholds (:class:`DecisionSettings`; default: the CLI's defaults).
        couplings: keep the measurement in a file (:class:`CouplingsFile`): deciding again with other
            ``settings`` measures nothing.
        progress: called with the number of Hessian-vector products done after each chunk.
        **measure: options of :func:`~hessian_blocks.partitions.coupling.measure_coupling`
            (``method``, ``probes`` = 2, ``max_probes``, ``dense_max`` = 256, ``max_slices`` = 32,
            ``seed``, ``dtype``, ``device``, ``strategy``).
    """
    if "params" in measure:
        raise ValueError("derive_partition measures every parameter; use derive_decisions(params=...) for a subset")
    measured = model if small is None else small
    batches = small_data if small is not None and small_data is not None else data
    decisions = derive_decisions(measured, loss_fn, batches, settings=settings, couplings=couplings, progress=progress,
                                 **measure)
    rules = [d.rule for d in decisions]
    if small is not None:
        rules = map_rules(small, rules, model)
    return Derivation(Partition.from_rules(model, rules), tuple(decisions), measured)


def derive_partition(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Batch] | None,
    *,
    small: nn.Module | None = None,
    small_data: Iterable[Batch] | None = None,
    settings: DecisionSettings | None = None,
    couplings: CouplingsFile | None = None,
    progress: Callable[[int], None] | None = None,
    **measure: Any,
) -> Partition:
    """Adam-mini partition of ``model`` derived from its measured Hessian structure (the partition of
    :func:`derive`, same arguments); each rule's ``why`` records its evidence."""
    return derive(model, loss_fn, data, small=small, small_data=small_data, settings=settings, couplings=couplings,
                  progress=progress, **measure).partition
