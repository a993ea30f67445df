"""Bad input of every kind ends in one clear error naming the problem and the fix (issue 22).

Library cases assert the exception type and its text; command-line cases go through ``main()`` and
assert exit code 2 (130 for Ctrl-C) and the message. Numbers that used to come out silently wrong
are checked against a dense Hessian or a closed form.
"""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
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


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
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
    assert (err.startswith("hessian-blocks compare: error: the data hold NaN or infinite values")
            and "diverged" not in err)


# ---------------------------------------------------------------- the command line: spectra and JS

from hessian_blocks.cli import main  # noqa: E402
from hessian_blocks.lanczos import LanczosResult  # noqa: E402
from hessian_blocks.results import BroadeningWarning, DensityResult, SpectrumResult  # noqa: E402

FAST = ["--steps", "4", "--probes", "2", "--grid-points", "2000", "--sigma2", "1e-3", "--no-progress"]


def tiny_classifier(hidden: int = 4, dropout: float = 0.0) -> nn.Module:
    """A user model for ``--model tests.test_bad_inputs:tiny_classifier`` (5 features, 3 classes)."""
    layers = [nn.Linear(5, hidden), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(hidden, 3)]
    return nn.Sequential(*layers)


USER_MODEL = "tests.test_bad_inputs:tiny_classifier"


def _synthetic_spectrum(model: str, centres=(1.0, 1.0, 3.0), spreads=(1e-6, 2e-6, 0.5)) -> SpectrumResult:
    """Three blocks of 20 coordinates whose tridiagonals have eigenvalues about centre +- 2 spread."""
    blocks, probes, steps = len(centres), 2, 4
    alpha = np.broadcast_to(np.asarray(centres, float)[:, None, None], (blocks, probes, steps)).copy()
    beta = np.broadcast_to(np.asarray(spreads, float)[:, None, None], (blocks, probes, steps)).copy()
    beta[:, :, -1] = 0.0
    return SpectrumResult(names=[f"w{i}" for i in range(blocks)], params=[f"w{i}" for i in range(blocks)],
                          shapes=[(20,)] * blocks, sizes=[20] * blocks,
                          lanczos=LanczosResult(alpha, beta, np.full((blocks, probes), steps)),
                          settings={"model": model})


def _labels_file(path, labels) -> str:
    gen = np.random.default_rng(0)
    np.savez(path, x=gen.normal(size=(len(labels), 5)), y=np.asarray(labels))
    return str(path)


@pytest.mark.parametrize("labels, message", [
    ([0, 1, 2, 1, 7, 0, 1, 2], "Target 7 is out of bounds"),
    ([0, 1, 2, 1, 0, -1, 1, 2], "Target -1 is out of bounds"),
    ([0.0, 1.0, 2.5, 1.0, 0.0, 1.0, 1.0, 2.0], "labels fit its output"),
])
def test_js_refuses_labels_out_of_range_negative_or_fractional_in_any_batch(tmp_path, capsys, labels, message):
    data = _labels_file(tmp_path / "d.npz", labels)
    assert main(["js", "--model", USER_MODEL, "--data", data, "--batches", "2", "--batch-size", "4", *FAST,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessian-blocks js: error: the model fails on") and message in err, err
    assert "batch 2 of 2" in err or "batch 1 of 2" in err
    assert not (tmp_path / "out").exists()


def test_js_refuses_nan_in_a_later_batch_as_a_data_fault(tmp_path, capsys):
    gen = np.random.default_rng(0)
    x = gen.normal(size=(8, 5))
    x[6, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(8) % 3)
    assert main(["js", "--model", USER_MODEL, "--data", str(tmp_path / "d.npz"), "--batches", "2", "--batch-size", "4",
                 *FAST, "--out", str(tmp_path / "out")]) == 2
    assert "NaN or infinite values: " in (err := capsys.readouterr().err) and "batch 2 of 2, inputs, sample 2" in err


def test_js_from_damaged_or_foreign_npz_files_exits_2_naming_the_file(tmp_path, capsys):
    good = _synthetic_spectrum("m").save(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x80\x04 not an archive at all")
    foreign = tmp_path / "data.npz"
    np.savez(foreign, x=np.ones(3), y=np.zeros(3))
    density = DensityResult(np.linspace(0, 1, 5), np.ones((1, 5)), ["w"], 1e-3).save(tmp_path / "density.npz")
    for path, message in ((truncated, "is a truncated or damaged .npz archive"), (garbage, "is not an .npz archive"),
                          (foreign, "is an .npz archive of other arrays (x, y), not a hessian-blocks/spectrum file"),
                          (density, "expected a 'hessian-blocks/spectrum' file, found format 'hessian-blocks/density'"),
                          (tmp_path, "is a folder")):
        assert main(["js", "--from-results", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hessian-blocks js: error: '{path}'") and message in err, err
        assert "allow_pickle" not in err and "Traceback" not in err


@pytest.mark.parametrize("command, out, message", [
    ("js", "file", "is an existing file, not a folder"),
    ("js", "file/sub", "is a file, so nothing can be written under it"),
    ("spectrum", "file", "is an existing file, not a folder"),
    ("compare", "file", "is an existing file, not a folder"),
    ("figures", "file/sub", "is a file, so nothing can be written under it"),
    ("partition", "folder", "is a folder: give the path of the file to write"),
])
def test_an_out_path_of_the_wrong_kind_exits_2_before_any_work(tmp_path, capsys, command, out, message):
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "folder").mkdir()
    model = [] if command == "figures" else ["--model", "mlp"]
    assert main([command, *model, "--out", str(tmp_path / out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hessian-blocks {command}: error: --out {tmp_path / out}") and message in err, err
    assert (tmp_path / "file").read_text() == "keep me"


def test_partition_couplings_that_is_a_folder_exits_2(tmp_path, capsys):
    assert main(["partition", "--model", "mlp", "--couplings", str(tmp_path), "--out", str(tmp_path / "p.json"),
                 "--no-progress"]) == 2
    assert f"--couplings {tmp_path} is a folder: give the path of the file to write, e.g. " \
           f"{tmp_path / 'couplings.npz'}" in capsys.readouterr().err


def test_empty_text_data_and_bad_set_values_on_a_user_factory_exit_2_with_the_fix(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["js", "--model", "gpt2-nano", "--data", str(tmp_path / "empty.txt"), *FAST,
                 "--out", str(tmp_path)]) == 2
    assert "has 0 bytes; 513 are needed" in capsys.readouterr().err
    assert main(["js", "--model", USER_MODEL, "--set", "hidden=abc", *FAST, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the factory failed when called with the config overrides hidden='abc'" in err and "--set FIELD=VALUE" in err


def test_summary_records_the_density_settings_so_two_summaries_explain_their_js0(tmp_path):
    from analysis import js0, js_matrix

    source = _synthetic_spectrum("m", spreads=(0.2, 0.05, 0.5)).save(tmp_path / "m.npz")
    summaries = {}
    for sigma2 in (1e-3, 1e-2):
        out = tmp_path / f"s{sigma2}"
        assert main(["js", "--from-results", str(source), "--sigma2", str(sigma2), "--grid-points", "3000",
                     "--out", str(out)]) == 0
        summaries[sigma2] = json.loads((out / "m" / "summary.json").read_text())
        density = DensityResult.load(out / "m" / "density.npz")
        assert summaries[sigma2]["js0"] == pytest.approx(js0(js_matrix(density.densities)), rel=1e-12)
        assert SpectrumResult.load(out / "m" / "spectrum.npz") == SpectrumResult.load(source)  # a complete folder
    for sigma2, summary in summaries.items():
        assert summary["sigma2"] == sigma2 and summary["grid_points"] == 3000 and summary["rescale_rank"] is None
        spectrum = SpectrumResult.load(source)
        assert summary["grid_range"] == pytest.approx([spectrum.lambda_min().min() - 1,
                                                       spectrum.lambda_max().max() + 1])
    assert summaries[1e-3]["js0"] > summaries[1e-2]["js0"]  # the broader Gaussians overlap more


def test_blocks_narrower_than_the_broadening_are_named_in_a_warning(tmp_path, capsys):
    spectrum = _synthetic_spectrum("m")  # w0 and w1: width ~1e-5 about 1.0; w2: width ~2 about 3.0
    with pytest.warns(BroadeningWarning) as caught:
        density = spectrum.density(sigma2=1e-5, n_points=20000)
    message = str(caught[0].message)
    assert message.startswith("2 of 3 blocks have a whole spectrum narrower than the Gaussian broadening")
    assert "'w0'" in message and "'w1'" in message and "'w2'" not in message and "rescale_rank=10" in message
    from analysis import js_matrix

    assert js_matrix(density.densities)[0, 1] < 0.05  # what the warning is about: two spectra, one Gaussian
    widths = spectrum.lambda_max() - spectrum.lambda_min()
    assert widths[0] < 2 * 2.5e-6 < widths[1]
    with pytest.warns(BroadeningWarning, match="1 of 3 blocks .*: 'w0'"):  # a smaller sigma2 resolves w1, not w0
        spectrum.density(sigma2=2.5e-6 ** 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", BroadeningWarning)
        _synthetic_spectrum("m", spreads=(0.1, 0.2, 0.5)).density(sigma2=1e-5)  # every block wide enough: silent
    path = spectrum.save(tmp_path / "m.npz")
    assert main(["js", "--from-results", str(path), "--sigma2", "1e-5", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("hessian-blocks js: warning: 2 of 3 blocks") and err.count("\n") == 1


def test_the_cli_says_when_it_measures_a_dropout_model_in_eval_mode(tmp_path, capsys):
    data = _labels_file(tmp_path / "d.npz", [0, 1, 2, 0, 1, 2, 0, 1])
    assert main(["js", "--model", USER_MODEL, "--set", "dropout=0.5", "--data", data, "--batch-size", "8", *FAST,
                 "--out", str(tmp_path)]) == 0  # in train mode the guards would refuse the Dropout
    err = capsys.readouterr().err
    assert "note: tests.test_bad_inputs:tiny_classifier: measured in eval mode, so '2' (Dropout)" in err


def test_ctrl_c_in_js_exits_130_leaving_complete_folders_or_a_marked_partial_one(tmp_path, capsys, monkeypatch):
    import analysis

    first, second = (_synthetic_spectrum(m, spreads=(0.2, 0.05, 0.5)).save(tmp_path / f"{m}.npz") for m in "ab")
    out = tmp_path / "out"
    (out / "b").mkdir(parents=True)
    (out / "b" / "summary.json").write_text("{\"from\": \"an earlier run\"}")
    real_save, calls = analysis.save_figure, []

    def interrupted_on_the_third_figure(figure, path):
        calls.append(path)
        if len(calls) == 3:  # model b's first figure: a, with two figures, is complete
            raise KeyboardInterrupt
        return real_save(figure, path)

    monkeypatch.setattr(analysis, "save_figure", interrupted_on_the_third_figure)
    argv = ["js", "--from-results", str(first), "--from-results", str(second), "--grid-points", "2000",
            "--sigma2", "1e-3", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().startswith("hessian-blocks js: interrupted; every model finished before it has all its files")
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "a").iterdir()) == ["blocks.csv", "densities.png", "density.npz",
                                                            "js_heatmap.png", "js_matrix.csv", "spectrum.npz",
                                                            "summary.json"]
    partial = out / f"b.{os.getpid()}.partial"  # a folder of this run's own
    assert partial.is_dir() and not (partial / "summary.json").exists()
    assert json.loads((out / "b" / "summary.json").read_text()) == {"from": "an earlier run"}  # left as it was
    assert not (out / "js0.csv").exists()
    monkeypatch.setattr(analysis, "save_figure", real_save)
    assert main(argv) == 0  # the same command again: complete folders, no partial one left
    assert not partial.exists() and json.loads((out / "b" / "summary.json").read_text())["model"] == "b"


def test_figures_keeps_its_work_units_under_out_unless_results_says_otherwise(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import analysis.experiments.groups as groups

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(groups, "run_group", lambda name, size, results, **_: seen.append(results) or
                        SimpleNamespace(tables={}, figures={}))
    assert main(["figures", "--size", "small", "--only", "hessian", "--out", "figs", "--no-progress"]) == 0
    assert seen == [Path("figs") / "results"] and (tmp_path / "figs" / "results" / "figures.json").exists()
    assert not (tmp_path / "runs").exists()
    assert main(["figures", "--size", "small", "--only", "hessian", "--out", "figs", "--results", "elsewhere",
                 "--no-progress"]) == 0
    assert seen[-1] == Path("elsewhere")


def test_a_malformed_partition_file_on_the_command_line_exits_2_naming_file_and_parameter(tmp_path, capsys):
    model = tiny_classifier()
    data = Partition.per_tensor(model).to_dict()
    data["rules"][0] = {"param": "0.weight", "split": "groups", "axis": "0", "size": 1}
    path = _file(tmp_path, data)
    assert main(["js", "--model", USER_MODEL, "--partition", path, *FAST, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hessian-blocks js: error: {path}: rule for '0.weight': 'axis' must be an integer, got '0'")
    (tmp_path / "list.json").write_text("[]")
    assert main(["js", "--model", USER_MODEL, "--partition", str(tmp_path / "list.json"), *FAST,
                 "--out", str(tmp_path / "out")]) == 2
    assert "list.json: a partition file holds one JSON object" in capsys.readouterr().err


def test_density_settings_that_fail_after_measuring_keep_the_measured_spectrum(tmp_path, capsys):
    data = _labels_file(tmp_path / "d.npz", [0, 1, 2, 0, 1, 2, 0, 1])
    out = tmp_path / "out"
    assert main(["js", "--model", USER_MODEL, "--data", data, "--batch-size", "8", *FAST, "--rescale-rank", "50",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    kept = out / f"{USER_MODEL.replace(':', '_')}.{os.getpid()}.partial" / "spectrum.npz"
    assert ("--rescale-rank 50 leaves 0 of 4 blocks that can be divided by their 50-th largest eigenvalue, 2 needed "
            "('0.weight' (20 coordinates, fewer than 50)") in err and f"--from-results {kept}" in err
    assert main(["js", "--from-results", str(kept), "--grid-points", "2000", "--sigma2", "1e-3",
                 "--out", str(tmp_path / "again")]) == 0


def test_rescale_rank_leaves_out_the_blocks_it_cannot_divide_with_a_warning_and_records_them(tmp_path, capsys):
    from analysis import js0, js_matrix
    from tests.test_results import mixed_blocks_spectrum

    spectrum = mixed_blocks_spectrum()  # blocks 2..4: 6 coordinates, rank 5 of 15, negative definite
    saved = spectrum.save(tmp_path / "mixed.npz")
    out = tmp_path / "out"
    assert main(["js", "--from-results", str(saved), "--rescale-rank", "10", "--grid-points", "20000",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    left_out = spectrum.unrescalable(10)
    listed = ", ".join(f"'{name}' ({why})" for name, why in left_out.items())
    assert (f"hessian-blocks js: warning: mixed: --rescale-rank 10 leaves out 3 of 5 blocks, which cannot be divided "
            f"by their 10-th largest eigenvalue: {listed}; the densities and JS0 compare the other 2 "
            "(rescale_left_out in summary.json)") in captured.err
    summary = json.loads((out / "mixed" / "summary.json").read_text())
    assert summary["rescale_left_out"] == left_out and list(left_out) == spectrum.names[2:]
    assert summary["blocks"] == 5 and summary["blocks_compared"] == 2 and summary["rescale_rank"] == 10
    expected = js0(js_matrix(spectrum.select([0, 1]).density(rescale_rank=10, n_points=20000).densities))
    assert summary["js0"] == pytest.approx(expected, rel=1e-12) and expected > 0.05
    table = pd.read_csv(out / "mixed" / "blocks.csv")  # every block; those left out have no mean JS distance
    assert table["block"].tolist() == spectrum.names and table["mean_js"].isna().tolist() == [False] * 2 + [True] * 3
    assert pd.read_csv(out / "mixed" / "js_matrix.csv", index_col=0).index.tolist() == spectrum.names[:2]
    assert "mixed: 2 of 5 blocks compared" in captured.out
    # nothing to leave out: no warning, an empty record
    four = spectrum.select([0, 1, 2, 3]).save(tmp_path / "four.npz")
    assert main(["js", "--from-results", str(four), "--rescale-rank", "3", "--grid-points", "20000",
                 "--out", str(out)]) == 0
    assert "leaves out" not in capsys.readouterr().err
    assert json.loads((out / "mixed" / "summary.json").read_text())["rescale_left_out"] == {}
    # fewer than two blocks left: no JS0, and the error names the ways out
    assert main(["js", "--from-results", str(saved), "--rescale-rank", "13", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessian-blocks js: error: mixed: --rescale-rank 13 leaves 1 of 5 blocks that can be divided "
                          "by their 13-th largest eigenvalue, 2 needed (") and "drop --rescale-rank" in err


def test_labels_out_of_range_in_a_later_training_batch_fail_before_training(tmp_path):
    from sklearn.datasets import load_digits

    from analysis.experiments.training import TrainSetup, train_run

    digits = load_digits()
    x, y = digits.data[:400].astype(np.float32) / 16.0, digits.target[:400].astype(np.int64)
    y[40] = 14  # 10 classes
    np.savez(tmp_path / "d.npz", x=x, y=y)
    setup = TrainSetup("tests.test_experiments_training:plain_net", {}, str(tmp_path / "d.npz"), batch_size=16,
                       train_batches=4, val_batches=1)
    with pytest.raises(ValueError, match=r"fails on .*: training batch 3 of 4 .*Target 14 is out of bounds"):
        train_run(setup, "adamw", 1e-3, 6)
