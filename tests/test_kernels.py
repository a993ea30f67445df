"""The Triton kernels of Adam-mini (optim/kernels.py), run on the CPU in Triton's interpreter
(TRITON_INTERPRET=1): the same numbers as the plain path and the float64 oracle on every layout kind,
blocks larger than one program, low-precision parameters and state, weight decay, maximize, a
scheduler, checkpoints moving between paths; and work tables that cover every coordinate once."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from hessian_blocks import build_model
from hessian_blocks.blocks import Partition, Rule
from optim import AdamMini, BlockLayout, param_groups_no_decay
from optim import kernels as kernels_module
from optim.functional import adam_mini
from tests.test_adam_mini import Tensors, checkpoint, random_grads, reference_adam_mini, run_adam_mini, tiny_gpt, train

KERNEL = dict(fused=True)
PLAIN = dict(foreach=False)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter: the kernels run on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def every_step_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def relative_difference(a: nn.Module, b: nn.Module) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a.parameters(), b.parameters()))


def test_kernel_equals_plain_path_and_float64_oracle_on_every_layout_kind():
    """Groups along axis 0, 1 and the last axis, inner and outer extents, run lists and interleaved
    runs, elements, whole tensors; two param groups (weight decay in one), a new learning rate every
    step, a parameter without gradient at one step, a block of zero gradients."""
    grads = random_grads(Tensors(torch.float32), steps=8)
    results = {}
    for path, flags in (("kernel", KERNEL), ("plain", PLAIN)):
        model = Tensors(torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the kernel path itself, no fallback
            optimizer, lrs = run_adam_mini(model, grads, scheduler=every_step_lr, **flags)
        results[path] = (model, optimizer)
    kernel, plain = results["kernel"][0], results["plain"][0]
    assert relative_difference(kernel, plain) <= 1e-6
    expected, _ = reference_adam_mini(Tensors(torch.float32), grads, lrs)
    for name, p in kernel.named_parameters():
        assert torch.allclose(p.double(), expected[name], rtol=0, atol=1e-6), name
    optimizer = results["kernel"][1]
    assert optimizer.state[kernel.e]["step"].item() == 7  # skipped once, like torch
    for name, p in kernel.named_parameters():
        v = optimizer.state[p]["block_exp_avg_sq"]
        assert v.dtype == torch.float32
        assert torch.allclose(v, results["plain"][1].state[dict(plain.named_parameters())[name]]["block_exp_avg_sq"],
                              rtol=1e-5, atol=0), name


class LargeBlocks(nn.Module):
    """Blocks larger than one program (chunked, two launches): rows of 9000, a whole 100 x 101
    tensor, strided columns of 9000 rows; beside small odd-sized ones in the same launch."""

    RULES = {
        "rows": ((3, 9000), dict(split="groups", axis=0, size=1)),
        "whole": ((100, 101), dict(split="whole")),
        "columns": ((9000, 3), dict(split="groups", axis=1, size=1)),
        "heads": ((5, 7, 3), dict(split="groups", axis=1, runs=((2, 1), (1, 2), (3, 1)))),
        "odd": ((13,), dict(split="elements")),
    }

    def __init__(self, dtype=torch.float32):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        for name, (shape, _) in self.RULES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)))

    def partition(self) -> Partition:
        return Partition.from_rules(self, [Rule(name, **spec) for name, (_, spec) in self.RULES.items()])


def train_on_fixed_grads(model, optimizer, steps, seed=5, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * scale).to(p.dtype)
        optimizer.step()


def test_blocks_larger_than_one_program_take_the_chunked_launches_and_agree():
    table = kernels_module.WorkTable([BlockLayout.from_rule(r, tuple(p.shape)) for r, p in
                                      zip(LargeBlocks().partition().rules, LargeBlocks().parameters())])
    # chunks of contiguous blocks whose sizes are multiples of 8 (16-byte accesses) or not, and strided ones
    assert [(c.contiguous, c.aligned) for c in table.chunks] == [(False, False), (True, False), (True, True)]
    assert table.launches == len(table.tiles) + 6
    models = {}
    for path, flags in (("kernel", KERNEL), ("plain", PLAIN)):
        model = LargeBlocks()
        optimizer = AdamMini(model.named_parameters(), model.partition(), lr=1e-2, weight_decay=0.1, **flags)
        train_on_fixed_grads(model, optimizer, steps=5)
        models[path] = model
    assert relative_difference(models["kernel"], models["plain"]) <= 1e-6


@pytest.mark.parametrize("maximize", [False, True])
def test_weight_decay_and_maximize_match_the_plain_path(maximize):
    models = {}
    for path, flags in (("kernel", KERNEL), ("plain", PLAIN)):
        spec = tiny_gpt()
        optimizer = AdamMini(param_groups_no_decay(spec.model, 0.1), model=spec.model, lr=1e-2, maximize=maximize,
                             **flags)
        train(spec, optimizer, steps=6)
        models[path] = spec.model
    assert relative_difference(models["kernel"], models["plain"]) <= 1e-6


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_bfloat16_parameters_compute_in_float32_within_two_ulps(state_dtype):
    """bf16 parameters with bf16 (or float32) first moments: the kernel keeps float32 between the
    operations that the plain path rounds to bf16 one by one, and reads the bf16 gradients as they
    are; after 20 steps they differ by at most 2 bf16 ulps."""
    models = {}
    for path, flags in (("kernel", KERNEL), ("plain", PLAIN)):
        model = LargeBlocks(torch.bfloat16)
        optimizer = AdamMini(model.named_parameters(), model.partition(), lr=1e-3, weight_decay=0.1,
                             state_dtype=state_dtype, **flags)
        train_on_fixed_grads(model, optimizer, steps=20, scale=1e-2)
        assert optimizer.state[model.rows]["exp_avg"].dtype == (state_dtype or torch.bfloat16)
        models[path] = model
    for a, b in zip(models["kernel"].parameters(), models["plain"].parameters()):
        ulp = 2.0 ** (math.floor(math.log2(b.abs().max().item())) - 7)
        assert (a.float() - b.float()).abs().max().item() <= 2 * ulp


@pytest.mark.parametrize("options,tolerance", [(dict(state_dtype=torch.bfloat16), 1e-6),
                                               (dict(state_dtype=torch.int8), 1e-4)])
def test_low_precision_first_moments_match_the_plain_path(options, tolerance):
    """A bf16 first moment of float32 parameters is read and written by the kernel (the step uses it
    as stored, rounded, like the plain path); an 8-bit one is dequantized to a float32 working copy
    that the kernel updates, then quantized again (a code may round the other way: 1e-4)."""
    models = {}
    for path, flags in (("kernel", KERNEL), ("plain", PLAIN)):
        model = LargeBlocks()
        optimizer = AdamMini(model.named_parameters(), model.partition(), lr=1e-2, weight_decay=0.1, **options,
                             **flags)
        train_on_fixed_grads(model, optimizer, steps=5)
        models[path] = model
    assert relative_difference(models["kernel"], models["plain"]) <= tolerance


def test_stochastic_rounding_draws_what_the_plain_path_draws():
    """bf16 parameters with stochastic rounding: the kernel updates the float32 working copy and
    the same seeded draws round it; the paths agree to one bf16 ulp (where the float32 values
    straddle a rounding threshold)."""
    models = {}
    for path, flags in (("kernel", KERNEL), ("plain", PLAIN)):
        model = LargeBlocks(torch.bfloat16)
        optimizer = AdamMini(model.named_parameters(), model.partition(), lr=1e-3, stochastic_rounding=True,
                             **flags)
        train_on_fixed_grads(model, optimizer, steps=4, scale=1e-2)
        models[path] = model
    for a, b in zip(models["kernel"].parameters(), models["plain"].parameters()):
        ulp = 2.0 ** (math.floor(math.log2(b.abs().max().item())) - 7)
        assert (a.float() - b.float()).abs().max().item() <= ulp


@pytest.mark.parametrize("first,then", [("kernel", "plain"), ("plain", "kernel"), ("kernel", "foreach")])
def test_checkpoint_moves_between_paths(first, then):
    paths = {"kernel": KERNEL, "plain": PLAIN, "foreach": dict(foreach=True)}
    grads = random_grads(Tensors(torch.float32), steps=8)
    uninterrupted = Tensors(torch.float32)
    run_adam_mini(uninterrupted, grads, **paths[then])
    model = Tensors(torch.float32)
    optimizer, _ = run_adam_mini(model, grads[:3], **paths[first])
    saved_model, saved_optimizer = checkpoint(model, optimizer)
    model = Tensors(torch.float32)
    model.load_state_dict(saved_model)
    resumed, _ = run_adam_mini(model, [], **paths[then])
    resumed.load_state_dict(saved_optimizer)
    for step_grads in grads[3:]:
        for name, p in model.named_parameters():
            p.grad = step_grads.get(name)
        resumed.step()
    assert resumed.state[model.a]["step"].item() == 8
    assert relative_difference(model, uninterrupted) <= 1e-6


def test_functional_form_with_steps_on_the_cpu():
    """optim.functional.adam_mini(fused=True): the kernels read a device copy of torch-style CPU step
    counts, which are counted on the CPU; the same numbers as the plain loop."""
    model = LargeBlocks()
    layouts = [BlockLayout.from_rule(rule, tuple(p.shape)) for rule, p in zip(model.partition().rules,
                                                                                model.parameters())]
    results = []
    for flags in (KERNEL, PLAIN):
        params = [p.detach().clone() for p in model.parameters()]
        exp_avgs = [torch.zeros_like(p) for p in params]
        block_avgs = [torch.zeros(layout.n_blocks) for layout in layouts]
        steps = [torch.tensor(0.0) for _ in params]
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=generator) for p in params]
            adam_mini(params, grads, exp_avgs, block_avgs, steps, layouts, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                      weight_decay=0.1, **flags)
        assert [s.item() for s in steps] == [3.0] * len(params)
        results.append(params)
    for a, b in zip(*results):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


def test_what_the_kernels_do_not_cover_takes_the_foreach_path_with_one_warning():
    """float64 parameters: the kernels compute in float32, so fused=True warns once and runs foreach."""
    results = []
    for flags in (KERNEL, dict(foreach=True)):
        model = Tensors(torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_adam_mini(model, random_grads(model, steps=3), **flags)
        fallbacks = [w for w in caught if "bfloat16 and float16 parameters, not float64" in str(w.message)]
        assert len(fallbacks) == (1 if flags is KERNEL else 0)
        results.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_without_the_interpreter_the_cpu_keeps_its_paths(monkeypatch):
    """On the CPU, fused=True is the compiled update unless Triton's interpreter is on; the kernels
    run on CUDA."""
    from optim.functional import choose_implementation

    params = [torch.zeros(3)]
    assert choose_implementation(params, foreach=None, fused=True) == ("kernel", "")
    assert choose_implementation(params, foreach=None, fused=None) == ("foreach", "")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert choose_implementation(params, foreach=None, fused=True)[0] in ("compiled", "foreach")
    assert "run on CUDA" in kernels_module.unavailable_reason(params)


def coverage(table: kernels_module.WorkTable, layouts) -> list[np.ndarray]:
    """How many programs write each coordinate of each parameter, and each block's second moment."""
    counts = [np.zeros(int(np.prod(layout.shape)), dtype=np.int64) for layout in layouts]
    moments = [np.zeros(layout.n_blocks, dtype=np.int64) for layout in layouts]
    for cls in table.tiles:
        for slot, first, first_block, n_blocks, size, run, stride in cls.items:
            for b in range(n_blocks):
                e = np.arange(size)
                counts[slot][first + b * run + (e // run) * stride + e % run] += 1
                moments[slot][first_block + b] += 1
    for cls in table.chunks:
        for slot, first, block, size, run, stride, chunk, _, _ in cls.items:
            e = np.arange(chunk * kernels_module.CHUNK, min(size, (chunk + 1) * kernels_module.CHUNK))
            counts[slot][first + (e // run) * stride + e % run] += 1
            moments[slot][block] += chunk == 0
    return counts + moments


def test_work_table_of_a_gpt_covers_every_coordinate_and_block_once_in_few_launches():
    """The default partition of a GPT (rows, heads, tokens, whole norms, bias elements): every
    coordinate is updated by exactly one program, every second moment written once, in a handful
    of launches (torch's fused AdamW takes about as many)."""
    spec = build_model("gpt2-nano", n_layer=2, n_embd=64, n_head=4, vocab_size=96, context=8)
    optimizer = AdamMini(spec.model)
    layouts = [optimizer._layouts[p] for p in spec.model.parameters()]
    table = kernels_module.work_table(layouts)
    assert all((c == 1).all() for c in coverage(table, layouts))
    assert table.launches <= 6
    assert kernels_module.work_table(layouts) is table  # built once per list of layouts
