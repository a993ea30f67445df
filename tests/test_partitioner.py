"""Partitioner: Adam-mini's blocks derived from the measured Hessian, never from names.

Oracles: a model with a planted (known) Hessian; the papers' partition rules applied to the bundled
models' *original* names, while the partitioner only sees randomly renamed parameters; a hand-made
coupling matrix for the grouping step; Adam-mini with the hand-written paper partition.
"""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pytest
import torch
from torch import nn

from analysis.experiments.training import run_steps
from hessian_blocks import Partition, Rule, build_model, make_batches
from hessian_blocks.cli import main
from hessian_blocks.partitions.coupling import (
    TensorCoupling,
    load_couplings,
    measure_coupling,
    save_couplings,
    slice_coupling,
)
from hessian_blocks.partitions.decide import DecisionSettings, decide_rule, group_axis
from hessian_blocks.partitions.measured import derive_decisions, derive_partition
from hessian_blocks.partitions.transfer import map_rules
from tests.oracles import planted_block_diagonal, planted_loss
from tests.test_partitioner_families import interleaved_heads

FAST = dict(dtype=torch.float32, strategy="vmap", probes=2, max_probes=8, dense_max=256)


# ---------------------------------------------------------------- a planted Hessian


class Planted(nn.Module):
    """Parameters whose loss is the quadratic 0.5 * theta^T A theta with a block-diagonal A.

    ``heads`` [12, 5]: rows couple in groups of 4 (three dense 20 x 20 blocks).
    ``fused`` [3, 14]: columns couple in runs - two groups of 3 columns, then 8 single columns
    (a transposed, fused layout).
    ``diagonal`` [10]: A diagonal, entries spread over three decades (one learning rate each).
    ``even`` [8]: A diagonal with entries within 10% of each other (one learning rate fits all).
    ``dense`` [6]: A dense.
    ``output`` [6, 8]: rows decoupled, each row's block a scaled copy of one 8 x 8 matrix with 40 %
    of its mass off the diagonal (an output layer: per token, not per coordinate).
    """

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.heads = nn.Parameter(torch.randn(12, 5, generator=gen, dtype=torch.float64))
        self.fused = nn.Parameter(torch.randn(3, 14, generator=gen, dtype=torch.float64))
        self.diagonal = nn.Parameter(torch.randn(10, generator=gen, dtype=torch.float64))
        self.even = nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
        self.dense = nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
        self.output = nn.Parameter(torch.randn(6, 8, generator=gen, dtype=torch.float64))
        index = torch.arange(12 * 5).reshape(12, 5)
        heads_groups = [index[4 * g : 4 * g + 4].reshape(-1) for g in range(3)]
        index = torch.arange(3 * 14).reshape(3, 14)
        column_groups = [index[:, 0:3], index[:, 3:6]] + [index[:, c : c + 1] for c in range(6, 14)]
        self.matrices = {
            "heads": planted_block_diagonal(60, heads_groups, gen),
            "fused": planted_block_diagonal(42, [g.reshape(-1) for g in column_groups], gen),
            "diagonal": torch.diag(10.0 ** torch.linspace(-1.5, 1.5, 10,
                                                          dtype=torch.float64)[torch.randperm(10, generator=gen)]),
            "even": torch.diag(1.0 + 0.1 * torch.rand(8, generator=gen, dtype=torch.float64)),
            "dense": planted_block_diagonal(6, [torch.arange(6)], gen),
            "output": torch.block_diag(*(scale * (torch.eye(8, dtype=torch.float64) + 0.45) for scale in
                                         torch.linspace(0.5, 2.0, 6, dtype=torch.float64))),
        }

    def forward(self, x):
        return {name: getattr(self, name) * x.mean() for name in self.matrices}




PLANTED_RULES = {
    "heads": Rule("heads", "groups", axis=0, size=4),
    "fused": Rule("fused", "groups", axis=1, runs=((3, 2), (1, 8))),
    "diagonal": Rule("diagonal", "elements"),
    "even": Rule("even", "whole"),
    "dense": Rule("dense", "whole"),
    "output": Rule("output", "groups", axis=0, size=1),
}


@pytest.mark.parametrize("method", ["dense", "probes"])
def test_planted_block_structure_is_recovered_exactly(method):
    model = Planted()
    batches = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]
    loss = planted_loss(model.matrices)
    couplings = measure_coupling(model, loss, batches, method=method, probes=3)
    if method == "dense":  # the measured within-tensor Hessian is the planted matrix
        for name, a in model.matrices.items():
            np.testing.assert_allclose(couplings[name].hessian, a.numpy(), atol=1e-12)
    partition = derive_partition(model, loss, batches, method=method, probes=3)
    assert [(r.param, r.split, r.axis, r.size, r.runs) for r in partition.rules] == [
        (r.param, r.split, r.axis, r.size, r.runs) for r in PLANTED_RULES.values()
    ]
    why = {r.param: r.why for r in partition.rules}
    assert "off-block mass 0.0%" in why["heads"] and "HVPs" in why["heads"]
    if method == "probes":  # the estimate's standard error and the leave-one-probe-out check are recorded
        assert "3 probes per slice" in why["output"] and "settled: all 3 leave-one-probe-out" in why["output"]
        assert " ± " in why["output"]


def test_standard_error_is_the_spread_between_probes():
    model = Planted()
    batches = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]
    coupling = measure_coupling(model, planted_loss(model.matrices), batches, params=["output"], method="probes",
                                probes=64)["output"]
    samples = coupling.samples[0]
    assert samples.shape == (64, 6, 6)
    np.testing.assert_allclose(coupling.axes[0], samples.mean(0))
    error = coupling.standard_error(0)
    np.testing.assert_allclose(error, samples.std(0, ddof=1) / 8)
    exact = np.diag(slice_coupling(model.matrices["output"].numpy(), (6, 8), 0))
    estimate = np.diag(coupling.axes[0])
    assert np.all(np.abs(estimate - exact) < 4 * np.diag(error))   # unbiased: within 4 standard errors
    assert np.all(np.diag(error) < 0.3 * exact)                    # and the error is a fraction of the mass
    assert np.all(coupling.axes[0][~np.eye(6, dtype=bool)] == 0)   # exactly zero between decoupled rows


def test_sequential_probes_only_where_a_decision_is_unsettled():
    model = Planted()
    batches = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]
    asked = []

    def refine(coupling):
        asked.append((coupling.param, coupling.probes))
        return coupling.param == "heads"

    couplings = measure_coupling(model, planted_loss(model.matrices), batches, params=["heads", "output"],
                                 method="probes", probes=2, max_probes=7, refine=refine)
    assert couplings["heads"].probes == 7 and couplings["output"].probes == 2   # 2, 4, then 3 more: at most 7
    assert couplings["heads"].products == 7 * (12 + 5)
    assert ("output", 2) in asked and ("heads", 4) in asked
    again = measure_coupling(model, planted_loss(model.matrices), batches, params=["heads"], method="probes",
                             probes=2, max_probes=7, refine=refine)  # same seed, a subset: the same numbers
    np.testing.assert_array_equal(again["heads"].samples[0], couplings["heads"].samples[0])


def test_a_split_within_the_interval_of_the_threshold_is_not_settled():
    """Six slices coupled evenly at 0.52: every grouping leaves about 0.52, just above `threshold`
    0.5, so the vector is one block. With 4 probes that differ by +-0.1 the jackknife standard error
    of that 0.52 is 0.058, and 0.5 lies within its 95 % t-interval (3.18 standard errors): not settled,
    though every leave-one-out estimate gives the same rule. Probes that differ by +-0.001: settled."""
    def coupling(spread):
        probes = [np.full((6, 6), 0.52 + sign * spread) + (1 - 0.52 - sign * spread) * np.eye(6)
                  for sign in (1, -1, 1, -1)]
        samples = np.stack(probes)
        return TensorCoupling("w", (6,), "probes", {0: samples.mean(0)}, 24, samples={0: samples})

    noisy = decide_rule(coupling(0.1))
    assert noisy.rule.split == "whole" and noisy.confidence.agreeing == noisy.confidence.replicates == 4
    assert noisy.confidence.near_threshold == (0,) and not noisy.settled
    grouping = noisy.groupings[0]
    # leave-one-out values 0.52 -+ 0.1 / 3, twice each: SE = sqrt(3 / 4 * 4 * (0.1 / 3)^2) = 0.1 / sqrt(3)
    assert grouping.weakest == pytest.approx(0.52) and noisy.errors[0].weakest == pytest.approx(0.1 / np.sqrt(3))
    assert "UNDECIDED: axis 0 splits at all: weakest grouping leaves 0.52 ± 0.058" in noisy.rule.why
    assert "within the 95 % t-interval (3.18 standard errors" in noisy.rule.why
    steady = decide_rule(coupling(0.001))
    assert steady.rule.split == "whole" and steady.settled and steady.confidence.near_threshold == ()
    assert "settled: all 4 leave-one-probe-out estimates agree; axis 0 splits at all: weakest grouping leaves " \
           "0.52 ± 0.00058, threshold 0.5 outside the 95 % t-interval" in steady.rule.why


@pytest.mark.parametrize("method", ["dense", "probes"])
def test_measurement_in_chunks_gives_the_same_coupling(method, monkeypatch):
    from hessian_blocks.partitions import probes

    model = Planted()
    batches = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]
    whole = measure_coupling(model, planted_loss(model.matrices), batches, method=method, probes=2)
    monkeypatch.setattr(probes, "VECTOR_BUDGET", 1)  # one probe vector per chunk
    chunked = measure_coupling(model, planted_loss(model.matrices), batches, method=method, probes=2)
    for name in whole:
        for axis in whole[name].axes:
            np.testing.assert_allclose(chunked[name].axes[axis], whole[name].axes[axis], rtol=1e-12, atol=1e-14)


def test_saved_couplings_give_the_same_decisions(tmp_path):
    model = Planted()
    batches = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]
    measured = measure_coupling(model, planted_loss(model.matrices), batches, method="probes", probes=2)
    save_couplings(measured, tmp_path / "couplings.npz")
    loaded = load_couplings(tmp_path / "couplings.npz")
    assert list(loaded) == list(measured)
    for name, coupling in measured.items():
        again = loaded[name]
        assert (again.shape, again.method, again.products, sorted(again.axes)) == \
            (coupling.shape, coupling.method, coupling.products, sorted(coupling.axes))
        for axis, matrix in coupling.axes.items():
            np.testing.assert_array_equal(again.axes[axis], matrix)
        assert decide_rule(again).rule == decide_rule(coupling).rule
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a couplings file"):
        load_couplings(tmp_path / "other.npz")
    save_couplings(measured, tmp_path / "probes2.npz", settings={"probes": 2, "data": "synthetic"})
    assert list(load_couplings(tmp_path / "probes2.npz", settings={"data": "synthetic", "probes": 2})) == list(measured)
    with pytest.raises(ValueError, match=r"other settings \(probes: 2 there, 4 now\); delete it"):
        load_couplings(tmp_path / "probes2.npz", settings={"probes": 4, "data": "synthetic"})


def test_derive_keeps_the_couplings_in_a_file_and_decides_again_from_it(tmp_path, monkeypatch):
    import hessian_blocks.partitions.measured as measured_module
    from hessian_blocks.partitions.measured import CouplingsFile, derive

    model = Planted()
    batches = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]
    loss = planted_loss(model.matrices)
    kept = CouplingsFile(tmp_path / "c.npz", {"model": "planted", "probes": 2})
    done = []
    first = derive(model, loss, batches, couplings=kept, progress=done.append, method="probes", probes=2)
    assert kept.path.exists() and sum(done) == sum(d.products for d in first.decisions) > 0
    assert first.measured is model and [d.rule for d in first.decisions] == first.partition.rules

    def no_measuring(*_, **__):
        raise AssertionError("measured again")

    monkeypatch.setattr(measured_module, "measure_coupling", no_measuring)
    progressed = len(done)
    again = derive(model, loss, batches, couplings=kept, progress=done.append, method="probes", probes=2)
    assert again.partition.to_dict() == first.partition.to_dict() and len(done) == progressed   # read, not measured
    strict = derive_partition(model, loss, batches, couplings=kept, settings=DecisionSettings(threshold=1e-6))
    assert strict.to_dict() != first.partition.to_dict()    # decided again: almost every axis one block
    with pytest.raises(ValueError, match=r"other settings \(probes: 2 there, 4 now\)"):
        derive(model, loss, batches, couplings=CouplingsFile(kept.path, {"model": "planted", "probes": 4}))
    with pytest.raises(ValueError, match="does not hold the tensors of this model"):
        derive(FusedStack(1, 4), loss, batches, couplings=kept)


def test_slice_coupling_matches_the_definition():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    h = (h + h.T).numpy()
    c = slice_coupling(h, (2, 3), axis=1)  # columns of a [2, 3] tensor: flat indices {0, 3}, {1, 4}, {2, 5}
    cols = [[0, 3], [1, 4], [2, 5]]
    expected = [[np.sum(h[np.ix_(cols[i], cols[j])] ** 2) for j in range(3)] for i in range(3)]
    np.testing.assert_allclose(c, expected)


def test_group_axis_runs_zero_mass_and_background():
    n = 14
    coupling = np.eye(n) * 1.0
    for start in (0, 4):  # two groups of 4 strongly coupled slices, then 6 weakly coupled singles
        coupling[start : start + 4, start : start + 4] = 0.8
        np.fill_diagonal(coupling, 1.0)
    coupling[8:, 8:] += 0.05 * (1 - np.eye(6))
    coupling[12, :] = coupling[:, 12] = 0.0  # a slice without Hessian mass
    grouping = group_axis(coupling)
    assert grouping.sizes == (4, 4, 1, 1, 1, 1, 1, 1)
    assert grouping.runs == ((4, 2), (1, 6))
    assert grouping.zero_slices == 1
    off = (coupling.sum() - sum(coupling[a:b, a:b].sum() for a,
                                b in [(0, 4), (4, 8)] + [(i, i + 1) for i in range(8, 14)]))
    assert grouping.off_block_mass == pytest.approx(off / coupling.sum())
    uniform = np.full((6, 6), 0.9) + 0.1 * np.eye(6)  # every slice couples to every other: one block
    assert group_axis(uniform).sizes == (6,)
    with pytest.raises(ValueError, match="threshold"):
        DecisionSettings(threshold=0)
    with pytest.raises(ValueError, match="max_runs must be 1"):
        DecisionSettings(max_runs=3)


def test_fused_heads_then_evenly_coupled_singles():
    """A fused q|k|v axis: 8 heads of 8 (inside 0.3-0.5, nothing between heads), then 32 value
    columns all coupled evenly at about 0.12. A mean over all links would favour groups laid over
    the value columns (or single slices everywhere); the heads must stay whole and the value
    columns single."""
    rng = np.random.default_rng(0)
    coupling = np.zeros((96, 96))
    for head in range(8):
        coupling[8 * head : 8 * head + 8, 8 * head : 8 * head + 8] = rng.uniform(0.3, 0.5)
    coupling[64:, 64:] = 0.12 * rng.uniform(0.7, 1.3, (32, 32))
    coupling = (coupling + coupling.T) / 2
    np.fill_diagonal(coupling, 1.0)
    assert group_axis(coupling).runs == ((8, 8), (1, 32))
    value_first = coupling[np.r_[64:96, 0:64]][:, np.r_[64:96, 0:64]]   # singles before the heads
    assert group_axis(value_first).runs == ((1, 32), (8, 8))


def test_weakly_but_evenly_coupled_heads_stay_whole():
    """Key heads at initialisation: 4 heads of 16 rows coupled evenly inside at 0.06-0.2 (below
    threshold / contrast = 0.125, where a cut link counts as strong), a thousand times less across
    heads. A tiling of evenly coupled, distinct heads keeps its groups down to threshold / contrast**2;
    a band of neighbours (coupling that fades with distance) and two heads in one group are not
    heads, and one weaker head alone (0.02) is split."""
    rng = np.random.default_rng(1)
    coupling = 1e-4 * rng.uniform(0.5, 1.5, (64, 64))
    for head, inside in enumerate([0.06, 0.2, 0.1, 0.15]):
        coupling[16 * head : 16 * head + 16, 16 * head : 16 * head + 16] = inside * rng.uniform(0.8, 1.2, (16, 16))
    coupling = (coupling + coupling.T) / 2
    np.fill_diagonal(coupling, 1.0)
    assert group_axis(coupling).runs == ((16, 4),)
    weak = coupling.copy()
    weak[:16, :16] *= 0.02 / 0.06
    np.fill_diagonal(weak, 1.0)
    assert group_axis(weak).runs == ((1, 16), (16, 3))
    band = np.eye(64) + 0.1 * (np.eye(64, k=1) + np.eye(64, k=-1))  # neighbours only: single slices
    assert group_axis(band).sizes == (1,) * 64


def test_heads_interleaved_with_their_value_rows():
    """GPT-NeoX's fused rows [q_h, k_h, v_h] per head, as measured at initialisation: query and key rows
    carry a thousandth of the value rows' diagonal norm, couple with each other 5,000 times more than
    with themselves (relative to those tiny diagonals) and with their value rows 5 times; value rows
    couple at 0.15 with every value row, in their head or not. Each head's q|k rows are one group and
    its value rows single: a group never takes in the value rows (they carry a thousand times more
    mass, one learning rate would not fit both), and a contiguous fused layout is not read as a
    repeated one. Nor do whole heads [q_h, k_h, v_h] (or pairs of them) win where the value rows
    couple more inside their head than across heads: they hold two scales."""
    heads, head = 4, 8
    period = 3 * head
    coupling = interleaved_heads(heads, head)
    norms = np.sqrt(np.diag(coupling))
    relative = coupling / np.outer(norms, norms)          # C_ij = K_ij sqrt(C_ii C_jj), C_ii = norm_i^2
    values = np.concatenate([np.arange(h * period + 2 * head, (h + 1) * period) for h in range(heads)])
    grouping = group_axis(coupling)
    assert grouping.runs == ((2 * head, 1), (1, head)) * heads
    columns = np.full((8, 8), 0.9) + 0.1 * np.eye(8)       # input features couple evenly: no split along them
    decision = decide_rule(TensorCoupling("w", (heads * period, 8), "dense", {0: coupling, 1: columns}, 0))
    assert decision.rule.runs == ((2 * head, 1), (1, head)) * heads
    assert "axis 0: 4 x (1 x 16, 8 x 1)" in decision.rule.why
    assert group_axis(coupling, DecisionSettings(max_runs=1)).sizes == (1,) * heads * period   # repeated: max_runs 2
    contiguous = np.concatenate([np.arange(h * period, h * period + 2 * head) for h in range(heads)] + [values])
    fused = coupling[np.ix_(contiguous, contiguous)]     # the same rows as [q_1 k_1 ... q_4 k_4 | v]: not repeated
    assert group_axis(fused).runs == ((2 * head, heads), (1, heads * head))
    # value rows that couple inside their head (0.3) more than across heads (0.02), and q|k rows a
    # hundredth of their norm: whole heads [q_h k_h v_h] keep more mass, but hold two scales
    for h in range(heads):
        v = np.arange(h * period + 2 * head, (h + 1) * period)
        norms[np.arange(h * period, h * period + 2 * head)] *= 10
        relative[np.ix_(values, v)] = relative[np.ix_(v, values)] = 0.02
        relative[np.ix_(v, v)] = 0.3
    np.fill_diagonal(relative, 1.0)
    per_head = relative * np.outer(norms, norms)
    assert group_axis(per_head).runs == ((2 * head, 1), (1, head)) * heads
    assert group_axis(per_head, DecisionSettings(max_spread=1e6)).runs == ((period, heads),)   # one block per head


def test_the_axis_that_keeps_the_most_mass_in_its_blocks_wins():
    """Both axes split into single slices. Rows: neighbours couple at 0.1, nothing farther
    (16 % of the mass off the rows' blocks). Columns: every pair couples at 0.03, weaker per link
    but 31 % of the mass off the columns' blocks. Per row drops less of the Hessian."""
    n = 16
    rows = np.eye(n) + 0.1 * (np.eye(n, k=1) + np.eye(n, k=-1))
    columns = np.full((n, n), 0.03) + 0.97 * np.eye(n)
    decision = decide_rule(TensorCoupling("w", (n, n), "dense", {0: rows, 1: columns}, 0))
    tokens, features = decision.groupings
    assert tokens.sizes == (1,) * n and features.sizes == (1,) * n
    assert tokens.cross_coupling > features.cross_coupling and tokens.off_block_mass < features.off_block_mass
    assert tokens.off_block_mass == pytest.approx(3.0 / 19.0)
    assert (decision.rule.split, decision.rule.axis, decision.rule.size) == ("groups", 0, 1)


def test_rows_of_stacked_parts_pair_up_and_stay_single():
    """A fused gate|up weight [2 x 8 rows, 6 columns]: row i couples with row i + 8 (gate with up) far
    more than with itself; columns couple evenly. Per row leaves 95 % of the mass off its blocks, but
    1.3 % off the pairs; per column 60 %. Rows win (the pairs are not contiguous: single rows)."""
    n = 16
    rows = 0.05 * np.eye(n) + 0.001 * (1 - np.eye(n))
    rows[np.arange(8), np.arange(8) + 8] = rows[np.arange(8) + 8, np.arange(8)] = 1.0
    columns = np.full((6, 6), 0.3) + 0.7 * np.eye(6)
    decision = decide_rule(TensorCoupling("w", (n, 6), "dense", {0: rows, 1: columns}, 0))
    by_rows = decision.groupings[0]
    assert by_rows.sizes == (1,) * n and by_rows.stacked.parts == 2
    total = 16 * 0.05 + 16 * 1.0 + 224 * 0.001          # diagonal, the 16 pair entries, the other 224 entries
    assert by_rows.off_block_mass == pytest.approx((16 + 0.224) / total)
    assert by_rows.stacked.off_mass == pytest.approx(0.224 / total)
    assert decision.groupings[1].off_block_mass == pytest.approx(9 / 15) and decision.groupings[1].stacked is None
    assert (decision.rule.split, decision.rule.axis, decision.rule.size) == ("groups", 0, 1)
    assert "slice i with i + 8" in decision.rule.why


def test_low_mass_slices_do_not_decide_the_grouping():
    # 8 rows in 2 heads of 4 (inside K = 0.8, between heads 0); two rows of the second head have
    # a tiny diagonal and couple to each other across the heads with K = 50 (noise, indefiniteness)
    mass = np.ones(8)
    mass[[2, 5]] = 1e-6
    relative = np.kron(np.eye(2), np.full((4, 4), 0.8)) + 0.2 * np.eye(8)
    relative[2, 5] = relative[5, 2] = 50.0  # heavy tail: tiny slices, large relative coupling
    coupling = relative * np.sqrt(np.outer(mass, mass))
    assert group_axis(coupling).sizes == (4, 4)


# ---------------------------------------------------------------- bundled models, names scrambled


class Scrambled(nn.Module):
    """The same model with every parameter under a random name, in a random order, and no module tree."""

    def __init__(self, inner: nn.Module, seed: int = 0):
        super().__init__()
        rng = random.Random(seed)
        self._inner = [inner]  # in a list: not a registered submodule
        named = list(inner.named_parameters())
        self.original: dict[str, str] = {}
        for i in rng.sample(range(len(named)), len(named)):
            name, p = named[i]
            new = "".join(rng.choice(string.ascii_lowercase) for _ in range(12))
            self.register_parameter(new, nn.Parameter(p.detach().clone()))
            self.original[new] = name

    def forward(self, x):
        params = {self.original[n]: p for n, p in self.named_parameters()}
        return torch.func.functional_call(self._inner[0], params, (x,))


def paper_rule(name: str, head_dim: int) -> Rule | None:
    """The papers' partition for the bundled models, by original name (the test's oracle; biases: None)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return None
    if "q_proj" in name or "k_proj" in name:
        return Rule(name, "groups", axis=0, size=head_dim)
    if name == "pos_embed":
        return Rule(name, "groups", axis=1, size=1)  # one block per token (position)
    if name == "cls_token" or "ln" in name.split(".")[-2]:
        return Rule(name, "whole")
    return Rule(name, "groups", axis=0,
                size=1)  # per neuron (v, o, MLP, patch conv), per token/class (embeddings, heads)


CONFIGS = {
    "gpt2-nano": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, context=8),
    "bert-mini": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, context=8),
    "vit-tiny": dict(n_layer=2, n_embd=32, n_head=4, image_size=8, patch_size=4, channels=1),
}


def _key(rule: Rule):
    return (rule.split, rule.axis, rule.size, rule.runs)


@pytest.fixture(scope="module")
def measured():
    """Each bundled model, scrambled, with its derived decisions (measured once per module)."""
    cache = {}

    def get(name):
        if name not in cache:
            spec = build_model(name, dtype=torch.float64, **CONFIGS[name])
            batches = make_batches(spec, "synthetic", batch_size=8, n_batches=1, dtype=torch.float64)
            scrambled = Scrambled(spec.model, seed=1)
            cache[name] = spec, scrambled, derive_decisions(scrambled, spec.loss_fn, batches, **FAST)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scrambled_bundled_models_get_the_paper_partition(name, measured):
    spec, scrambled, decisions = measured(name)
    derived = {scrambled.original[d.rule.param]: d.rule for d in decisions}
    head_dim = spec.config.n_embd // spec.config.n_head
    mismatches = {}
    for original, rule in derived.items():
        expected = paper_rule(original, head_dim)
        if expected is not None and _key(rule) != _key(expected):
            mismatches[original] = (rule.split if rule.split != "groups"
                                    else f"groups axis {rule.axis} {rule.size or rule.runs}")
    assert mismatches == {}
    assert all(d.rule.why and "axis" in d.rule.why and "HVPs" in d.rule.why for d in decisions)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decisions_are_the_same_for_other_probe_seeds(name, measured):
    """The probes are the only random part of a measurement: seeds 1 and 2 give every tensor of the
    scrambled model the rule of seed 0, each settled (no probe changes it, and no split rests on a
    coupling within the 95 % interval of the threshold). ViT's first MLP output rows couple around
    the threshold at 2 probes; they get more probes until that is settled."""
    spec, scrambled, decisions = measured(name)
    batches = make_batches(spec, "synthetic", batch_size=8, n_batches=1, dtype=torch.float64)
    first = {d.rule.param: _key(d.rule) for d in decisions}
    assert all(d.settled for d in decisions)
    for seed in (1, 2):
        again = derive_decisions(scrambled, spec.loss_fn, batches, seed=seed, **FAST)
        assert {d.rule.param: _key(d.rule) for d in again} == first
        assert all(d.settled for d in again)


def test_adam_mini_with_the_derived_partition_trains_like_the_paper_partition(measured):
    from optim import AdamMini

    spec, scrambled, decisions = measured("gpt2-nano")
    derived = Partition.from_rules(spec.model, [_renamed(d.rule, scrambled.original[d.rule.param]) for d in decisions])
    head_dim = spec.config.n_embd // spec.config.n_head
    paper = Partition.from_rules(spec.model, [
        paper_rule(n, head_dim) or Rule(n, "elements") for n, _ in spec.model.named_parameters()
    ])
    train = make_batches(spec, "synthetic", batch_size=16, n_batches=4, seed=3)
    losses = {label: _train(spec, partition, train, AdamMini) for label,
              partition in (("derived", derived), ("paper", paper))}
    assert losses["paper"] < 0.85 * np.log(spec.config.vocab_size)  # it did train (from log V at init)
    assert losses["derived"] == pytest.approx(losses["paper"], rel=0.01)


def _renamed(rule: Rule, param: str) -> Rule:
    return Rule(param, rule.split, axis=rule.axis, size=rule.size, runs=rule.runs, why=rule.why)


def _train(spec, partition, batches, optimizer_cls, steps: int = 60, lr: float = 1e-3) -> float:
    model = build_model(spec.name, seed=0, **CONFIGS[spec.name]).model.train()
    run_steps(model, spec.loss_fn, optimizer_cls(model, partition=partition, lr=lr), batches, steps)
    with torch.no_grad():
        return float(np.mean([spec.loss_fn(model(x), y).item() for x, y in batches]))


def test_cli_partition_keeps_and_reuses_couplings(tmp_path, capsys, monkeypatch):
    import hessian_blocks.partitions.measured as measured_module

    couplings = tmp_path / "couplings.npz"
    args = ["partition", "--model", "gpt2-nano", "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2",
            "--set", "vocab_size=32", "--set", "context=8", "--data", "synthetic", "--probes", "1", "--dtype",
            "float32",
            "--strategy", "vmap", "--no-progress", "--couplings", str(couplings)]
    assert main(args + ["--out", str(tmp_path / "first.json")]) == 0
    assert couplings.exists()
    capsys.readouterr()

    def no_measuring(*_, **__):
        raise AssertionError("measured again")

    monkeypatch.setattr(measured_module, "measure_coupling", no_measuring)
    assert main(args + ["--out", str(tmp_path / "again.json")]) == 0
    assert f"couplings read from {couplings} (nothing measured)" in capsys.readouterr().err
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads((tmp_path / "first.json").read_text())
    # other decision settings: decided again from the file (at threshold 1e-6 almost every axis stays one block)
    assert main(args + ["--threshold", "1e-6", "--out", str(tmp_path / "strict.json")]) == 0
    assert json.loads((tmp_path / "strict.json").read_text()) != json.loads((tmp_path / "first.json").read_text())
    # another measurement setting: refused with the fix, not silently re-used
    assert main(args + ["--probes", "2", "--out", str(tmp_path / "other.json")]) == 2
    assert "probes: 1 there, 2 now" in capsys.readouterr().err


# ---------------------------------------------------------------- small instance -> full model


class FusedStack(nn.Module):
    """Layers holding a fused [width, 3 * width] weight (Conv1D layout) and a norm scale."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(width, 3 * width), "norm": nn.LayerNorm(width)})
                                    for _ in range(layers))
        self.out = nn.Linear(width, 5)


def test_map_rules_scales_runs_and_keeps_group_sizes():
    small, full = FusedStack(2, 16), FusedStack(5, 32)
    rules = []
    for name, p in small.named_parameters():
        if name.endswith("attn.weight"):  # [48, 16]: q|k heads of 4 rows, then 16 single rows
            rules.append(Rule(name, "groups", axis=0, runs=((4, 8), (1, 16)), why="measured"))
        elif name.endswith("norm.weight"):
            rules.append(Rule(name, "whole"))
        elif name == "out.weight":
            rules.append(Rule(name, "groups", axis=0, size=1))
        else:
            rules.append(Rule(name, "elements"))
    mapped = {r.param: r for r in map_rules(small, rules, full)}
    assert set(mapped) == {n for n, _ in full.named_parameters()}
    assert mapped["layers.4.attn.weight"].runs == ((4, 16), (1, 32))
    assert mapped["layers.0.norm.weight"].split == "whole"
    assert mapped["out.weight"].size == 1
    assert "mapped from 'layers.1.attn.weight'" in mapped["layers.4.attn.weight"].why  # last layer <- last layer
    assert "mapped from 'layers.0.attn.weight'" in mapped["layers.0.attn.weight"].why
    Partition.from_rules(full, mapped.values())  # fits the full model
    # rows interleaved per head ([q_h k_h] of 8 rows, then 4 value rows): the pattern repeats per head
    interleaved = [Rule(r.param, "groups", axis=0, runs=((8, 1), (1, 4)) * 4) if r.param.endswith("attn.weight")
                   else r for r in rules]
    mapped = {r.param: r for r in map_rules(small, interleaved, full)}
    assert mapped["layers.3.attn.weight"].runs == ((8, 1), (1, 4)) * 8
    Partition.from_rules(full, mapped.values())


def test_map_rules_errors_name_the_parameter():
    small, full = FusedStack(1, 16), FusedStack(2, 16)
    rules = [Rule(n, "whole") for n, _ in small.named_parameters()]
    full.extra = nn.Linear(16, 16)
    with pytest.raises(ValueError, match="cannot map rules to 'extra.weight'"):
        map_rules(small, rules, full)
    odd = FusedStack(1, 17)  # q|k share 34 of 51 rows: groups of 4 do not tile it
    rules = [Rule(n, "groups", axis=0, runs=((4, 8), (1, 16))) if n.endswith("attn.weight") else Rule(n, "whole")
             for n, _ in small.named_parameters()]
    with pytest.raises(ValueError, match="layers.0.attn.weight"):
        map_rules(small, rules, odd)
    rules = [Rule(n, "groups", axis=0, runs=((8, 1), (1, 4)) * 4) if n.endswith("attn.weight") else Rule(n, "whole")
             for n, _ in small.named_parameters()]
    with pytest.raises(ValueError, match="the repeated pattern of 12 slices does not divide it"):
        map_rules(small, rules, odd)


def test_derive_partition_on_a_small_instance():
    small = build_model("gpt2-nano", dtype=torch.float64, n_layer=1, n_embd=32, n_head=4, vocab_size=64, context=8)
    full = build_model("gpt2-nano", n_layer=3, n_embd=64, n_head=8, vocab_size=64, context=8)
    batches = make_batches(small, "synthetic", batch_size=8, n_batches=1, dtype=torch.float64)
    partition = derive_partition(full.model, small.loss_fn, None, small=small.model, small_data=batches, **FAST)
    rules = {r.param: r for r in partition.rules}
    assert all(rules[f"blocks.{i}.attn.k_proj.weight"].size == 8 for i in range(3))  # head size kept, 8 heads
    assert len(partition.blocks) > len(partition.rules)


# ---------------------------------------------------------------- command line


def test_cli_partition_writes_a_file_adam_mini_reads(tmp_path, capsys):
    from optim import AdamMini

    out = tmp_path / "partition.json"
    args = ["partition", "--model", "gpt2-nano", "--set", "n_layer=2", "--set", "n_embd=16", "--set", "n_head=2",
            "--set", "vocab_size=32", "--set", "context=8", "--small", "n_layer=1", "--data", "synthetic",
            "--probes", "1", "--dtype", "float32", "--strategy", "vmap", "--out", str(out), "--no-progress",
            "--heatmap", "blocks.0.attn.q_proj.bias"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "parameter" in printed and "evidence" in printed and f"wrote {out}" in printed
    assert "measured on the smaller instance n_layer=1" in printed
    assert (tmp_path / "partition_blocks.0.attn.q_proj.bias.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    assert data["format"] == "hessian-blocks/partition" and len(data["model"]["param_shapes"]) == len(data["rules"])
    model = build_model("gpt2-nano", n_layer=2, n_embd=16, n_head=2, vocab_size=32, context=8).model
    optimizer = AdamMini(model, partition=str(out), lr=1e-3)
    assert optimizer.partition.param_shapes == Partition.load(out, model).param_shapes
    again = tmp_path / "again.json"
    assert main([*args[:-4], str(again), "--no-progress"]) == 0
    assert again.read_bytes() == out.read_bytes()   # the same seed: the same file, byte for byte
    assert main(args + ["--threshold", "0"]) == 2  # a clear error, no traceback


def test_cli_partition_small_auto(tmp_path, capsys):
    out = tmp_path / "partition.json"
    args = ["partition", "--model", "gpt2-nano", "--set", "n_layer=3", "--set", "n_embd=16", "--set", "n_head=4",
            "--set", "vocab_size=32", "--set", "context=8", "--data", "synthetic", "--no-progress", "--out", str(out)]
    assert main(args + ["--small", "auto"]) == 0
    assert "measured on the smaller instance n_layer=2 n_head=2 n_embd=8" in capsys.readouterr().out
    rules = {r["param"]: r for r in json.loads(out.read_text())["rules"]}
    assert len(rules) == 3 * 16 + 5 and all(rules[f"blocks.{i}.attn.q_proj.weight"]["why"].startswith("mapped from")
                                            for i in range(3))
    assert main(["partition", "--model", "mlp", "--small", "auto", "--out", str(tmp_path / "mlp.json")]) == 2
    assert "cannot build a smaller instance of MLPConfig automatically" in capsys.readouterr().err
    assert not (tmp_path / "mlp.json").exists()
