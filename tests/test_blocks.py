import json

import pytest
import torch
from torch import nn

from hessian_blocks.blocks import (
    Block,
    Partition,
    PartitionFileError,
    Rule,
    layer_indices,
    runs_of,
    sample_layers,
    select_blocks,
)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 4)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(self.norm(x))


def covered_entries(blocks, shape):
    seen = torch.zeros(torch.Size(shape).numel(), dtype=torch.long)
    for block in blocks:
        seen[block.flat_indices()] += 1
    return seen


def test_per_tensor_partition_has_one_whole_block_per_parameter():
    model = TwoLayer()
    partition = Partition.per_tensor(model)
    assert [b.param for b in partition.blocks] == [n for n, _ in model.named_parameters()]
    assert all(b.shape == tuple(p.shape) for b, (_, p) in zip(partition.blocks, model.named_parameters()))
    assert sum(b.numel for b in partition.blocks) == sum(p.numel() for p in model.parameters())


def test_group_rules_cover_every_entry_once_and_slice_the_right_entries():
    shape = (6, 4)
    reference = torch.arange(24).reshape(shape)
    rows = Rule("w", "groups", axis=0, size=2).resolve(shape)
    cols = Rule("w", "groups", axis=1, size=1).resolve(shape)
    runs = Rule("w", "groups", axis=0, runs=((1, 2), (4, 1))).resolve(shape)
    elements = Rule("w", "elements").resolve(shape)
    for blocks in (rows, cols, runs, elements):
        assert torch.equal(covered_entries(blocks, shape), torch.ones(24, dtype=torch.long))
    assert [b.numel for b in rows] == [8, 8, 8]
    assert torch.equal(reference.reshape(-1)[rows[1].flat_indices()], reference[2:4].reshape(-1))
    assert torch.equal(reference.reshape(-1)[cols[3].flat_indices()], reference[:, 3])
    assert [(b.start, b.stop) for b in runs] == [(0, 1), (1, 2), (2, 6)]
    assert runs[2].shape == (4, 4) and cols[0].shape == (6, 1)
    assert len(elements) == 24 and elements[5].flat_indices().tolist() == [5]


@pytest.mark.parametrize(
    "rule, message",
    [
        (dict(param="w", split="groups", axis=0, size=4), "does not divide"),
        (dict(param="w", split="groups", axis=0, runs=((2, 2),)), "cover 4 indices"),
        (dict(param="w", split="groups", axis=3, size=1), "out of range"),
    ],
)
def test_group_rules_that_do_not_fit_the_shape_raise(rule, message):
    with pytest.raises(ValueError, match=message):
        Rule(**rule).resolve((6, 4))


def test_malformed_rules_raise():
    with pytest.raises(ValueError, match="split must be one of"):
        Rule("w", "rows")
    with pytest.raises(ValueError, match="exactly one of 'size' or 'runs'"):
        Rule("w", "groups", axis=0)
    with pytest.raises(ValueError, match="takes no axis"):
        Rule("w", "whole", axis=0)


def test_partition_file_round_trip_and_checks(tmp_path):
    model = TwoLayer()
    rules = [Rule(n, "groups", axis=0, size=1, why="per neuron") if p.dim() == 2 else Rule(n, "whole")
             for n, p in model.named_parameters()]
    partition = Partition.from_rules(model, rules)
    path = partition.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["format"] == "hessian-blocks/partition" and data["version"] == 1
    assert data["model"]["param_shapes"]["layers.0.weight"] == [6, 4]
    loaded = Partition.load(path, model)
    assert loaded.rules == partition.rules and loaded.blocks == partition.blocks
    assert len(loaded.blocks) == 6 + 1 + 4 + 1 + 1 + 1 + 3

    data["rules"] = data["rules"][1:]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no rule for parameter\(s\) \['layers.0.weight'\]"):
        Partition.load(tmp_path / "missing.json", model)

    other = TwoLayer()
    other.layers[0] = nn.Linear(4, 8)
    with pytest.raises(ValueError, match="'layers.0.weight' has shape \\[6, 4\\] in the file but \\[8, 4\\]"):
        Partition.load(path, other)

    data = partition.to_dict()
    data["rules"].append({"param": "nope.weight", "split": "whole"})
    with pytest.raises(ValueError, match="'nope.weight', which is not a trainable parameter"):
        Partition.from_dict(data, model)
    with pytest.raises(ValueError, match="'format' must be"):
        Partition.from_dict({"format": "x"}, model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Partition.load(tmp_path / "absent.json", model)


def test_frozen_parameters_are_not_partitioned():
    model = TwoLayer()
    model.head.weight.requires_grad_(False)
    assert "head.weight" not in [b.param for b in Partition.per_tensor(model).blocks]


def test_select_blocks_by_glob_and_sample_layers():
    blocks = [Block(n, n, s, None, 0, torch.Size(s).numel()) for n, s in [
        ("emb.weight", (10, 4)), *[(f"h.{i}.fc.weight", (4, 4)) for i in range(12)],
        *[(f"h.{i}.fc.bias", (4,)) for i in range(12)], ("head.weight", (3, 4)),
    ]]
    assert [b.name for b in select_blocks(blocks,
                                          ["h.1.*", "head.*"])] == ["h.1.fc.weight", "h.1.fc.bias", "head.weight"]
    with pytest.raises(ValueError, match="matches no block"):
        select_blocks(blocks, ["encoder.*"])
    sampled = [b.name for b in sample_layers(blocks, 3)]
    assert sampled == ["emb.weight", "h.0.fc.weight", "h.6.fc.weight", "h.11.fc.weight", "head.weight"]


def test_runs_of_inverts_group_sizes():
    rule = Rule("w", "groups", axis=1, runs=((8, 2), (1, 3), (8, 1)))
    sizes = rule.group_sizes((4, 27))
    assert sizes == [8, 8, 1, 1, 1, 8]
    assert runs_of(sizes) == ((8, 2), (1, 3), (8, 1))
    assert runs_of([]) == () and runs_of([4]) == ((4, 1),)


def test_layer_indices_are_the_integer_components():
    assert layer_indices("h.3.mlp.0.weight") == (3, 0)
    assert layer_indices("encoder.layer.11.attention.self.query.weight") == (11,)
    assert layer_indices("wte.weight") == () and layer_indices("0") == (0,)
    assert layer_indices("block3.fc1.weight") == ()   # digits inside a name are not an index


def test_sample_layers_takes_the_first_repeated_container_as_the_layers():
    """A VGG's classifier.N counts as head, not as layers 0, 2, 4 mixed into features.N's."""
    shapes = [*[(f"features.{i}.weight", (4, 4, 3, 3)) for i in (0, 2, 5, 7, 10, 12, 14)],
              *[(f"classifier.{i}.weight", (4, 4)) for i in (0, 2, 4)]]
    blocks = [Block(n, n, s, None, 0, torch.Size(s).numel()) for n, s in shapes]
    assert [b.name for b in sample_layers(blocks, 3)] == [
        "features.0.weight", "features.7.weight", "features.14.weight",
        "classifier.0.weight", "classifier.2.weight", "classifier.4.weight"]


# ----------------------------------------------------------------------------- merged axes (format version 2)


class Experts(nn.Module):
    """Two experts of 3 output rows and 4 inputs stored [experts, rows, columns], and a router."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 2, bias=False)
        self.experts = nn.Parameter(torch.randn(2, 3, 4))


def test_merged_axes_give_one_block_per_expert_and_row():
    shape = (2, 3, 4)
    reference = torch.arange(24).reshape(shape)
    blocks = Rule("w", "groups", axis=[0, 1], size=1).resolve(shape)
    assert torch.equal(covered_entries(blocks, shape), torch.ones(24, dtype=torch.long))
    assert len(blocks) == 6 and blocks[4].axis == (0, 1) and blocks[4].axes == (0, 1)
    assert blocks[4].name == "w[axes0-1 4:5]" and blocks[4].shape == (1, 4) and blocks[4].numel == 4
    for expert in range(2):
        for row in range(3):
            block = blocks[3 * expert + row]
            assert torch.equal(reference.reshape(-1)[block.flat_indices()], reference[expert, row])
    # heads of 3 rows per expert = one block per expert; the last two axes merged: (row, column) of every expert
    per_expert = Rule("w", "groups", axis=(0, 1), size=3).resolve(shape)
    assert [torch.equal(reference.reshape(-1)[b.flat_indices()], reference[e].reshape(-1))
            for e, b in enumerate(per_expert)] == [True, True]
    inner = Rule("w", "groups", axis=[-2, -1], size=4).resolve(shape)
    assert inner[0].axis == (1, 2) and inner[0].shape == (2, 4)
    assert torch.equal(reference.reshape(-1)[inner[1].flat_indices()], reference[:, 1].reshape(-1))
    assert Rule("w", "groups", axis=[1], size=1) == Rule("w", "groups", axis=1, size=1)  # one axis in a list


def test_a_group_may_not_straddle_two_experts():
    """Groups run along the merged (expert, row) axis; one that holds the last rows of one expert and the first
    of the next is refused (it is nearly always a size that does not divide the rows per expert), one that
    covers whole experts is fine."""
    shape = (2, 3, 4)
    with pytest.raises(ValueError, match=r"group 1 \(merged indices 2:4\) straddles a boundary of the outer merged "
                                         r"axes \[0\].*use a group size that divides 3"):
        Rule("w", "groups", axis=[0, 1], size=2).resolve(shape)
    with pytest.raises(ValueError, match="straddles"):
        Rule("w", "groups", axis=[0, 1], runs=((1, 2), (2, 1), (1, 2))).resolve(shape)
    assert len(Rule("w", "groups", axis=[0, 1], size=6).resolve(shape)) == 1
    assert [b.numel for b in Rule("w", "groups", axis=[0, 1], runs=((2, 1), (1, 1), (1, 3))).resolve(shape)] == \
        [8, 4, 4, 4, 4]
    with pytest.raises(ValueError, match=r"axes \[0, 1\] \(2 x 3 indices of 4 slices"):   # every level of a merge
        Rule("w", "groups", axis=[0, 1, 2], size=6).resolve(shape)
    Rule("w", "groups", axis=[0, 1, 2], size=12).resolve(shape)


@pytest.mark.parametrize("axis, message", [
    ([0, 2], r"'axis' \[0, 2\] must be consecutive increasing axes"),
    ([1, 0], r"'axis' \[1, 0\] must be consecutive increasing axes"),
    ([-1, 0], r"'axis' \[-1, 0\] must be consecutive increasing axes of one sign"),
    ([], "'axis' is an empty list"),
    ([0, "1"], "'axis' entry must be an integer"),
])
def test_malformed_merged_axes_raise(axis, message):
    with pytest.raises((ValueError, TypeError), match=f"rule for 'w': {message}"):
        Rule("w", "groups", axis=axis, size=1)


def test_merged_axes_out_of_range_raise():
    with pytest.raises(ValueError, match=r"rule for 'w': axis \[1, 2\] is out of range for shape \(6, 4\)"):
        Rule("w", "groups", axis=[1, 2], size=1).resolve((6, 4))
    with pytest.raises(ValueError, match=r"group size 5 does not divide axes \[0, 1\] \(merged length 2 x 3 = 6\)"):
        Rule("w", "groups", axis=[0, 1], size=5).resolve((2, 3, 4))


def test_version_2_file_round_trip_and_version_1_files_still_load(tmp_path):
    model = Experts()
    merged = Partition.from_rules(model, [Rule("router.weight", "groups", axis=0, size=1),
                                          Rule("experts", "groups", axis=[0, 1], size=1, why="per (expert, row)")])
    data = json.loads(merged.save(tmp_path / "v2.json").read_text())
    by_param = {rule["param"]: rule for rule in data["rules"]}
    assert data["version"] == 2 and by_param["experts"]["axis"] == [0, 1] and by_param["router.weight"]["axis"] == 0
    loaded = Partition.load(tmp_path / "v2.json", model)
    assert loaded.rules == merged.rules and loaded.blocks == merged.blocks and len(loaded.blocks) == 2 + 6
    # no rule merges axes: version 1, readable by older releases
    plain = Partition.from_rules(model, [Rule("router.weight", "groups", axis=0, size=1), Rule("experts", "whole")])
    assert json.loads(plain.save(tmp_path / "v1.json").read_text())["version"] == 1
    assert Partition.load(tmp_path / "v1.json", model).rules == plain.rules
    # a list axis in a version-1 file: a clear error naming the rule and the fix
    data["version"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PartitionFileError, match=r"bad.json: rule for 'experts': 'axis' \[0, 1\] \(a list of axes\) "
                                                 r"needs a version-2 file: write \"version\": 2"):
        Partition.load(tmp_path / "bad.json", model)
    for version in (3, "2", True, None):
        data["version"] = version
        with pytest.raises(PartitionFileError, match=f"unsupported version {version!r}"):
            Partition.from_dict(data, model)
    data["version"], by_param["experts"]["axis"] = 2, [0, 2]
    with pytest.raises(PartitionFileError, match=r"rule for 'experts': 'axis' \[0, 2\] must be consecutive"):
        Partition.from_dict(data, model)
