"""The compiled Adam-mini update on CPU (Inductor's C++ backend): the same numbers as the foreach and
plain paths and the float64 oracle, checkpoints that move between paths, one compile per parameter
list (schedulers never recompile), and GaLore-mini's plain parameters on the same path.

Compiles are counted with Dynamo's ``unique_graphs`` counter. The first test of a fresh machine
pays Inductor's C++ build (~20 s for these tiny models on a 2-core CPU; seconds once Inductor's
on-disk cache holds the kernels)."""

import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import optim._fused
from optim import AdamMini, GaLoreMini
from tests import test_galore_mini as galore_tests
from tests.test_adam_mini import (
    Tensors,
    assert_fused_falls_back_to_foreach,
    checkpoint,
    random_grads,
    reference_adam_mini,
    run_adam_mini,
)

PATHS = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "compiled": dict(fused=True)}
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def compiles() -> int:
    return counters["stats"]["unique_graphs"]


def every_step_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_equals_foreach_and_plain_under_a_scheduler_with_one_compile(dtype):
    """20 steps, the learning rate new at every step, a parameter without gradient at step 3:
    the compiled path compiles once per parameter list (the full one and the one without 'e')."""
    grads = random_grads(Tensors(dtype), steps=20)
    results = {}
    for path, flags in PATHS.items():
        model = Tensors(dtype)
        before = compiles()
        optimizer, lrs = run_adam_mini(model, grads, scheduler=every_step_lr, **flags)
        assert compiles() - before == (2 if path == "compiled" else 0), path
        results[path] = [p.detach().clone() for p in model.parameters()]
    assert len({tuple(x) for x in lrs}) == 20
    for path in ("plain", "compiled"):
        for a, b in zip(results[path], results["foreach"]):
            assert torch.allclose(a, b, rtol=0, atol=TOLERANCE[dtype]), path
    if dtype == torch.float64:
        expected, _ = reference_adam_mini(Tensors(), grads, lrs)
        for (name, p), ours in zip(Tensors().named_parameters(), results["compiled"]):
            assert torch.allclose(ours, expected[name], rtol=0, atol=1e-12), name


@pytest.mark.parametrize("first,then", [("compiled", "foreach"), ("foreach", "compiled")])
def test_checkpoint_resumes_across_paths(first, then):
    grads = random_grads(Tensors(), steps=10)
    uninterrupted = Tensors()
    run_adam_mini(uninterrupted, grads, **PATHS["foreach"])

    model = Tensors()
    optimizer, _ = run_adam_mini(model, grads[:4], **PATHS[first])
    saved_model, saved_optimizer = checkpoint(model, optimizer)
    model = Tensors()
    model.load_state_dict(saved_model)
    resumed, _ = run_adam_mini(model, [], **PATHS[then])
    resumed.load_state_dict(saved_optimizer)
    for step_grads in grads[4:]:
        for name, p in model.named_parameters():
            p.grad = step_grads.get(name)
        resumed.step()
    assert resumed.state[model.a]["step"].item() == 10
    for (name, a), b in zip(model.named_parameters(), uninterrupted.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name


def test_each_parameter_list_has_its_own_compile_cache():
    """Dynamo allows a few graphs per code object (8 by default, 2 here); every list of layouts
    compiles its own copy of the update, so a process may build optimizers for any number of
    models. Same layouts again: no compile at all."""
    before = compiles()
    with torch._dynamo.config.patch(recompile_limit=2):
        for width in (3, 4, 5, 3):
            train_compiled_and_plain(width)
    assert compiles() - before == 3


def train_compiled_and_plain(width: int) -> None:
    """Two steps of a Linear(width, 2), compiled and plain: the same numbers, no fallback."""
    compiled, plain = nn.Linear(width, 2).double(), nn.Linear(width, 2).double()
    plain.load_state_dict(compiled.state_dict())
    optimizers = AdamMini(compiled, lr=1e-2, fused=True), AdamMini(plain, lr=1e-2, foreach=False)
    for seed in range(2):
        for model, optimizer in zip((compiled, plain), optimizers):
            generator = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback to foreach
                optimizer.step()
    for a, b in zip(compiled.parameters(), plain.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_default_on_cpu_does_not_compile():
    model = Tensors()
    before = compiles()
    optimizer, _ = run_adam_mini(model, random_grads(model, steps=2))
    assert compiles() == before and optimizer.param_groups[0]["fused"] is None


def test_missing_cpp_compiler_warns_once_and_uses_foreach(monkeypatch):
    monkeypatch.setattr(optim._fused, "_has_cpp_compiler", lambda: False)
    assert_fused_falls_back_to_foreach(
        "AdamMini: fused=True: Inductor finds no C++ compiler (install g++, or set CXX); using the foreach path"
    )


def test_galore_mini_compiles_its_plain_parameters():
    """GaLore-mini's projected matrices take the foreach path (new low-rank buffers every step);
    its other parameters ('cube', 'bias') the compiled one: the same numbers as all-foreach."""
    results = []
    for flags in (PATHS["compiled"], PATHS["foreach"]):
        model = galore_tests.Tensors()
        optimizer = GaLoreMini(galore_tests.groups_of(model), galore_tests.partition_of(model), rank=2,
                               update_proj_gap=3, **flags)
        before = compiles()
        galore_tests.run(optimizer, model, steps=5)
        assert compiles() - before == (1 if flags.get("fused") else 0)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
