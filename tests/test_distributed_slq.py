"""Data-parallel and block-split SLQ on 2 gloo processes equal one process on the same data.

One spawn of two CPU processes runs every distributed scenario and saves what each rank got; the
tests compare those numbers with a single-process BlockHessian on the whole data (itself checked
against dense Hessians in test_hvp.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hessian_blocks import BlockHessian, Partition, block_spectra
from hessian_blocks.distributed import (
    DataParallelBlockHessian,
    get_rank,
    get_world_size,
    shard_batches,
    split_block_spectra,
    split_blocks,
)

from .spawn import spawn_ranks

WORLD = 2
SLQ = dict(steps=6, probes=3, seed=7)
# (name, batch sizes): equal shards, and shards of 2 batches / 8 samples vs 1 batch / 2 samples
DATASETS = {"equal": [3, 3, 3, 3], "unequal": [5, 3, 2]}


def tiny_problem(sizes: list[int], model_seed: int = 0):
    """A float64 tanh MLP (blocks of 30, 5, 15 and 3 coordinates) and batches of the given sizes."""
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(sum(sizes), 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=gen)
    batches = list(zip(x.split(sizes), y.split(sizes)))
    return model, nn.functional.cross_entropy, batches


def _compute(rank: int, out_dir: str) -> dict:
    got = {"rank": get_rank(), "world_size": get_world_size()}
    for name, sizes in DATASETS.items():
        model, loss_fn, batches = tiny_problem(sizes)
        hessian = DataParallelBlockHessian(model, loss_fn, shard_batches(batches), strategy="loop")
        spectrum = block_spectra(hessian, **SLQ, full_model=True)
        got[name] = {
            "lanczos": spectrum.lanczos, "full": spectrum.full, "settings": spectrum.settings,
            "loss": hessian.loss(), "gradient": hessian.gradient().numpy(),
            "local_samples": hessian.local_samples,
        }
    model, loss_fn, batches = tiny_problem(DATASETS["unequal"])
    split = split_block_spectra(model, loss_fn, batches, Partition.per_tensor(model), **SLQ)
    got["split"] = None if split is None else split.lanczos
    got["split_names"] = None if split is None else split.names

    model, loss_fn, batches = tiny_problem(DATASETS["equal"], model_seed=rank)  # a different model per rank
    try:
        DataParallelBlockHessian(model, loss_fn, shard_batches(batches))
    except ValueError as err:
        got["mismatch_error"] = str(err)
    model, loss_fn, batches = tiny_problem(DATASETS["equal"])
    hessian = DataParallelBlockHessian(model, loss_fn, shard_batches(batches))
    try:
        block_spectra(hessian, steps=2, probes=1, seed=rank)  # different probes per rank
    except ValueError as err:
        got["different_probes_error"] = str(err)
    return got


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks computed, [rank 0, rank 1]."""
    folder = tmp_path_factory.mktemp("distributed_slq")
    return spawn_ranks(_compute, folder, WORLD)


def single_process(name: str):
    model, loss_fn, batches = tiny_problem(DATASETS[name])
    hessian = BlockHessian(model, loss_fn, batches, strategy="loop")
    return hessian, block_spectra(hessian, **SLQ, full_model=True)


def assert_same_coefficients(got, expected) -> None:
    np.testing.assert_array_equal(got.steps, expected.steps)
    np.testing.assert_allclose(got.alpha, expected.alpha, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.beta, expected.beta, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(DATASETS))
def test_two_ranks_give_the_single_process_lanczos_coefficients(ranks, name):
    hessian, expected = single_process(name)
    for got in ranks:
        assert_same_coefficients(got[name]["lanczos"], expected.lanczos)
        assert_same_coefficients(got[name]["full"], expected.full)
    # the runs are not trivial: several steps on every block, nonzero coefficients
    assert expected.lanczos.steps.min() >= 3 and np.abs(expected.lanczos.alpha).max() > 1e-2


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_rank_holds_identical_coefficients(ranks, name):
    first, second = (got[name] for got in ranks)
    assert first["lanczos"] == second["lanczos"] and first["full"] == second["full"]


@pytest.mark.parametrize("name", list(DATASETS))
def test_loss_gradient_and_sample_counts_are_global(ranks, name):
    hessian, _ = single_process(name)
    sizes = DATASETS[name]
    half = (len(sizes) + 1) // 2
    assert [got[name]["local_samples"] for got in ranks] == [sum(sizes[:half]), sum(sizes[half:])]
    for got in ranks:
        assert got[name]["loss"] == pytest.approx(hessian.loss(), rel=1e-12)
        np.testing.assert_allclose(got[name]["gradient"], hessian.gradient().numpy(), rtol=1e-10, atol=1e-13)
        assert got[name]["settings"]["n_samples"] == sum(sizes)
        assert got[name]["settings"]["n_batches"] == len(sizes)
    assert ranks[0]["rank"] == 0 and ranks[1]["rank"] == 1 and ranks[1]["world_size"] == WORLD


def test_blocks_split_over_ranks_gather_the_single_process_result_on_rank_0(ranks):
    _, expected = single_process("unequal")
    assert ranks[1]["split"] is None
    assert ranks[0]["split_names"] == expected.names
    assert_same_coefficients(ranks[0]["split"], expected.lanczos)


def test_ranks_with_different_models_or_probes_are_refused(ranks):
    for got in ranks:
        assert "different models" in got["mismatch_error"] and "same seed" in got["mismatch_error"]
        assert "different vectors" in got["different_probes_error"]


# ----------------------------------------------------------------- without processes


def test_shard_batches_contiguous_shares_differing_by_at_most_one():
    items = list(range(7))
    shares = [shard_batches(items, r, 3) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard_batches(items) == items  # no process group: one rank holds everything
    with pytest.raises(ValueError, match="2 batches cannot be shared by 3 processes.*--batches 3"):
        shard_batches([0, 1], 0, 3)
    with pytest.raises(ValueError, match="rank must lie in 0..1"):
        shard_batches(items, 2, 2)


def test_split_blocks_balances_counts():
    model, _, _ = tiny_problem([2])
    blocks = Partition.per_tensor(model).blocks
    assert [[b.name for b in split_blocks(blocks, r, 2)] for r in range(2)] == [
        ["0.weight", "0.bias"], ["2.weight", "2.bias"]]


def test_process_group_from_env_outside_torchrun_and_without_cuda(monkeypatch):
    from hessian_blocks.distributed import process_group_from_env

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with process_group_from_env("cpu") as distributed:
        assert distributed is False and get_world_size() == 1
    if not torch.cuda.is_available():
        torchrun_variables = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
                              "MASTER_PORT": "29999"}
        for name, value in torchrun_variables.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match="cuda:0: CUDA is not available"):
            with process_group_from_env("cuda"):
                pass


def test_data_parallel_hessian_needs_a_process_group():
    model, loss_fn, batches = tiny_problem([2])
    with pytest.raises(RuntimeError, match="initialised process group.*torchrun"):
        DataParallelBlockHessian(model, loss_fn, batches)



# ----------------------------------------------------------------- the command line under torchrun


TINY_GPT = ["--model", "gpt2-nano", "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2",
            "--set", "vocab_size=300", "--set", "context=8", "--batch-size", "2", "--batches", "3",
            "--steps", "6", "--probes", "2", "--grid-points", "4000", "--sigma2", "1e-3", "--blocks", "blocks.0.attn.*"]


def torchrun(args: list[str], log_dir) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m hessian_blocks.cli ARGS``, each rank's output in log_dir."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "--log-dir", str(log_dir), "--redirects", "3", "-m", "hessian_blocks.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def rank_output(log_dir, rank: int, stream: str) -> str:
    (path,) = Path(log_dir).glob(f"**/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def test_torchrun_js_matches_one_process_and_only_rank_0_reports(tmp_path):
    from hessian_blocks.cli import main
    from hessian_blocks.results import SpectrumResult

    assert main(["js", *TINY_GPT, "--no-progress", "--out", str(tmp_path / "one")]) == 0
    completed = torchrun(["js", *TINY_GPT, "--out", str(tmp_path / "two")], tmp_path / "logs")
    assert completed.returncode == 0, completed.stderr[-3000:]

    one, two = (tmp_path / run / "gpt2-nano" for run in ("one", "two"))
    assert_same_coefficients(SpectrumResult.load(two / "spectrum.npz").lanczos,
                             SpectrumResult.load(one / "spectrum.npz").lanczos)
    summary_one, summary_two = (json.loads((folder / "summary.json").read_text()) for folder in (one, two))
    assert summary_two["js0"] == pytest.approx(summary_one["js0"], rel=1e-9)
    assert (summary_two["processes"], summary_two["n_samples"], summary_two["n_batches"]) == (WORLD, 6, 3)

    assert "JS0 =" in rank_output(tmp_path / "logs", 0, "stdout")
    assert "SLQ on 8 blocks" in rank_output(tmp_path / "logs", 0, "stderr")  # the progress bar
    assert rank_output(tmp_path / "logs", 1, "stdout") == "" and rank_output(tmp_path / "logs", 1, "stderr") == ""

    # --split-blocks in one process is plain SLQ; the split itself is checked on 2 ranks above
    assert main(["spectrum", *TINY_GPT, "--no-progress", "--split-blocks", "--out", str(tmp_path / "split")]) == 0
    assert_same_coefficients(SpectrumResult.load(tmp_path / "split" / "gpt2-nano" / "spectrum.npz").lanczos,
                             SpectrumResult.load(one / "spectrum.npz").lanczos)


def test_split_blocks_refuses_the_full_model(capsys):
    from hessian_blocks.cli import main

    assert main(["spectrum", *TINY_GPT, "--split-blocks", "--full-model"]) == 2
    assert "drop --split-blocks" in capsys.readouterr().err
