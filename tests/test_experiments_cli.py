"""`hessian-blocks compare` and `hessian-blocks figures` end to end (small, few steps), with resume."""

import json

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
