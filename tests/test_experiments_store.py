"""ResultStore: atomic files, resume with the same parameters, recompute when they change."""

import json
import os
import stat

import numpy as np
import pytest
import torch
import torch.nn as nn

from analysis.experiments.store import ResultStore, atomic_write_text, check_size, model_fingerprint, params_key

# the initial weight scale of ``scaled_net`` (a model whose initialisation a test changes between runs)
INIT_SCALE = {"value": 1.0}


def scaled_net(width: int = 3):
    from hessian_blocks.models import ModelSpec, cross_entropy_loss

    net = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(INIT_SCALE["value"])
    return ModelSpec("scaled-net", net, cross_entropy_loss, "vector", {"in_features": 64, "num_classes": 10}, None)


def test_run_resumes_and_recomputes_on_changed_params(tmp_path):
    store = ResultStore(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"curve": np.arange(3.0), "value": np.float64(2.5), "missing": float("nan")}

    first = store.run("unit-a", {"lr": 0.1}, compute)
    again = ResultStore(tmp_path).run("unit-a", {"lr": 0.1}, compute)  # a new process resuming
    assert len(calls) == 1
    assert first["curve"] == again["curve"] == [0.0, 1.0, 2.0] and again["value"] == 2.5
    assert np.isnan(again["missing"])
    store.run("unit-a", {"lr": 0.2}, compute)  # same key, other parameters: stale, recomputed
    assert len(calls) == 2
    assert json.loads((tmp_path / "unit-a.json").read_text())["params"] == {"lr": 0.2}
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_interrupted_compute_leaves_nothing(tmp_path):
    store = ResultStore(tmp_path)

    def fails():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.run("unit-b", {}, fails)
    assert store.load("unit-b", {}) is None and not list(tmp_path.iterdir())


def test_run_file_writes_marker_after_file(tmp_path):
    store = ResultStore(tmp_path)
    saved = []

    def save(value, path):
        saved.append(path.name)
        path.write_text(str(value))

    out = store.run_file("spec-1", {"a": 1}, lambda: 7, save=save, load=lambda p: int(p.read_text()), suffix=".txt")
    assert out == 7 and saved[0].startswith(".")  # written under a temporary name first
    assert store.run_file("spec-1", {"a": 1}, lambda: 8, save=save, load=lambda p: int(p.read_text()),
                          suffix=".txt") == 7
    (tmp_path / "spec-1.txt").unlink()  # marker without its file: recomputed
    assert store.run_file("spec-1", {"a": 1}, lambda: 9, save=save, load=lambda p: int(p.read_text()),
                          suffix=".txt") == 9


def test_model_fingerprint_follows_the_state():
    from hessian_blocks import build_model

    def fp(**kw):
        return model_fingerprint(build_model("mlp", **{"in_features": 5, "hidden_sizes": (4,), **kw}).model)

    assert fp(seed=0) == fp(seed=0) != fp(seed=1)
    assert fp(seed=0) != fp(seed=0, dtype=torch.float64) and fp(seed=0) != fp(seed=0, hidden_sizes=(5,))
    model = build_model("mlp", in_features=5, hidden_sizes=(4,), seed=0).model
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert model_fingerprint(model) != fp(seed=0)
    assert len(fp(seed=0)) == 16


def test_a_changed_fingerprint_or_none_is_recomputed(tmp_path):
    store, calls = ResultStore(tmp_path), []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert store.run("unit-f", {"lr": 0.1}, compute, fingerprint="aaaa")["value"] == 1
    assert store.run("unit-f", {"lr": 0.1}, compute, fingerprint="aaaa")["value"] == 1  # read back
    assert store.run("unit-f", {"lr": 0.1}, compute, fingerprint="bbbb")["value"] == 2  # another model
    assert json.loads((tmp_path / "unit-f.json").read_text())["fingerprint"] == "bbbb"
    store.save("unit-g", {"lr": 0.1}, {"value": 0})  # an older store: no fingerprint
    assert store.run("unit-g", {"lr": 0.1}, compute, fingerprint="bbbb")["value"] == 3
    assert store.run("unit-g", {"lr": 0.1}, compute)["value"] == 3  # units without a model need none


def test_experiments_recompute_what_a_changed_model_would_change(tmp_path, monkeypatch):
    # Same name, same parameters, another initialisation (as after a new version of a bundled model):
    # the stored spectrum and training run must not be read back.
    from analysis.experiments.heterogeneity import HeterogeneityConfig, heterogeneity_experiment

    factory = "tests.test_experiments_store:scaled_net"
    config = HeterogeneityConfig(models={factory: {}}, slq_batch_size=4, slq_steps=5, slq_probes=1, batch_size=8,
                                 train_batches=2, val_batches=1, steps=3, lrs={"sgd": (0.1,), "adamw": (1e-3,)})
    monkeypatch.setitem(INIT_SCALE, "value", 1.0)
    table, runs = heterogeneity_experiment(config, out=tmp_path, progress=False)
    files = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")}
    again, _ = heterogeneity_experiment(config, out=tmp_path, progress=False)
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")} == files  # all read back
    assert again["JS0"].tolist() == table["JS0"].tolist()

    monkeypatch.setitem(INIT_SCALE, "value", 3.0)
    changed, changed_runs = heterogeneity_experiment(config, out=tmp_path, progress=False)
    replaced = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")}
    assert replaced.keys() == files.keys() and all(replaced[name] != files[name] for name in files)  # same keys
    assert changed["JS0"].tolist() != table["JS0"].tolist()
    assert changed_runs["train_loss"].tolist() != runs["train_loss"].tolist()
    heterogeneity_experiment(config, out=tmp_path, progress=False)  # and now these are read back
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.json")} == replaced


def test_keys_sizes_and_atomic_write(tmp_path):
    assert params_key("spectrum-gpt2", {"a": 1}) != params_key("spectrum-gpt2", {"a": 2})
    assert params_key("x y", {"a": (1, 2)}) == params_key("x y", {"a": [1, 2]})
    with pytest.raises(ValueError, match="may only hold"):
        ResultStore(tmp_path).run("bad/key", {}, dict)
    with pytest.raises(ValueError, match="small, medium, paper"):
        check_size("huge")
    path = atomic_write_text(tmp_path / "sub" / "f.txt", "hello")
    assert path.read_text() == "hello" and [p.name for p in path.parent.iterdir()] == ["f.txt"]
    assert ResultStore(None).run("k", {}, lambda: {"v": 1}) == {"v": 1}  # no folder: nothing kept



@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_result_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        store = ResultStore(tmp_path / "results")
        store.run("unit", {"a": 1}, lambda: {"v": 1})
        store.run_file("spec", {"a": 1}, lambda: np.arange(3.0), save=lambda a, path: np.savez(path, a=a),
                       load=np.load, suffix=".npz")
        written = [atomic_write_text(tmp_path / "f.json", "{}"), tmp_path / "results" / "unit.json",
                   tmp_path / "results" / "spec.json", tmp_path / "results" / "spec.npz"]
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [0o666 & ~umask] * 4


def test_every_experiment_has_every_size():
    from analysis.experiments.comparison import ComparisonConfig
    from analysis.experiments.hessian_structure import StructureConfig
    from analysis.experiments.heterogeneity import HeterogeneityConfig
    from analysis.experiments.manmade_mlp import ManmadeConfig
    from analysis.experiments.quadratics import QuadraticConfig
    from analysis.experiments.spectra import SpectraConfig

    configs = (ComparisonConfig, StructureConfig, HeterogeneityConfig, ManmadeConfig, QuadraticConfig, SpectraConfig)
    for config in configs:
        small, medium, paper = (config.preset(size) for size in ("small", "medium", "paper"))
        assert small != medium != paper, config.__name__
        with pytest.raises(ValueError, match="unknown size"):
            config.preset("tiny")
    assert HeterogeneityConfig.preset("paper").models["gpt2-nano"] == {}  # the bundled defaults
    assert ComparisonConfig.preset("small", model="mypkg.models:net").overrides == {}


@pytest.mark.parametrize("size", ["medium", "paper"])
def test_every_training_preset_has_enough_offline_data(size):
    # digits has 1797 images: a preset drawing more batches fails only when the run starts, hours in
    from analysis.experiments.comparison import ComparisonConfig
    from analysis.experiments.heterogeneity import HeterogeneityConfig
    from analysis.experiments.manmade_mlp import FACTORY, ManmadeConfig
    from analysis.experiments.training import TrainSetup

    heterogeneity, manmade = HeterogeneityConfig.preset(size), ManmadeConfig.preset(size)
    setups = [TrainSetup(model, overrides, "auto", heterogeneity.batch_size, heterogeneity.train_batches,
                         heterogeneity.val_batches) for model, overrides in heterogeneity.models.items()]
    setups.append(ComparisonConfig.preset(size).setup())
    setups.append(TrainSetup(FACTORY, {"level": manmade.levels[-1], "hidden": manmade.hidden}, "digits",
                             manmade.batch_size, manmade.train_batches, manmade.val_batches))
    for setup in setups:
        _, train, val = setup.build(seed=0)
        assert (len(train), len(val)) == (setup.train_batches, setup.val_batches), setup.model
