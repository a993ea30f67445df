"""Bad input of every kind ends in one clear error naming the problem and the fix (issue 22).

Library cases assert the exception type and its text; command-line cases go through ``main()`` and
assert exit code 2 (130 for Ctrl-C) and the message. Numbers that used to come out silently wrong
are checked against a dense Hessian or a closed form.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hessian_blocks.blocks import Partition, PartitionFileError, Rule

# ---------------------------------------------------------------- partition files


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)


def _file(tmp_path, content) -> str:
    path = tmp_path / "p.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _valid() -> dict:
    return Partition.per_tensor(TwoLayers()).to_dict()


def _with_rule(**fields) -> dict:
    data = _valid()
    data["rules"][0] = {"param": "fc.weight", "split": "groups", "axis": 0, "size": 2, **fields}
    return data


@pytest.mark.parametrize("content, message", [
    ([1, 2], "holds one JSON object"),
    ("[]", "got list"),
    ("\"text\"", "got str"),
    (_with_rule(size=True), "'size' must be an integer, got True"),
    (_with_rule(size="8"), "'fc.weight': 'size' must be an integer, got '8' (str); write a number without quotes"),
    (_with_rule(size=2.0), "'size' must be an integer, got 2.0"),
    (_with_rule(axis="0"), "'fc.weight': 'axis' must be an integer, got '0'"),
    (_with_rule(size=None, runs=[[2, True], [1, 2]]), "'runs' count must be an integer, got True"),
    (_with_rule(size=None, runs=[[2.5, 2]]), "'runs' group size must be an integer, got 2.5"),
    (_with_rule(size=None, runs="22"), "'runs' must be a list of [group_size, count] pairs"),
    (_with_rule(size=None, runs=[[2, 2, 2]]), "got the entry [2, 2, 2]"),
    (_with_rule(why=3), "'why' must be a string"),
    ({**_valid(), "rules": {"param": "fc.weight"}}, "'rules' must be a list of rule objects, got dict"),
    ({**_valid(), "rules": [7]}, "each rule must be a JSON object"),
    ({**_valid(), "rules": [{"param": 3, "split": "whole"}]}, "'param' must be a parameter name"),
    ({**_valid(), "model": 5}, "'model' must be an object"),
    ({**_valid(), "model": {"param_shapes": 5}}, "'model.param_shapes' must map each parameter name to its shape"),
    ({**_valid(), "model": {"param_shapes": {"fc.weight": 6}}}, "'model.param_shapes' of 'fc.weight' must be a list"),
    ({**_valid(), "model": {"param_shapes": {"fc.weight": [6, "4"]}}}, "a size in 'model.param_shapes' of 'fc.weight'"),
    ("{not json", "is not valid JSON"),
])
@pytest.mark.parametrize("with_model", [True, False])
def test_a_malformed_partition_file_raises_the_partition_error_naming_file_and_field(tmp_path, content, message,
                                                                                      with_model):
    path = _file(tmp_path, content)
    with pytest.raises(PartitionFileError) as caught:
        Partition.load(path, TwoLayers() if with_model else None)
    assert str(caught.value).startswith(f"{path}") or f"'{path}'" in str(caught.value)
    assert message in str(caught.value)


def test_the_partition_error_is_a_value_error_and_a_folder_is_refused(tmp_path):
    assert issubclass(PartitionFileError, ValueError)
    with pytest.raises(PartitionFileError, match="is a folder: pass the JSON file itself"):
        Partition.load(tmp_path)


def test_rules_built_in_code_refuse_booleans_but_take_numpy_integers():
    with pytest.raises(TypeError, match="'size' must be an integer, got True"):
        Rule("w", "groups", axis=0, size=True)
    rule = Rule("w", "groups", axis=np.int64(1), runs=[(np.int64(2), 3)])
    assert rule.axis == 1 and type(rule.axis) is int and rule.runs == ((2, 3),)
    assert [b.numel for b in rule.resolve((2, 6))] == [4, 4, 4]


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 9) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_fields = {"param": st.sampled_from(["fc.weight", "fc.bias", "out.weight", "out.bias", "nope"]) | _json,
           "split": st.sampled_from(["whole", "elements", "groups", "rows"]) | _json,
           "axis": st.integers(-3, 3) | _json, "size": st.integers(-1, 7) | _json,
           "runs": st.lists(st.lists(st.integers(-1, 7) | _json, max_size=3), max_size=3) | _json,
           "why": st.text(max_size=5) | _json}
_rule = st.fixed_dictionaries({}, optional={**_fields, "extra": _json})
_partition = st.fixed_dictionaries({}, optional={
    "format": st.just("hessian-blocks/partition") | _json,
    "version": st.just(1) | _json,
    "model": st.fixed_dictionaries({}, optional={
        "class": _json,
        "param_shapes": st.dictionaries(st.sampled_from(["fc.weight", "fc.bias", "out.weight", "x"]),
                                        st.lists(st.integers(-1, 6) | _json, max_size=3), max_size=4) | _json}) | _json,
    "rules": st.lists(_rule, max_size=5) | _json,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_partition | _json, with_model=st.booleans())
def test_random_malformed_partition_files_raise_only_the_partition_error(tmp_path_factory, data, with_model):
    path = tmp_path_factory.mktemp("fuzz") / "p.json"
    path.write_text(json.dumps(data))
    model = TwoLayers() if with_model else None
    try:
        partition = Partition.load(path, model)
    except PartitionFileError as err:
        assert str(path) in str(err)
    else:  # whatever loads is a real partition of the shapes it names
        assert sum(b.numel for b in partition.blocks) == sum(int(np.prod(s)) for s in partition.param_shapes.values())


# ---------------------------------------------------------------- NaN in the data of a training comparison


def _digits_with_nan(path, row: int) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data[:400].astype(np.float32) / 16.0, digits.target[:400].astype(np.int64)
    x[row, 3] = np.inf if row % 2 else np.nan
    np.savez(path, x=x, y=y)
    return str(path)


@pytest.mark.parametrize("row, where", [(40, "training batch 3 of 4, inputs, sample 8"),
                                        (370, "validation batch 1 of 1, inputs, sample 10")])
def test_nan_in_a_later_training_batch_or_in_validation_is_a_data_fault_not_a_divergence(tmp_path, row, where):
    from analysis.experiments.training import TrainSetup, train_run
    from hessian_blocks.guards import DataFaultError

    data = _digits_with_nan(tmp_path / "d.npz", row)  # 400 samples: the last 40 are the validation part
    setup = TrainSetup("tests.test_experiments_training:plain_net", {}, data, batch_size=16, train_batches=4,
                       val_batches=1)
    with pytest.raises(DataFaultError, match=f"NaN or infinite values: {data}: {where} .*fault of the data, not of"):
        train_run(setup, "adamw", 1e-3, 6)


def test_compare_with_nan_in_the_data_exits_2_naming_the_data_fault(tmp_path, capsys):
    from hessian_blocks.cli import main

    data = _digits_with_nan(tmp_path / "d.npz", 40)
    assert main(["compare", "--model", "tests.test_experiments_training:plain_net", "--data", data, "--steps", "4",
                 "--seeds", "1", "--batch-size", "16", "--val-batches", "1", "--optimizer", "adamw",
                 "--lr", "adamw=1e-3", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessian-blocks compare: error: the data hold NaN or infinite values") and "diverged" not in err
