"""optim.make, param_groups_no_decay and state_memory."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from analysis.experiments.training import run_steps
from hessian_blocks import build_model
from hessian_blocks.blocks import Partition
from optim import OPTIMIZERS, AdamMini, make, param_groups_no_decay, state_memory


def tiny_gpt():
    return build_model("gpt2-nano", n_layer=1, n_embd=32, n_head=4, vocab_size=64, context=8, seed=0)


def one_step(spec, optimizer):
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    run_steps(spec.model, spec.loss_fn, optimizer, [(tokens[:, :-1], tokens[:, 1:])], 1)


def test_no_decay_groups_by_type_and_ndim():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm((2, 3)), nn.Embedding(5, 6), nn.Conv1d(6, 2, 1))
    decay, no_decay = param_groups_no_decay(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [n for n, _ in decay["params"]] == ["0.weight", "2.weight", "3.weight"]
    assert [n for n, _ in no_decay["params"]] == ["0.bias", "1.weight", "1.bias", "3.bias"]  # 1.weight is 2-D: a norm
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in [n for g in param_groups_no_decay(model, 0.1) for n, _ in g["params"]]


def test_make_builds_each_optimizer():
    spec = tiny_gpt()
    adam_mini = make("adam_mini", spec.model, lr=1e-3, weight_decay=0.1)
    adamw = make("adamw", spec.model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sgd = make("sgd", spec.model, lr=1e-2)
    assert isinstance(adam_mini, AdamMini) and type(adamw) is torch.optim.AdamW and type(sgd) is torch.optim.SGD
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    assert sgd.param_groups[0]["momentum"] == 0.9
    assert make("sgd", spec.model, lr=1e-2, momentum=0.5).param_groups[0]["momentum"] == 0.5
    assert set(OPTIMIZERS) == {"adam_mini", "galore_mini", "adamw", "sgd"}


def test_make_adamw_is_torch_adamw_with_no_decay_groups():
    spec_a, spec_b = tiny_gpt(), tiny_gpt()
    ours = make("adamw", spec_a.model, lr=1e-2, weight_decay=0.1)
    decay = [p for p in spec_b.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in spec_b.model.parameters() if p.ndim < 2]
    torch_adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=1e-2)
    for _ in range(3):
        one_step(spec_a, ours)
        one_step(spec_b, torch_adamw)
    assert all(torch.equal(a, b) for a, b in zip(spec_a.model.parameters(), spec_b.model.parameters()))


def test_make_adam_mini_takes_a_partition():
    spec = tiny_gpt()
    per_tensor = make("adam_mini", spec.model, lr=1e-3, partition=Partition.per_tensor(spec.model))
    one_step(spec, per_tensor)
    assert all(s["block_exp_avg_sq"].numel() == 1 for s in per_tensor.state.values())
    memory = state_memory(per_tensor)
    assert memory.by_key["block_exp_avg_sq"] == 4 * len(per_tensor.state)
    assert memory.n_params == sum(p.numel() for p in spec.model.parameters())


def test_make_refuses_bad_requests():
    spec = tiny_gpt()
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        make("adam", spec.model, lr=1e-3)
    with pytest.raises(ValueError, match="a partition applies to adam_mini and galore_mini only"):
        make("adamw", spec.model, lr=1e-3, partition=Partition.per_tensor(spec.model))


@pytest.mark.parametrize("name", ["adam_mini", "adamw", "sgd", "galore_mini"])
def test_state_memory_before_the_first_step_counts_the_state_that_step_creates(name):
    spec = tiny_gpt()
    params = list(spec.model.parameters())
    n, tensors = sum(p.numel() for p in params), len(params)
    opt = make(name, spec.model, lr=1e-3, **({"rank": 8} if name == "galore_mini" else {}))
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    before = [p.detach().clone() for p in params]
    planned = state_memory(opt)
    assert len(opt.state) == 0 and not calls  # nothing created, no step taken, no hook run
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and all(p.grad is None for p in params)
    blocks = len(opt.partition.blocks) if name != "adamw" and name != "sgd" else 0
    expected = {  # float32: 4 bytes a number; "step" one float32 per tensor
        "adam_mini": {"step": 4 * tensors, "exp_avg": 4 * n, "block_exp_avg_sq": 4 * blocks},
        "adamw": {"step": 4 * tensors, "exp_avg": 4 * n, "exp_avg_sq": 4 * n},
        "sgd": {"momentum_buffer": 4 * n},
    }
    if name in expected:
        assert planned.by_key == expected[name]
    assert planned.planned_bytes == planned.total_bytes > 0 and planned.n_params == n
    matrices = [p for p in params if p.ndim == 2]
    planned_matrices = state_memory(opt, matrices)
    assert 0 < planned_matrices.total_bytes < planned.total_bytes
    one_step(spec, opt)
    after = state_memory(opt)
    assert after.by_key == planned.by_key and after.planned_bytes == 0 and calls == [1]
    assert state_memory(opt, matrices).by_key == planned_matrices.by_key


def test_state_memory_counts_existing_and_planned_state_apart():
    spec = tiny_gpt()
    opt = make("adamw", spec.model, lr=1e-3)
    head = spec.model.lm_head.weight
    head.grad = torch.ones_like(head)
    torch.optim.AdamW.step(opt)  # only the head has a gradient: only it gets state
    memory = state_memory(opt)
    n = sum(p.numel() for p in spec.model.parameters())
    assert memory.total_bytes == 8 * n + 4 * len(list(spec.model.parameters()))
    assert memory.planned_bytes == memory.total_bytes - (8 * head.numel() + 4)
    assert state_memory(opt, [head]).planned_bytes == 0


class ReadsValues(torch.optim.SGD):
    """An optimizer whose step reads a parameter's value (impossible on the meta device)."""

    def step(self, closure=None):
        if float(self.param_groups[0]["params"][0].detach().sum()) > -1e30:
            return super().step(closure)


def test_state_memory_warns_and_counts_what_exists_when_a_dry_step_is_impossible():
    model = nn.Linear(3, 2)
    opt = ReadsValues(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"state_memory: a dry step of ReadsValues on the meta device failed \(.*\); "
                                         r"only the state that exists is counted \(before the first step: none\)"):
        memory = state_memory(opt)
    assert memory.total_bytes == 0 and memory.planned_bytes == 0


def test_benchmark_quick_mode_runs(capsys, monkeypatch):
    """benchmarks/optim_step.py --quick, as CI runs it (the timings themselves are not asserted)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "optim_step.py"
    spec = importlib.util.spec_from_file_location("optim_step_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    benchmark.main(["--quick", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "ours foreach" in out and "ours / torch AdamW foreach" in out and "state bytes/param" in out
