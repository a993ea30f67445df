"""One planted Hessian per candidate family and per tensor-level rule of the partitioner.

Each test plants the Hessian of one tensor (a quadratic loss 0.5 theta^T A theta), measures it with
exact Hessian-vector products (densely, and with probes supported on one slice) and checks that the
decision names the family (:class:`~hessian_blocks.partitions.candidates.Family`) or the reason
(:class:`~hessian_blocks.partitions.decide.Reason`) that encodes it, and the rule it gives. Oracle:
the planted block structure; for the repeated per-head layout, a Hessian whose slice coupling is the
one GPT-NeoX's fused rows have at initialisation (tests/test_partitioner_hf.py measures the model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hessian_blocks.partitions.candidates import Family
from hessian_blocks.partitions.decide import Reason
from hessian_blocks.partitions.measured import derive_decisions
from tests.oracles import planted_block_diagonal, planted_loss

METHODS = ["dense", "probes"]
BATCHES = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]


class PlantedTensor(nn.Module):
    """One parameter ``w`` of ``shape`` whose loss has the Hessian ``matrix`` (row-major flattening)."""

    def __init__(self, shape: tuple[int, ...], matrix: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        self.matrices = {"w": matrix}

    def forward(self, x):
        return {"w": self.w * x.mean()}


def decided(shape, matrix, method):
    """The decision for the planted tensor (3 probes per slice with ``method='probes'``)."""
    model = PlantedTensor(shape, matrix)
    (decision,) = derive_decisions(model, planted_loss(model.matrices), BATCHES, method=method, probes=3)
    return decision


def key(decision):
    rule = decision.rule
    return rule.split, rule.axis, rule.size, rule.runs


def blocks(shape, groups_of_index):
    """A planted block-diagonal matrix over a tensor of ``shape``: one dense block per index group."""
    index = torch.arange(int(np.prod(shape))).reshape(shape)
    generator = torch.Generator().manual_seed(1)
    return planted_block_diagonal(index.numel(), [g.reshape(-1) for g in groups_of_index(index)], generator)


@pytest.mark.parametrize("method", METHODS)
def test_single_slices(method):
    """Rows decoupled, each row's block dense with 40 % of its mass off the diagonal (an output
    layer): one block per row, not per entry."""
    matrix = torch.block_diag(*(s * (torch.eye(8, dtype=torch.float64) + 0.45)
                                for s in torch.linspace(0.5, 2.0, 6, dtype=torch.float64)))
    decision = decided((6, 8), matrix, method)
    assert key(decision) == ("groups", 0, 1, None) and decision.chosen.family is Family.SINGLE_SLICES
    assert decision.reason is Reason.GROUPS and decision.settled


@pytest.mark.parametrize("method", METHODS)
def test_equal_groups(method):
    """Rows coupled in three groups of 4 (heads): one block per head."""
    decision = decided((12, 5), blocks((12, 5), lambda index: [index[4 * g: 4 * g + 4] for g in range(3)]), method)
    assert key(decision) == ("groups", 0, 4, None) and decision.chosen.family is Family.EQUAL_GROUPS
    assert decision.chosen.off_block_mass < 1e-12 and decision.settled


@pytest.mark.parametrize("method", METHODS)
def test_groups_with_single_slices(method):
    """Columns of a fused, transposed layout: two groups of 3 columns (q and k heads), then 8 single
    columns (value neurons)."""
    matrix = blocks((3, 14), lambda index: [index[:, 0:3], index[:, 3:6]] + [index[:, c] for c in range(6, 14)])
    decision = decided((3, 14), matrix, method)
    assert key(decision) == ("groups", 1, None, ((3, 2), (1, 8)))
    assert decision.chosen.family is Family.GROUPS_WITH_SINGLES and decision.settled


def interleaved_heads(heads: int = 4, head: int = 8) -> np.ndarray:
    """Slice coupling C of fused rows [q_h, k_h, v_h] per head as GPT-NeoX's at initialisation: query
    and key rows with a thousandth of the value rows' norm, coupled with each other 5,000 times more
    than with themselves (relative to those tiny diagonals) and with their value rows 5 times; value
    rows coupled evenly at 0.15 with every value row, in their head or not."""
    period = 3 * head
    rng = np.random.default_rng(2)
    relative, norms = np.zeros((heads * period, heads * period)), np.ones(heads * period)
    values = np.concatenate([np.arange(h * period + 2 * head, (h + 1) * period) for h in range(heads)])
    relative[np.ix_(values, values)] = 0.15 * rng.uniform(0.8, 1.2, (len(values), len(values)))
    for h in range(heads):
        q, k, v = (np.arange(h * period + i * head, h * period + (i + 1) * head) for i in range(3))
        norms[np.r_[q, k]] = 1e-3 * rng.uniform(0.5, 2.0, 2 * head)
        relative[np.ix_(q, q)], relative[np.ix_(k, k)] = 0.6, 0.3
        relative[np.ix_(q, k)] = relative[np.ix_(k, q)] = 5000.0
        relative[np.ix_(np.r_[q, k], v)] = relative[np.ix_(v, np.r_[q, k])] = 5.0
    relative = (relative + relative.T) / 2
    np.fill_diagonal(relative, 1.0)
    return relative * np.outer(norms, norms)          # C_ij = K_ij sqrt(C_ii C_jj), C_ii = norm_i^2


def with_row_coupling(coupling: np.ndarray, columns: int) -> torch.Tensor:
    """A symmetric Hessian over a [n, columns] tensor whose slice coupling along the rows is exactly
    ``coupling``: block (i, j) is sqrt(C_ij / columns) times an orthogonal matrix, so that a probe
    supported on row i measures ||H_ji||_F^2 = C_ij without noise."""
    n = coupling.shape[0]
    generator = torch.Generator().manual_seed(3)
    matrix = torch.zeros(n * columns, n * columns, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            q, _ = torch.linalg.qr(torch.randn(columns, columns, generator=generator, dtype=torch.float64))
            block = float(np.sqrt(coupling[i, j] / columns)) * (q + q.T if i == j else q)
            if i == j:   # a symmetric diagonal block with ||block||_F^2 = C_ii
                block = block * float(np.sqrt(coupling[i, i])) / torch.linalg.norm(block)
            matrix[i * columns:(i + 1) * columns, j * columns:(j + 1) * columns] = block
            matrix[j * columns:(j + 1) * columns, i * columns:(i + 1) * columns] = block.T
    return matrix


@pytest.mark.parametrize("method", METHODS)
def test_merged_expert_rows(method):
    """A tensor of 3 experts [experts, rows, columns] whose Hessian has one block per (expert, row), as a
    mixture of experts' weight: single slices along the merged axes [0, 1], one block per (expert, row)
    (along axis 0 or 1 alone a block would hold every row or every expert)."""
    shape = (3, 4, 5)
    decision = decided(shape, blocks(shape, lambda index: index.reshape(12, 5)), method)
    assert key(decision) == ("groups", (0, 1), 1, None) and decision.chosen.family is Family.SINGLE_SLICES
    assert decision.chosen.off_block_mass < 1e-12 and decision.settled
    assert decision.rule.why.startswith("groups along axis [0, 1]: axis 0: 3 x 1 (off-block mass 0.0%")
    assert {g.axis for g in decision.groupings} == {0, 1, 2, (0, 1)}


@pytest.mark.parametrize("method", METHODS)
def test_merged_expert_heads(method):
    """Heads of 4 rows inside each of 2 experts: equal groups along the merged axes [0, 1]; a grouping that
    would straddle two experts is never a candidate (here: groups of 8 rows would be experts, of 12 none)."""
    shape = (2, 8, 3)
    decision = decided(shape, blocks(shape, lambda index: index.reshape(4, 12)), method)
    assert key(decision) == ("groups", (0, 1), 4, None) and decision.chosen.family is Family.EQUAL_GROUPS
    assert decision.chosen.off_block_mass < 1e-12 and decision.settled


@pytest.mark.parametrize("method", METHODS)
def test_repeated_per_head_layout(method):
    """GPT-NeoX's rows interleaved per head, [q_h, k_h, v_h]: per head one block of its 16 query and
    key rows, then its 8 value rows single, repeated for the 4 heads. No contiguous grouping with
    single slices fits (a contiguous one is tried first), and whole heads [q_h, k_h, v_h] would hold
    two scales."""
    decision = decided((96, 2), with_row_coupling(interleaved_heads(), 2), method)
    assert key(decision) == ("groups", 0, None, ((16, 1), (1, 8)) * 4)
    assert decision.chosen.family is Family.REPEATED and decision.settled
    assert "axis 0: 4 x (1 x 16, 8 x 1)" in decision.rule.why


def multi_query_heads(heads: int = 4, head: int = 8, outlier: float = 1.0) -> np.ndarray:
    """Slice coupling C of fused rows [q_1 .. q_heads | k | v] (multi-query attention: one key and one
    value head shared by every query head) as Falcon's at initialisation: each query head coupled
    inside at 0.1-0.3 and with the other query heads at 0.005; the key head coupled inside at 0.2 and
    with *every* query head at 400-1,000 (relative to their tiny diagonals); the value rows with ten
    thousand times the query and key rows' norm, coupled with the key rows at 0.05-0.25 and with each
    other at 0.02. ``outlier``: one row of the second query head with that many times its norm
    (a query head's rows spread their norms 10-14 times at initialisation)."""
    rng = np.random.default_rng(5)
    n = (heads + 2) * head
    q, (k, v) = np.arange(heads * head).reshape(heads, head), np.arange(heads * head, n).reshape(2, head)
    relative = 0.005 * rng.uniform(0.5, 1.5, (n, n))
    for h, inside in zip(q, rng.uniform(0.1, 0.3, heads)):
        relative[np.ix_(h, h)] = inside
        relative[np.ix_(h, k)] = relative[np.ix_(k, h)] = rng.uniform(400, 1000)
    relative[np.ix_(k, k)] = 0.2
    relative[np.ix_(k, v)] = relative[np.ix_(v, k)] = rng.uniform(0.05, 0.25, (head, head))
    relative[np.ix_(v, v)] = 0.02
    relative = (relative + relative.T) / 2
    np.fill_diagonal(relative, 1.0)
    norms = np.concatenate([rng.uniform(1e-4, 3e-4, heads * head), rng.uniform(4e-4, 6e-4, head),
                            rng.uniform(3.0, 5.0, head)])
    norms[head + 2] = outlier * np.median(norms[head:2 * head])
    return relative * np.outer(norms, norms)


@pytest.mark.parametrize("outlier", [1.0, 14.0])
@pytest.mark.parametrize("method", METHODS)
def test_groups_with_single_slices_beside_a_shared_head(method, outlier):
    """Multi-query attention fused as [4 query heads | one key head | value rows]: per head one block
    of query rows, one block of the key head, then the value rows single (the paper's rules). The
    key head couples with the last query head, its neighbour, thousands of times more than inside
    either, but as much with the three query heads that are not its neighbours, which are distinct
    from the last one: that link says nothing of where a query head ends. The value rows beside the
    key head have ten thousand times its norm: no group of one scale takes them in, so the key head
    is not held to its link with them either (it couples inside at 0.2, and with them at up to 0.25).
    A query row of 14 times its head's median norm is still of the query heads' scale, not the value
    rows' (a thousand times more): the head keeps it."""
    coupling = with_row_coupling(multi_query_heads(outlier=outlier), 5)   # 5 columns: no stacked parts
    decision = decided((48, 5), coupling, method)
    assert key(decision) == ("groups", 0, None, ((8, 5), (1, 8)))
    assert decision.chosen.family is Family.GROUPS_WITH_SINGLES and decision.settled


@pytest.mark.parametrize("method", METHODS)
def test_near_diagonal_whole(method):
    """A diagonal Hessian with entries within 10 % of each other: one learning rate fits, one block."""
    matrix = torch.diag(1.0 + 0.1 * torch.rand(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    decision = decided((8,), matrix, method)
    assert key(decision) == ("whole", None, None, None) and decision.reason is Reason.EVEN_DIAGONAL
    assert decision.off_diagonal < 1e-12 and decision.spread < 1.1


@pytest.mark.parametrize("method", METHODS)
def test_near_diagonal_elements(method):
    """A diagonal Hessian whose entries spread over three decades: one block per entry."""
    matrix = torch.diag(10.0 ** torch.linspace(-1.5, 1.5, 10, dtype=torch.float64))
    decision = decided((10,), matrix, method)
    assert key(decision) == ("elements", None, None, None) and decision.reason is Reason.UNEVEN_DIAGONAL
    assert decision.spread > decision.settings.max_spread


@pytest.mark.parametrize("method", METHODS)
def test_stacked_parts(method):
    """A fused gate|up weight [2 x 8 rows, 3 columns]: row i couples only with row i + 8. The pairs
    are not contiguous, so the finest blocks they allow are single rows, compared with the columns by
    the mass left off the pairs (none)."""
    matrix = blocks((16, 3), lambda index: [torch.cat([index[i], index[i + 8]]) for i in range(8)])
    decision = decided((16, 3), matrix, method)
    rows = decision.groupings[0]
    assert key(decision) == ("groups", 0, 1, None) and decision.chosen is rows
    assert rows.stacked.parts == 2 and rows.stacked.off_mass < 1e-12
    assert rows.off_block_mass > decision.settings.mass_threshold   # single rows alone would leave 44 %


@pytest.mark.parametrize("method", METHODS)
def test_coupled_whole(method):
    """A dense Hessian: every grouping leaves strong coupling, one block."""
    decision = decided((6,), blocks((6,), lambda index: [index]), method)
    assert key(decision) == ("whole", None, None, None) and decision.reason is Reason.COUPLED
    assert decision.groupings[0].family is None and decision.groupings[0].weakest > decision.settings.threshold


@pytest.mark.parametrize("method", METHODS)
def test_diffuse_whole(method):
    """Every pair of 12 entries coupled weakly (relative 0.04): no grouping is strong, but 31 % of the
    mass lies off the diagonal, in many weak pairs: one block, not one per entry."""
    matrix = torch.eye(12, dtype=torch.float64) + 0.2 * (1 - torch.eye(12, dtype=torch.float64))
    decision = decided((12,), matrix, method)
    assert key(decision) == ("whole", None, None, None) and decision.reason is Reason.DIFFUSE
    assert decision.off_diagonal == pytest.approx(132 * 0.04 / (12 + 132 * 0.04))
