"""benchmarks/gpu_proof.py: its --quick mode runs every part on CPU (so the script cannot rot between
GPU sessions), and a part that raises or runs past its budget is recorded while the others run."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_proof.py"


@pytest.fixture
def gpu_proof(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_proof_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    spec.loader.exec_module(module)
    return module


def test_quick_mode_runs_every_part_and_passes_its_checks(gpu_proof, tmp_path, capsys):
    out = tmp_path / "proof.json"
    code = gpu_proof.main(["--quick", "--out", str(out), "--budget-scale", "5"])  # a busy CI machine
    report = json.loads(out.read_text())
    assert list(report["parts"]) == list(gpu_proof.PARTS) and report["quick"] is True
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {name: "ok" for name in gpu_proof.PARTS}, {n: p.get("error") for n, p in report["parts"].items()}
    assert code == 0
    checks = {f"{name}: {check}": value for name, part in report["parts"].items()
              for check, value in part.get("checks", {}).items()}
    assert len(checks) == 13 and all(value["ok"] for value in checks.values())  # optim_llama_compiled: CUDA only
    assert checks["optim_correctness: kernel vs plain, float32"]["value"] <= 1e-6
    assert checks["optim_llama: official vs plain, worst tensor"]["value"] <= 1e-6  # the oracle took part
    assert report["parts"]["optim_llama"]["differing_tensors"] == {"kernel": {}, "foreach": {}, "official": {}}
    step = report["parts"]["optim_step_small"]
    assert {"torch AdamW fused", "ours foreach"} <= set(step["rows"]) and step["rows"]["ours foreach"]["median_ms"] > 0
    sweep = report["parts"]["hvp_sweep_nano"]
    assert (set(sweep["timings_s"]) == {"full HVP", "sweep loop, one pair per backward", "sweep loop, vectorized",
                                        "sweep vmap"}
            and "best sweep / full HVP <= 2" in sweep["targets"] and sweep["lanczos_step_s"] > 0)
    assert report["parts"]["js_gpt2_small"]["argv"][-4:] == ["--sample-layers", "4", "--batch-size", "1"]
    assert report["parts"]["js_gpt2_nano"]["dtype"] == "float64"  # --dtype auto on the CPU
    profile = report["parts"]["spectra_profile"]
    assert profile["step_breakdown"]["wall_s"] > 0 and "guards" in profile["phases_s"]
    table1 = report["parts"]["table1"]
    assert table1["finished"] == ["ResNet18", "VGG16", "ViT-base", "BERT-base", "GPT-2-small"]
    assert table1["unfinished"] == [] and table1["orderings"][0]["ordering"].startswith("every Transformer")
    assert report["parts"]["table1_short"]["finished"] == ["ResNet18", "VGG16", "ViT-base"]
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(gpu_proof.PARTS) + 1 and "| optim_correctness | ok |" in table


def test_a_part_that_raises_or_overruns_is_recorded_and_the_rest_run(gpu_proof, tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("CUDA out of memory (pretend)")

    def endless(ctx):
        while True:
            time.sleep(0.01)

    def off_tolerance(ctx):
        return {"checks": {"paths agree": gpu_proof._check(1e-3, 1e-6)}}

    def fine(ctx):
        return {"checks": {"paths agree": gpu_proof._check(0.0, 1e-6)}}

    monkeypatch.setattr(gpu_proof, "PARTS", {"broken": (broken, 5), "endless": (endless, 0.2),
                                             "off": (off_tolerance, 5), "fine": (fine, 5)})
    out = tmp_path / "nested" / "proof.json"
    assert gpu_proof.main(["--quick", "--out", str(out)]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert {name: part["status"] for name, part in parts.items()} == {"broken": "error", "endless": "timeout",
                                                                      "off": "failed", "fine": "ok"}
    assert parts["broken"]["error"] == "RuntimeError: CUDA out of memory (pretend)"
    assert parts["endless"]["error"] == "ran past its budget of 0.2 s" and parts["endless"]["seconds"] < 5
    assert parts["off"]["error"] == "outside tolerance: paths agree"
    with pytest.raises(SystemExit):
        gpu_proof.main(["--parts", "fine,nonsense"])
    assert "unknown part(s) ['nonsense']" in capsys.readouterr().err
