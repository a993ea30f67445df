"""Two runs into one output: the second is refused with one line naming the run that holds it (exit 2),
the first completes; a run stages its files in a folder of its own; a killed holder blocks nobody."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hessian_blocks.cli import main
from hessian_blocks.files import LOCK_NAME, PARTIAL_SUFFIX, OutputInUseError, hold_output, staged_folder
from hessian_blocks.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DENSITY = ["--grid-points", "2000", "--sigma2", "1e-3", "--no-progress"]
TINY = ["--set", "n_layer=1", "--set", "n_embd=8", "--set", "n_head=2", "--set", "vocab_size=16",
        "--set", "context=4", "--batch-size", "2", "--steps", "4", "--probes", "1", *DENSITY]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="outputs are locked on POSIX systems only")


def gated_gpt(gate: str, **overrides):
    """A user model for ``--model tests.test_concurrent_runs:gated_gpt --set gate=FILE``: a small
    gpt2-nano, built only once ``FILE`` exists (so the test decides when the run goes on)."""
    deadline = time.monotonic() + 120
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} never appeared")
        time.sleep(0.05)
    return build_model("gpt2-nano", **overrides)


def _cli(*args: str, wait: bool = True):
    command = [sys.executable, "-m", "hessian_blocks.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_holder(lock: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith(f"{process.pid} ")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first run never took the output folder"
        time.sleep(0.05)


def test_two_js_processes_on_one_out_the_second_is_told_which_run_holds_it(tmp_path):
    from tests.test_bad_inputs import _synthetic_spectrum

    out, gate = tmp_path / "same", tmp_path / "gate"
    saved = _synthetic_spectrum("m").save(tmp_path / "m.npz")
    first = _cli("js", "--model", "tests.test_concurrent_runs:gated_gpt", "--set", f"gate={gate}", *TINY,
                 "--out", str(out), wait=False)
    try:
        _wait_for_holder(out / LOCK_NAME, first)
        second = _cli("js", "--from-results", str(saved), *DENSITY, "--out", str(out))
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (
            f"hessian-blocks js: error: --out {out} is in use by another run that has not finished (process "
            f"{first.pid}: hessian-blocks js --model tests.test_concurrent_runs:gated_gpt --set gate={gate} "
            f"{' '.join(TINY)} --out {out}); two runs writing into one output would mix their files. Give this run "
            "another --out, or wait until that run ends")
        assert not (out / "m").exists() and first.poll() is None  # the refused run wrote nothing
        gate.touch()
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    model_folder = out / "tests.test_concurrent_runs_gated_gpt"
    assert json.loads((model_folder / "summary.json").read_text())["js0"] >= 0
    assert sorted(p.name for p in out.iterdir()) == ["js0.csv", model_folder.name]  # no lock, no partial folder
    again = _cli("js", "--from-results", str(saved), *DENSITY, "--out", str(out))  # waiting fixed it
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "m" / "summary.json").read_text())["model"] == "m"


def test_a_killed_run_leaves_its_lock_file_but_blocks_nobody(tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = _cli("spectrum", "--model", "tests.test_concurrent_runs:gated_gpt", "--set", f"gate={gate}", *TINY,
                 "--out", str(out), wait=False)
    try:
        _wait_for_holder(out / LOCK_NAME, first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert (out / LOCK_NAME).exists()  # stale: its lock ended with the process
    with hold_output(out):
        assert (out / LOCK_NAME).read_text().startswith(f"{os.getpid()} ")
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("command", [
    ["spectrum", "--model", "gpt2-nano", *TINY],
    ["partition", "--model", "gpt2-nano", "--set", "n_layer=1", "--set", "n_embd=8", "--no-progress"],
    ["compare", "--size", "small", "--optimizer", "adamw", "--steps", "1", "--no-progress"],
    ["figures", "--size", "small", "--only", "quadratics", "--no-progress"],
])
def test_every_command_refuses_an_output_another_run_holds_before_any_work(tmp_path, capsys, command):
    file_output = command[0] == "partition"
    out = tmp_path / ("p.json" if file_output else "out")
    with hold_output(out, folder=not file_output):
        assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hessian-blocks {command[0]}: error: --out {out} is in use by another run that has not "
                          f"finished (process {os.getpid()}: hessian-blocks")  # this process: pytest's argv
    assert err.rstrip().endswith("Give this run another --out, or wait until that run ends") and "Errno" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written; the holder's lock and empty folder are gone too


def test_a_second_holder_in_the_same_process_is_refused_too(tmp_path):
    with hold_output(tmp_path / "p.json", folder=False):
        with pytest.raises(OutputInUseError, match="--couplings .*p.json is in use by another run"):
            with hold_output(tmp_path / "p.json", "--couplings", folder=False):
                pass
    with hold_output(tmp_path / "p.json", folder=False):  # released: free again
        pass


def test_a_run_stages_in_a_folder_of_its_own_and_clears_earlier_runs_partial_folders(tmp_path):
    target = tmp_path / "model"
    earlier = tmp_path / f"model.12345{PARTIAL_SUFFIX}"  # an interrupted run's, another process
    earlier.mkdir()
    (tmp_path / f"model.x{PARTIAL_SUFFIX}").mkdir()  # not a staging folder: left alone
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target) as staged:
            assert staged == tmp_path / f"model.{os.getpid()}{PARTIAL_SUFFIX}"
            (staged / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert not target.exists() and earlier.exists() and (staged / "a.txt").exists()
    with staged_folder(target) as again:
        assert again == staged and not (again / "a.txt").exists()  # emptied first
        (again / "b.txt").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", f"model.x{PARTIAL_SUFFIX}"]
    assert (target / "b.txt").read_text() == "whole"
