"""The console script end to end on a tiny GPT, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon

from hessian_blocks.cli import main
from hessian_blocks.results import DensityResult, SpectrumResult

TINY = ["--model", "gpt2-nano", "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2",
        "--set", "vocab_size=300", "--set", "context=8", "--batch-size", "2", "--batches", "2",
        "--steps", "8", "--probes", "2", "--grid-points", "4000", "--sigma2", "1e-3", "--no-progress"]


def test_js_end_to_end_writes_consistent_files_and_is_reproducible(tmp_path, capsys):
    assert main(["js", *TINY, "--blocks", "blocks.0.attn.*", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    folder = tmp_path / "a" / "gpt2-nano"
    for name in ("spectrum.npz", "density.npz", "blocks.csv", "js_matrix.csv", "summary.json", "js_heatmap.png",
                 "densities.png"):
        assert (folder / name).stat().st_size > 0, name
    spectrum = SpectrumResult.load(folder / "spectrum.npz")
    density = DensityResult.load(folder / "density.npz")
    matrix = pd.read_csv(folder / "js_matrix.csv", index_col=0)
    summary = json.loads((folder / "summary.json").read_text())
    assert spectrum.names == list(matrix.index) and len(spectrum.names) == 8  # q,k,v,o weights and biases
    assert spectrum.settings["steps"] == 8 and spectrum.settings["overrides"][0] == "n_layer=1"
    p, q = density.densities[0], density.densities[5]
    assert matrix.iloc[0, 5] == pytest.approx(jensenshannon(p, q), rel=1e-9)
    upper = matrix.to_numpy()[np.triu_indices(8, 1)]
    assert summary["js0"] == pytest.approx(upper.mean(), rel=1e-12)
    assert f"JS0 = {summary['js0']:.4g}" in printed and "blocks.0.attn.q_proj.weight" in printed

    assert main(["js", *TINY, "--blocks", "blocks.0.attn.*", "--out", str(tmp_path / "b")]) == 0
    again = SpectrumResult.load(tmp_path / "b" / "gpt2-nano" / "spectrum.npz")
    assert again.lanczos == spectrum.lanczos

    # JS again from the saved spectrum, without measuring
    capsys.readouterr()
    assert main(["js", "--from-results", str(folder / "spectrum.npz"), "--grid-points", "4000", "--sigma2", "1e-3",
                 "--out", str(tmp_path / "c")]) == 0
    again_summary = json.loads((tmp_path / "c" / "gpt2-nano" / "summary.json").read_text())
    assert again_summary["js0"] == pytest.approx(summary["js0"], rel=1e-12)


def test_spectrum_command_and_console_script(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "hessian_blocks.cli", "spectrum", *TINY, "--sample-layers", "1", "--full-model",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    table = pd.read_csv(tmp_path / "gpt2-nano" / "blocks.csv")
    assert list(table["block"]) == ["wte.weight", "wpe.weight", "blocks.0.attn.q_proj.weight",
                                    "blocks.0.attn.k_proj.weight",
                                    "blocks.0.attn.v_proj.weight", "blocks.0.attn.o_proj.weight",
                                    "blocks.0.mlp.fc.weight",
                                    "blocks.0.mlp.proj.weight", "lm_head.weight"]
    assert (table["lambda_min"] <= table["lambda_max"]).all()
    assert SpectrumResult.load(tmp_path / "gpt2-nano" / "spectrum.npz").full is not None


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet99"], "unknown model"),
    (["--model", "gpt2-nano", "--blocks", "nothing.*"], "matches no block"),
    (["--model", "gpt2-nano", "--steps", "0"], "--steps must be >= 1"),
    (["--model", "gpt2-nano", "--set", "n_layers=2"], "n_layers"),
    (["--model", "gpt2-nano", "--device", "cuda:3"], "CUDA is not available"),
    (["--model", "gpt2-nano", "--device", "tpu"], "unknown device 'tpu': use cpu, cuda or cuda:N"),
    (["--model", "gpt2-nano", "--set", "n_layer=0"], "GPTConfig.n_layer must be a positive integer, got 0"),
    (["--model", "gpt2-nano", "--data", "nosuch"], "'nosuch' is neither one of auto, digits, text, synthetic nor"),
    (["--model", "gpt2-nano", "--partition", "missing.json"], "does not exist"),
])
def test_bad_input_exits_with_code_2_and_a_message(extra, message, tmp_path, capsys):
    assert main(["js", *extra, "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessian-blocks js: error:") and message.lower() in err.lower(), err


def test_a_partition_file_that_does_not_fit_is_refused(tmp_path, capsys):
    from hessian_blocks.blocks import Partition
    from hessian_blocks.models import build_model

    other = build_model("gpt2-nano", n_layer=1, n_embd=8, n_head=2, vocab_size=300, context=8).model
    path = Partition.per_tensor(other).save(tmp_path / "p.json")
    assert main(["js", *TINY, "--partition", str(path), "--out", str(tmp_path)]) == 2
    assert "wte.weight' has shape [300, 8] in the file but [300, 16]" in capsys.readouterr().err


def test_auto_device_and_dtype_pick_cuda_and_float32_products_where_there_is_a_gpu(monkeypatch):
    import torch

    from hessian_blocks.cli.options import device_name, torch_dtype

    assert torch_dtype("auto", "cuda") == torch.float32 and torch_dtype("auto", "cuda:1") == torch.float32
    assert torch_dtype("auto", "cpu") == torch.float64 and torch_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_name("auto") == "cuda" and device_name("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_name("auto") == "cpu"
