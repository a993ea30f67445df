"""The papers' Table 1: the paper preset's architectures, the quick (small) run end to end from the CLI,
and the time budget that lets a GPU run stop after the models it finishes."""

import pandas as pd
import pytest

from analysis.experiments.table1 import PAPER_MODELS, Table1Config, table1_experiment, table1_orderings
from hessian_blocks import build_model
from hessian_blocks.cli import main


@pytest.mark.parametrize(("label", "count"), [("ResNet18", 11_689_512), ("ViT-base", 86_567_656)])
def test_the_paper_preset_builds_the_published_architectures(label, count):
    """Parameter counts of torchvision's resnet18 and timm's vit_base_patch16_224 (1000 classes)."""
    row = PAPER_MODELS[label]
    assert sum(p.numel() for p in build_model(row.model, **row.overrides).model.parameters()) == count
    config = Table1Config.preset("paper")
    assert list(config.models) == ["ResNet18", "VGG16", "ViT-base", "BERT-base", "GPT-2-small"]
    assert (config.steps, config.probes, config.layers, config.rescale_rank) == (100, 10, 4, 10)
    assert config.models["GPT-2-small"].overrides["context"] == 1024


def test_quick_table1_writes_the_table_heatmaps_figure3_and_whether_the_orderings_hold(tmp_path, capsys):
    out = tmp_path / "table1"
    assert main(["table1", "--size", "small", "--out", str(out), "--no-progress"]) == 0
    labels = ["ResNet18", "VGG16", "ViT-base", "BERT-base", "GPT-2-small"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        ["table1_js0.png", "table1_block_spectra.png", *[f"table1_js_heatmap_{label}.png" for label in labels]])
    table = pd.read_csv(out / "table1.csv")
    assert sorted(table["model"]) == sorted(labels) and (table["JS0"] > 0).all()
    assert table["JS0"].is_monotonic_decreasing and set(table["family"]) == {"CNN", "Transformer"}
    orderings = pd.read_csv(out / "table1_orderings.csv")
    assert orderings["ordering"][0] == "every Transformer's JS0 above every CNN's"
    lowest = table[table["family"] == "Transformer"]["JS0"].min()
    assert orderings["holds"][0] == bool(lowest > table[table["family"] == "CNN"]["JS0"].max())
    printed = capsys.readouterr().out
    assert "the papers' orderings" in printed and "every Transformer's JS0 above every CNN's" in printed
    assert len(list((out / "results").glob("spectrum-*.npz"))) == 5  # kept: a rerun resumes
    assert main(["table1", "--size", "small", "--model", "VGG16", "--budget", "0.000001", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    assert "ran out before VGG16 finished" in capsys.readouterr().out
    assert main(["table1", "--size", "small", "--model", "GPT-3", "--out", str(tmp_path / "c")]) == 2
    assert "not in Table 1: GPT-3" in capsys.readouterr().err


def test_a_time_budget_stops_before_the_models_it_cannot_finish_and_says_which(tmp_path):
    config = Table1Config.preset("small", models=("VGG16", "GPT-2-small"))
    spectra, unfinished = table1_experiment(config, out=tmp_path, progress=False, budget_s=0.0)
    assert spectra == {} and unfinished == ["VGG16", "GPT-2-small"]
    assert table1_orderings(pd.DataFrame(columns=["model", "family", "JS0"]))["holds"].tolist() == [None]
    spectra, unfinished = table1_experiment(config, out=tmp_path, progress=False)
    assert list(spectra) == ["VGG16", "GPT-2-small"] and unfinished == []
    assert spectra["GPT-2-small"].settings["layers"] == 4 and spectra["VGG16"].settings["seconds"] > 0
    with pytest.raises(ValueError, match="not in Table 1: GPT-3; choose from ResNet18"):
        Table1Config.preset("small", models=("GPT-3",))
