"""Partitioner on a sample of slices: long axes decided on every s-th slice, rows of C against every slice.

Oracles: a quadratic loss with a planted block-diagonal Hessian (heads, fused runs, stacked gate|up
rows, pairs finer than the sampling stride), decided once on every slice and once on a sample; the
probes of a sampled measurement are the full measurement's probes of the same slices (same seed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hessian_blocks.cli import main
from hessian_blocks.partitions.coupling import measure_coupling, planned_products, sampled_slices
from hessian_blocks.partitions.decide import decide_rule
from hessian_blocks.partitions.measured import derive_decisions
from tests.oracles import planted_block_diagonal, planted_loss


def test_sampled_slices_are_every_stride_th_slice_and_the_first_stride():
    assert sampled_slices(32, 32)[1] == 1 and list(sampled_slices(32, 32)[0]) == list(range(32))
    slices, stride = sampled_slices(128, 32)
    assert stride == 4 and list(slices) == [0, 1, 2, 3] + list(range(4, 128, 4))
    assert sampled_slices(512, 32)[1] == 8 and len(sampled_slices(512, 32)[0]) == 64 + 7   # at most every 8th
    assert sampled_slices(100, 32)[1] == 4            # the smallest stride dividing the axis that is short enough
    assert sampled_slices(99, 32)[1] == 1             # no stride divides the axis: every slice
    assert sampled_slices(4096, 0)[1] == 1            # 0: every slice
    assert planned_products((128, 64), probes=2) == 2 * (35 + 33) and planned_products((128, 64), max_slices=0) == 384
    assert planned_products((512,)) == 71             # a 1-D tensor: one unit vector per measured entry


class PlantedLong(nn.Module):
    """Parameters of 64-slice axes whose loss is 0.5 * theta^T A theta with a block-diagonal A.

    ``heads`` [64, 3]: rows couple in 4 heads of 16. ``fused`` [3, 64]: columns couple in 2 groups
    of 16, then 32 single columns. ``stacked`` [64, 2]: row i couples with row i + 32 only (a fused
    gate|up weight). ``pairs`` [64]: entries couple in pairs, finer than a stride of 4.
    """

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        shapes = {"heads": (64, 3), "fused": (3, 64), "stacked": (64, 2), "pairs": (64,)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64)))
        heads = torch.arange(192).reshape(64, 3)
        fused = torch.arange(192).reshape(3, 64)
        stacked = torch.arange(128).reshape(64, 2)
        groups = {
            "heads": [heads[16 * g : 16 * g + 16].reshape(-1) for g in range(4)],
            "fused": [fused[:, 16 * g : 16 * g + 16].reshape(-1) for g in range(2)]
            + [fused[:, c] for c in range(32, 64)],
            "stacked": [torch.cat([stacked[i], stacked[i + 32]]) for i in range(32)],
            "pairs": [torch.arange(2 * i, 2 * i + 2) for i in range(32)],
        }
        self.matrices = {name: planted_block_diagonal(int(np.prod(shapes[name])), groups[name], gen) for name in shapes}

    def forward(self, x):
        return {name: getattr(self, name) * x.mean() for name in self.matrices}




PLANTED = {
    "heads": ("groups", 0, 16, None),
    "fused": ("groups", 1, None, ((16, 2), (1, 32))),
    "stacked": ("groups", 0, 1, None),
    "pairs": ("groups", 0, 2, None),
}
BATCHES = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]


def test_a_sample_of_slices_recovers_the_planted_structure_with_fewer_products():
    model = PlantedLong()
    loss, settings = planted_loss(model.matrices), dict(probes=2, max_probes=2, dense_max=0)
    sampled = {d.rule.param: d for d in derive_decisions(model, loss, BATCHES, max_slices=16, **settings)}
    full = {d.rule.param: d for d in derive_decisions(model, loss, BATCHES, max_slices=0, **settings)}
    for name, expected in PLANTED.items():
        for decisions in (sampled, full):
            rule = decisions[name].rule
            assert (rule.split, rule.axis, rule.size, rule.runs) == expected, (name, rule.why)
    assert all(d.settled for d in sampled.values())
    assert "decided on every 4th slice" in sampled["heads"].rule.why
    assert "decided on every" not in full["heads"].rule.why
    # heads, fused and stacked: 2 probes on 19 of 64 slices plus the short axis, instead of all 64
    assert sampled["heads"].products == 2 * (19 + 3) and full["heads"].products == 2 * (64 + 3)
    assert sampled["stacked"].rule.why.count("off the pairs of 2 stacked parts") == 1
    # pairs: every 4th entry sees single entries, entries 0..4 see the pairs: measured again on every entry
    assert "measured again on every slice" in sampled["pairs"].rule.why
    assert sampled["pairs"].products == 19 + 64 and full["pairs"].products == 64


def test_a_sample_that_misses_finer_structure_is_not_settled():
    model = PlantedLong()
    coupling = measure_coupling(model, planted_loss(model.matrices), BATCHES, params=["pairs"], max_slices=16)["pairs"]
    assert coupling.stride(0) == 4 and coupling.axes[0].shape == (19, 64)
    decision = decide_rule(coupling)          # no second measurement: the decision says it is unsure
    assert not decision.settled
    assert "UNSURE" in decision.rule.why and "max_slices=0" in decision.rule.why


def test_sampled_probes_are_the_full_probes_of_those_slices():
    """Each tensor's probe signs depend on the seed, its name and the axis only: the sampled rows of
    C equal the full measurement's rows of the same slices, between measured slices exactly."""
    model = PlantedLong()
    loss = planted_loss(model.matrices)
    kwargs = dict(params=["heads", "fused"], method="probes", probes=3, seed=5)
    sampled = measure_coupling(model, loss, BATCHES, max_slices=16, **kwargs)
    full = measure_coupling(model, loss, BATCHES, max_slices=0, **kwargs)
    for name in kwargs["params"]:
        for axis, rows in sampled[name].axes.items():
            slices = sampled[name].measured(axis)
            np.testing.assert_allclose(rows[:, slices], full[name].axes[axis][np.ix_(slices, slices)], rtol=1e-12)
            np.testing.assert_allclose(sampled[name].samples[axis][:, :, slices],
                                       full[name].samples[axis][:, slices][:, :, slices], rtol=1e-12)


def test_max_slices_is_checked():
    with pytest.raises(ValueError, match="max_slices must be >= 0"):
        measure_coupling(PlantedLong(), planted_loss({}), BATCHES, max_slices=-1)


def test_cli_max_slices(tmp_path, capsys):
    assert main(["partition", "--model", "mlp", "--max-slices", "-1", "--out", str(tmp_path / "p.json")]) == 2
    assert "--max-slices must be >= 0" in capsys.readouterr().err
    out = tmp_path / "p.json"
    assert main(["partition", "--model", "gpt2-nano", "--set", "n_layer=1", "--set", "n_embd=16", "--set",
                 "vocab_size=64", "--set", "context=8", "--max-slices", "8", "--no-progress", "--out", str(out)]) == 0
    assert "decided on every 2nd slice" in out.read_text()   # the MLP's 64 rows and the vocabulary's 64 tokens


def test_sampled_couplings_survive_a_round_trip(tmp_path):
    from hessian_blocks.partitions.coupling import load_couplings, save_couplings

    model = PlantedLong()
    couplings = measure_coupling(model, planted_loss(model.matrices), BATCHES, params=["heads", "pairs"], max_slices=16,
                                 dense_max=0)
    save_couplings(couplings, tmp_path / "c.npz")
    loaded = load_couplings(tmp_path / "c.npz")
    for name, coupling in couplings.items():
        assert loaded[name].strides == coupling.strides == {0: 4}
        np.testing.assert_array_equal(loaded[name].measured(0), coupling.measured(0))
        np.testing.assert_array_equal(loaded[name].axes[0], coupling.axes[0])
        assert decide_rule(loaded[name]).rule == decide_rule(coupling).rule
