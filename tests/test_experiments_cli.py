"""`hessian-blocks compare` and `hessian-blocks figures` end to end (small, few steps), with resume."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from hessian_blocks.cli import main


def test_compare_writes_tables_and_figures_and_resumes(tmp_path, capsys):
    argv = ["compare", "--size", "small", "--steps", "6", "--seeds", "1", "--optimizer", "adamw",
            "--optimizer", "adam_mini", "--lr", "adamw=1e-2", "--lr", "adam_mini=1e-2,3e-3",
            "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    assert "adam_mini" in capsys.readouterr().out
    for name in ("runs.csv", "curves.csv", "summary.csv", "loss_curves.png", "lr_sweep.png", "state_memory.png"):
        assert (tmp_path / name).stat().st_size > 0
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert sorted(zip(runs["optimizer"], runs["lr"])) == [("adam_mini", 0.003), ("adam_mini", 0.01), ("adamw", 0.01)]
    units = sorted((tmp_path / "results").glob("*.json"))
    assert len(units) == 3
    stamps = [u.stat().st_mtime_ns for u in units]
    assert main(argv) == 0  # resumed: nothing recomputed, same numbers
    assert [u.stat().st_mtime_ns for u in units] == stamps
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "runs.csv"), runs)


def test_compare_flags_a_run_that_ends_far_above_its_start_as_unstable(tmp_path, capsys):
    # SGD-momentum at lr 3 on the MLP: the loss stays finite but ends ~1e5 times above its start
    assert main(["compare", "--model", "mlp", "--size", "small", "--optimizer", "sgd", "--lr", "sgd=0.1,3",
                 "--steps", "20", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    runs = pd.read_csv(tmp_path / "runs.csv").set_index("lr")
    curves = pd.read_csv(tmp_path / "curves.csv")
    start = curves[(curves["lr"] == 3) & (curves["step"] == 0)]["loss"].item()
    assert not runs["diverged"].any() and runs["unstable"].to_dict() == {0.1: False, 3.0: True}
    assert 2 < start < 2.5 and runs.loc[3.0, "train_loss"] > 1000 * start  # finite, far above the start
    assert runs.loc[0.1, "train_loss"] < start
    summary = pd.read_csv(tmp_path / "summary.csv")  # the best lr is 0.1; its seed is neither
    assert summary[["lr", "diverged", "unstable"]].values.tolist() == [[0.1, 0, 0]]
    err = capsys.readouterr().err
    assert ("note: 1 of 2 runs diverged or ended unstable (final training loss above 2x the first step's; 'diverged' "
            f"and 'unstable' in runs.csv and summary.csv): sgd lr 3 seed 0 ({start:.3g} -> "
            f"{runs.loc[3.0, 'train_loss']:.3g})") in err


def test_the_unstable_rule_in_numbers():
    from analysis.experiments.training import unstable

    assert unstable({"losses": [6.3, 50.0, 900.0], "train_loss": 940.0})  # the run
    assert not unstable({"losses": [6.3, 7.0], "train_loss": 12.5})  # below 2 x 6.3 = 12.6
    assert unstable({"losses": [6.3, 7.0], "train_loss": 12.7})
    assert not unstable({"losses": [6.3, float("nan")], "train_loss": float("nan")})  # diverged: counted there
    assert not unstable({"losses": [], "train_loss": 1.0})


def test_compare_bad_input_exits_2(tmp_path, capsys):
    assert main(["compare", "--lr", "adamw", "--out", str(tmp_path)]) == 2
    assert "--lr expects NAME=LR" in capsys.readouterr().err
    assert main(["compare", "--optimizer", "sgd", "--lr", "adamw=1e-3", "--out", str(tmp_path)]) == 2
    assert main(["compare", "--partition", "missing.json", "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the CUDA path falls back to a clear error on CPU-only machines
        assert main(["compare", "--device", "cuda", "--steps", "1", "--seeds", "1", "--optimizer", "adamw",
                     "--lr", "adamw=1e-3", "--out", str(tmp_path), "--no-progress"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_figures_writes_the_groups_pngs(tmp_path, capsys):
    out, results = tmp_path / "figs", tmp_path / "results"
    results.mkdir()  # a manifest from an earlier run of another group at this size: kept
    (results / "figures.json").write_text(json.dumps({"size": "small", "groups": {"quadratics": ["q.png"]}}))
    assert main(["figures", "--size", "small", "--only", "hessian", "--out", str(out), "--results", str(results),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["hessian_structure_gpt2-nano.png", "hessian_structure_mlp.png"]
    assert (results / "hessian_structure.csv").exists()
    manifest = json.loads((results / "figures.json").read_text())
    assert manifest == {"size": "small", "groups": {
        "quadratics": ["q.png"],
        "hessian": [str(out / "hessian_structure_mlp.png"), str(out / "hessian_structure_gpt2-nano.png")]}}
    assert "in_block_mass" in capsys.readouterr().out


def test_figures_on_a_missing_cuda_device_exits_2_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out, results = tmp_path / "figs", tmp_path / "results"
    assert main(["figures", "--size", "small", "--only", "hessian", "--device", "cuda", "--out", str(out),
                 "--results", str(results), "--no-progress"]) == 2
    assert "CUDA is not available on this machine; use device 'cpu'" in capsys.readouterr().err
    assert not out.exists() and not results.exists()


def test_compare_with_a_partition_file_matches_the_default(tmp_path):
    import optim
    from analysis.experiments.zoo import zoo_models
    from hessian_blocks import build_model

    model = build_model("gpt2-nano", **zoo_models("small", ("gpt2-nano",))["gpt2-nano"]).model
    path = optim.default_partition(model).save(tmp_path / "partition.json")
    common = ["compare", "--size", "small", "--steps", "4", "--seeds", "1", "--optimizer", "adam_mini",
              "--lr", "adam_mini=1e-2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert main([*common, "--partition", str(path), "--out", str(tmp_path / "file")]) == 0
    default, from_file = (pd.read_csv(tmp_path / name / "runs.csv") for name in ("default", "file"))
    assert from_file["state_bytes"].tolist() == default["state_bytes"].tolist()
    assert from_file["train_loss"].tolist() == default["train_loss"].tolist()  # same blocks, same updates


COMPARE = ["compare", "--size", "small", "--steps", "2", "--seeds", "1", "--optimizer", "adamw", "--no-progress"]


@pytest.mark.parametrize("extra, message", [
    (["--lr", "adamw=1e-3", "--lr", "adamw=3e-3"], "--lr given twice for adamw: list all its rates in one option"),
    (["--lr", "adamw=1e-3,1e-3"], "--lr adamw=1e-3,1e-3: a rate is listed twice"),
    (["--lr", "adamw=1e-3,0.001"], "a rate is listed twice"),
    (["--lr", "adamw=nan"], "--lr expects NAME=LR[,LR...] with finite positive rates, got 'adamw=nan'"),
    (["--lr", "adamw=inf"], "finite positive rates, got 'adamw=inf'"),
    (["--lr", "adamw=0"], "finite positive rates, got 'adamw=0'"),
    (["--weight-decay", "-1"], "--weight-decay must be finite and >= 0, got -1.0"),
    (["--weight-decay", "nan"], "--weight-decay must be finite and >= 0, got nan"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--val-batches", "0"], "--val-batches must be >= 1, got 0"),
    (["--device", "tpu"], "unknown device 'tpu': use cpu, cuda or cuda:N"),
    (["--set", "n_layer=0"], "GPTConfig.n_layer must be a positive integer, got 0"),
    (["--data", "nosuch"], "'nosuch' is neither one of auto, digits, text, synthetic nor an existing file"),
    (["--partition", "derived"], "--partition derived: only adam_mini and galore_mini take a partition, and the "
                                 "chosen optimizers (adamw) include neither; add --optimizer adam_mini or drop "
                                 "--partition"),
])
def test_compare_refuses_bad_options_with_the_fix(extra, message, tmp_path, capsys):
    assert main([*COMPARE, *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessian-blocks compare: error:") and message in err, err
    assert not (tmp_path / "results").exists()  # refused before any training


def test_compare_refuses_a_partition_file_when_no_optimizer_takes_one(tmp_path, capsys):
    (tmp_path / "part.json").write_text("{}")
    assert main(["compare", "--optimizer", "sgd", "--partition", str(tmp_path / "part.json"), "--out",
                 str(tmp_path)]) == 2
    assert "only adam_mini and galore_mini take a partition" in capsys.readouterr().err


def test_compare_help_states_the_weight_decay_of_each_optimizer(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "decoupled, as in AdamW, for adamw, adam_mini and galore_mini; L2 (added to the gradient) for sgd" in text
    assert "at most once per optimizer" in text and "--batch-size" in text and "--val-batches" in text


def test_compare_trains_on_a_small_file_with_fewer_validation_batches(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 45)  # 2025 bytes: 202 held out
    argv = [*COMPARE, "--data", str(data), "--lr", "adamw=1e-2"]
    assert main([*argv, "--out", str(tmp_path / "default")]) == 2  # 16 validation batches of 8 windows of 16
    err = capsys.readouterr().err
    assert "(validation part) has 202 bytes; 2049 are needed" in err and "--val-batches for compare" in err
    assert main([*argv, "--batch-size", "2", "--val-batches", "3", "--out", str(tmp_path / "small")]) == 0
    runs = pd.read_csv(tmp_path / "small" / "runs.csv")
    assert len(runs) == 1 and runs["val_loss"].notna().all()


def _interrupt_after_first_save(monkeypatch):
    from analysis.experiments.store import ResultStore

    save = ResultStore.save

    def save_then_interrupt(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ResultStore, "save", save_then_interrupt)


def test_ctrl_c_in_compare_keeps_finished_units_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    argv = [*COMPARE, "--lr", "adamw=1e-2,3e-3", "--out", str(tmp_path)]
    with monkeypatch.context() as patch:
        _interrupt_after_first_save(patch)
        assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"hessian-blocks compare: interrupted; finished units are kept in {tmp_path / 'results'}; "
        "rerun the same command to resume")
    (unit,) = (tmp_path / "results").glob("*.json")
    stamp = unit.stat().st_mtime_ns
    assert main(argv) == 0  # resumed: the finished unit is read back, the other one trained
    assert len(list((tmp_path / "results").glob("*.json"))) == 2 and unit.stat().st_mtime_ns == stamp
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 2


def test_ctrl_c_in_figures_says_where_the_finished_units_are(tmp_path, capsys, monkeypatch):
    import analysis.experiments.groups as groups

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(groups, "run_group", interrupted)
    results = tmp_path / "results"
    assert main(["figures", "--size", "small", "--only", "hessian", "--out", str(tmp_path / "figs"),
                 "--results", str(results), "--no-progress"]) == 130
    assert f"hessian-blocks figures: interrupted; finished units are kept in {results}; rerun the same command " \
           "to resume" in capsys.readouterr().err


def test_committed_figures_are_what_the_groups_wrote():
    # figures/paper/results/figures.json is the manifest `figures --size paper` kept: every group, and
    # exactly the PNGs committed in figures/paper/ and (the same names at medium size) in figures/
    from analysis.experiments.groups import FIGURE_GROUPS

    root = Path(__file__).resolve().parents[1] / "figures"
    manifest = json.loads((root / "paper" / "results" / "figures.json").read_text())
    assert manifest["size"] == "paper" and set(manifest["groups"]) == set(FIGURE_GROUPS)
    listed = sorted(Path(path).name for paths in manifest["groups"].values() for path in paths)
    assert listed == sorted(p.name for p in (root / "paper").glob("*.png"))
    assert listed == sorted(p.name for p in root.glob("*.png"))
