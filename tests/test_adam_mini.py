"""AdamMini against independent oracles: a from-scratch float64 loop over the partition's blocks,
torch.optim.AdamW (partition = "elements"), and itself (checkpoint resume, implementation paths)."""

import io
import json
import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import optim._fused
from analysis.experiments.training import run_steps
from hessian_blocks import build_model
from hessian_blocks.blocks import Partition, Rule, trainable_shapes
from optim import AdamMini, BlockLayout, param_groups_no_decay, state_memory
from optim.adam_mini import STATE_DICT_VERSION
from optim.functional import adam_mini
from optim.hooks import ParamTransform, UpdateHook

PATHS = {"reference": dict(foreach=False), "foreach": dict(foreach=True)}

# Random tensors and rules that exercise every layout: groups along axis 0, 1 and the last axis,
# inner and outer extents, run-length groups, elements and whole tensors, groups along merged axes
# (one block per (expert, row) of [experts, rows, columns]; the last two axes of [3, 2, 4]).
SHAPES_AND_RULES = {
    "a": ((6, 4), dict(split="groups", axis=1, size=2)),
    "b": ((12, 5), dict(split="groups", axis=0, runs=((2, 3), (1, 6)))),
    "c": ((3, 4, 5), dict(split="groups", axis=1, size=2)),
    "d": ((7,), dict(split="elements")),
    "e": ((4, 6), dict(split="whole")),
    "f": ((10, 3), dict(split="groups", axis=0, size=1)),
    "g": ((2, 9, 2), dict(split="groups", axis=1, runs=((3, 2), (1, 3)))),
    "h": ((8, 6), dict(split="groups", axis=-1, runs=((1, 2), (2, 2)))),
    "i": ((2, 3, 4), dict(split="groups", axis=[0, 1], size=1)),
    "j": ((3, 2, 4), dict(split="groups", axis=[-2, -1], runs=((4, 1), (1, 2), (2, 1)))),
}
GROUP_HYPER = [  # two param groups with their own hyperparameters
    dict(names="abcdi", lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
    dict(names="efghj", lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0),
]


class Tensors(nn.Module):
    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        for name, (shape, _) in SHAPES_AND_RULES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)))


def random_partition(model):
    return Partition.from_rules(model, [Rule(name, **spec) for name, (_, spec) in SHAPES_AND_RULES.items()])


def random_grads(model, steps, seed=1):
    """Per step, a gradient for every parameter, except 'e' at step 2 (no gradient: skipped), and a
    block of exact zeros in 'f'."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in model.named_parameters()}
        grads["f"][3] = 0.0
        if step == 2:
            del grads["e"]
        out.append(grads)
    return out


def groups_of(model):
    named = dict(model.named_parameters())
    return [{"params": [(n, named[n]) for n in h["names"]],
             **{k: v for k, v in h.items() if k != "names"}} for h in GROUP_HYPER]


def run_adam_mini(model, grads, lrs=None, scheduler=None, **flags):
    optimizer = AdamMini(groups_of(model), random_partition(model), **flags)
    sched = scheduler(optimizer) if scheduler else None
    used_lrs = []
    for step_grads in grads:
        for name, p in model.named_parameters():
            p.grad = step_grads.get(name)
        used_lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        if sched:
            sched.step()
    return optimizer, used_lrs


def reference_adam_mini(model, grads, lrs):
    """The paper's update, written from scratch in float64 with one Python loop per block."""
    partition = random_partition(model)
    hyper = {n: h for h in GROUP_HYPER for n in h["names"]}
    params = {n: p.detach().clone().double().reshape(-1) for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {b.name: 0.0 for b in partition.blocks}
    t = {n: 0 for n in params}
    for step_grads, step_lrs in zip(grads, lrs):
        for block in partition.blocks:
            name = block.param
            if name not in step_grads:
                continue
            h = hyper[name]
            lr = step_lrs[0 if name in GROUP_HYPER[0]["names"] else 1]
            beta1, beta2 = h["betas"]
            g = step_grads[name].double().reshape(-1)
            if block is next(b for b in partition.blocks if b.param == name):  # once per tensor
                t[name] += 1
                params[name] *= 1 - lr * h["weight_decay"]
                m[name] = beta1 * m[name] + (1 - beta1) * g
            idx = block.flat_indices()
            v[block.name] = beta2 * v[block.name] + (1 - beta2) * float((g[idx] ** 2).mean())
            denom = math.sqrt(v[block.name] / (1 - beta2 ** t[name])) + h["eps"]
            params[name][idx] -= lr / (1 - beta1 ** t[name]) * m[name][idx] / denom
    return {n: p.reshape(model.get_parameter(n).shape) for n, p in params.items()}, v


@pytest.mark.parametrize("path", PATHS)
def test_matches_float64_reference_on_random_blocks(path):
    """(The compiled path: tests/test_compiled.py.)"""
    model = Tensors()
    grads = random_grads(model, steps=6)
    optimizer, lrs = run_adam_mini(model, grads, **PATHS[path])
    expected, expected_v = reference_adam_mini(Tensors(), grads, lrs)
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), expected[name], rtol=0, atol=1e-12), name
    partition = random_partition(model)
    for name, p in model.named_parameters():
        blocks = [b for b in partition.blocks if b.param == name]
        ours = optimizer.state[p]["block_exp_avg_sq"]
        assert ours.shape == (len(blocks),) and ours.dtype == torch.float64
        assert torch.allclose(ours, torch.tensor([expected_v[b.name] for b in blocks], dtype=torch.float64), rtol=1e-12,
                              atol=0)
    assert optimizer.state[model.e]["step"].item() == 5  # no gradient at one step: skipped, like torch


def test_failed_compilation_falls_back_to_foreach(monkeypatch):
    class CompileError(torch._dynamo.exc.TorchDynamoException):
        pass

    calls = []

    def broken_compile(function, **options):
        def compiled(*args):
            calls.append(1)
            raise CompileError("inductor could not compile")

        return compiled

    monkeypatch.setattr(optim._fused, "_COMPILED", OrderedDict())  # nothing compiled yet
    monkeypatch.setattr(torch, "compile", broken_compile)
    assert_fused_falls_back_to_foreach("compiling the update failed (CompileError")
    assert len(calls) == 1  # tried once, then foreach for good


def test_lr_scheduler_drives_the_update():
    model = Tensors()
    grads = random_grads(model, steps=8)
    schedule = lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # noqa: E731
        opt, max_lr=[2e-2, 5e-3], total_steps=8, cycle_momentum=False)
    _, lrs = run_adam_mini(model, grads, scheduler=schedule)
    assert len({tuple(x) for x in lrs}) == 8  # the learning rate changed every step
    expected, _ = reference_adam_mini(Tensors(), grads, lrs)
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), expected[name], rtol=0, atol=1e-12), name


def test_paths_agree_bitwise_on_cpu():
    results = []
    for flags in PATHS.values():
        model = Tensors(dtype=torch.float32)
        run_adam_mini(model, random_grads(model, steps=4), **flags)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def tiny_gpt(dtype=torch.float32, seed=0):
    """A one-layer GPT. Its key bias is frozen: its true gradient is exactly zero (softmax ignores a
    common shift of the scores), so Adam would amplify rounding noise into lr-sized steps."""
    spec = build_model("gpt2-nano", n_layer=1, n_embd=32, n_head=4, vocab_size=64, context=8, seed=seed, dtype=dtype)
    spec.model.blocks[0].attn.k_proj.bias.requires_grad_(False)
    return spec


def train(spec, optimizer, steps, scheduler=None, seed=1, start=0):
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 64, (4, 9), generator=generator) for _ in range(start + steps)][start:]
    run_steps(spec.model, spec.loss_fn, optimizer, [(t[:, :-1], t[:, 1:]) for t in batches], steps,
              on_step=None if scheduler is None else lambda _: scheduler.step())


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("path", PATHS)
def test_elements_everywhere_is_adamw(dtype, atol, path):
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    spec_a, spec_b = tiny_gpt(dtype), tiny_gpt(dtype)
    elements = Partition.from_rules(spec_a.model, [Rule(n, "elements") for n in trainable_shapes(spec_a.model)])
    ours = AdamMini(param_groups_no_decay(spec_a.model, 0.1), elements, **hyper, **PATHS[path])
    adamw = torch.optim.AdamW(param_groups_no_decay(spec_b.model, 0.1), **hyper, foreach=False)
    train(spec_a, ours, steps=10)
    train(spec_b, adamw, steps=10)
    for (name, a), b in zip(spec_a.model.named_parameters(), spec_b.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=atol), name
    ours_v = ours.state[spec_a.model.wte.weight]["block_exp_avg_sq"]
    adamw_v = adamw.state[spec_b.model.wte.weight]["exp_avg_sq"].reshape(-1).to(ours_v.dtype)
    assert ours_v.shape == adamw_v.shape and (ours_v - adamw_v).abs().max() <= 1e3 * atol * adamw_v.max()


def checkpoint(*objects) -> list:
    """A torch.save / torch.load(weights_only=True) round trip, like a real checkpoint."""
    buffer = io.BytesIO()
    torch.save([o.state_dict() for o in objects], buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_resume_from_checkpoint_is_bit_identical(dtype, path):
    def build():
        spec = tiny_gpt(dtype)
        optimizer = AdamMini(param_groups_no_decay(spec.model, 0.1), model=spec.model, lr=1e-2, **PATHS[path])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return spec, optimizer, scheduler

    spec, optimizer, scheduler = build()
    train(spec, optimizer, steps=10, scheduler=scheduler)
    uninterrupted = [p.detach().clone() for p in spec.model.parameters()]

    spec, optimizer, scheduler = build()
    train(spec, optimizer, steps=4, scheduler=scheduler)
    saved = checkpoint(spec.model, optimizer, scheduler)
    spec, optimizer, scheduler = build()
    for obj, state in zip((spec.model, optimizer, scheduler), saved):
        obj.load_state_dict(state)
    v = optimizer.state[spec.model.wte.weight]["block_exp_avg_sq"]
    assert v.dtype == torch.float32 and v.shape == (64,)  # one float32 scalar per token, even for bf16
    train(spec, optimizer, steps=6, scheduler=scheduler, start=4)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, spec.model.parameters()))


def test_checkpoint_of_another_partition_is_refused():
    spec = tiny_gpt()
    optimizer = AdamMini(spec.model, lr=1e-2)
    train(spec, optimizer, steps=1)
    per_tensor = AdamMini(spec.model, Partition.per_tensor(spec.model), lr=1e-2)
    with pytest.raises(ValueError, match="'wte.weight'.*build the optimizer with the checkpoint's partition"):
        per_tensor.load_state_dict(optimizer.state_dict())
    assert not per_tensor.state and per_tensor.param_groups[0]["block_rules"][0]["split"] == "whole"  # unchanged


def test_state_dtypes():
    spec = tiny_gpt(torch.bfloat16)
    for state_dtype, expected in ((None, torch.bfloat16), (torch.float32, torch.float32)):
        optimizer = AdamMini(spec.model, lr=1e-3, state_dtype=state_dtype)
        train(spec, optimizer, steps=1)
        state = optimizer.state[spec.model.lm_head.weight]
        assert state["exp_avg"].dtype == expected and state["block_exp_avg_sq"].dtype == torch.float32


def test_state_memory_of_gpt2_width_model_is_half_of_adamw():
    """GPT-2 width (768, 12 heads), one layer: <= 4.01 bytes per parameter in float32; AdamW 8."""
    spec = build_model("gpt2-nano", n_layer=1, n_embd=768, n_head=12, vocab_size=1024, context=16)
    tokens = torch.randint(0, 1024, (1, 17), generator=torch.Generator().manual_seed(0))
    spec.loss_fn(spec.model(tokens[:, :-1]), tokens[:, 1:]).backward()
    ours, adamw = AdamMini(spec.model), torch.optim.AdamW(spec.model.parameters())
    ours.step()
    adamw.step()
    mini, full = state_memory(ours), state_memory(adamw)
    assert mini.n_params == full.n_params == sum(p.numel() for p in spec.model.parameters())
    assert 4.0 < mini.bytes_per_param <= 4.01
    assert 8.0 < full.bytes_per_param <= 8.001
    assert mini.by_key["exp_avg"] == 4 * mini.n_params


def assert_fused_falls_back_to_foreach(warning: str) -> None:
    """fused=True warns once (a message containing ``warning``) and gives foreach's parameters exactly."""
    results = []
    for flags in (dict(fused=True), dict(foreach=True)):
        model = Tensors(dtype=torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_adam_mini(model, random_grads(model, steps=2), **flags)
        fallbacks = [w for w in caught if warning in str(w.message)]
        assert len(fallbacks) == (1 if "fused" in flags else 0)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_parameters_without_grad_are_skipped():
    spec = tiny_gpt()
    before = spec.model.lm_head.weight.detach().clone()
    optimizer = AdamMini(spec.model, lr=1e-2, weight_decay=0.1)
    spec.model.wte.weight.grad = torch.ones_like(spec.model.wte.weight)
    optimizer.step()
    assert torch.equal(spec.model.lm_head.weight, before) and spec.model.lm_head.weight not in optimizer.state
    assert optimizer.state[spec.model.wte.weight]["step"].item() == 1


# -- bad input -------------------------------------------------------------------------------------


def test_partition_with_an_extra_parameter_is_refused():
    spec = tiny_gpt()
    shapes = trainable_shapes(spec.model)
    partition = Partition([Rule(n, "whole") for n in shapes] + [Rule("extra.weight", "whole")],
                          {**shapes, "extra.weight": (2, 2)})
    with pytest.raises(ValueError, match="rule for 'extra.weight', which is not a trainable parameter"):
        AdamMini(spec.model, partition)


def test_partition_missing_a_parameter_is_refused():
    spec = tiny_gpt()
    shapes = trainable_shapes(spec.model)
    del shapes["wte.weight"]
    partial = Partition([Rule(n, "whole") for n in shapes], shapes)
    with pytest.raises(ValueError, match=r"no rule for parameter\(s\) \['wte.weight'\]"):
        AdamMini(spec.model, partial)


def test_partition_file_of_another_model_size_is_refused(tmp_path):
    path = Partition.per_tensor(tiny_gpt().model).save(tmp_path / "partition.json")
    wider = build_model("gpt2-nano", n_layer=1, n_embd=64, n_head=4, vocab_size=64, context=8)
    with pytest.raises(ValueError, match=r"'wte.weight' has shape \[64, 32\] in the partition but \[64, 64\]"):
        AdamMini(wider.model, path)
    assert isinstance(AdamMini(tiny_gpt().model, path), AdamMini)  # the right model loads it


def test_group_size_that_does_not_divide_the_axis_is_refused(tmp_path):
    spec = tiny_gpt()
    data = Partition.per_tensor(spec.model).to_dict()
    data["rules"][4] = {"param": "blocks.0.attn.q_proj.weight", "split": "groups", "axis": 0, "size": 5}
    path = tmp_path / "partition.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError,
                       match="'blocks.0.attn.q_proj.weight': group size 5 does not divide axis 0 of length 32"):
        AdamMini(spec.model, path)


def test_sparse_gradients_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True))
    optimizer = AdamMini(model)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients \\(parameter '0.weight'\\)"):
        optimizer.step()


def test_other_bad_arguments():
    spec = tiny_gpt()
    with pytest.raises(ValueError, match="needs the model"):
        AdamMini(spec.model.named_parameters())
    with pytest.raises(ValueError, match="foreach and fused"):
        AdamMini(spec.model, foreach=True, fused=True)
    with pytest.raises(TypeError, match="named parameters"):
        AdamMini(spec.model.parameters(), Partition.per_tensor(spec.model))
    bare = AdamMini(spec.model.parameters(), model=spec.model)  # tensors named after the model's parameters
    assert bare.param_groups[0]["param_names"][0] == "wte.weight"
    with pytest.raises(ValueError, match=r"invalid AdamMini hyperparameter\(s\) \['beta2'\]"):
        AdamMini(spec.model, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="n_heads only applies"):
        AdamMini(spec.model, Partition.per_tensor(spec.model), n_heads=2)


def test_param_group_added_later_uses_the_partition():
    spec = tiny_gpt()
    named = [(n, p) for n, p in spec.model.named_parameters() if p.requires_grad]
    optimizer = AdamMini(named[:3], model=spec.model, lr=1e-2)
    with pytest.raises(ValueError, match="no rule for parameter 'stray'"):
        optimizer.add_param_group({"params": [("stray", nn.Parameter(torch.zeros(2)))]})
    optimizer.add_param_group({"params": named[3:], "lr": 1e-3})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]
    train(spec, optimizer, steps=1)
    assert len(optimizer.state) == len(named) and len(optimizer.partition.rules) == len(named)
    q = spec.model.blocks[0].attn.q_proj.weight
    assert optimizer.state[q]["block_exp_avg_sq"].shape == (4,)  # default rule: one block per head


# -- functional API, torch.optim.AdamW drop-in, state-dict versions --------------------------------


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_functional_adam_mini_is_the_optimizers_step(path, maximize):
    """adam_mini(...) per param group, on hand-made state: bit for bit the optimizer's parameters
    and moments (maximize: the same as minimizing with negated gradients)."""
    grads = random_grads(Tensors(), steps=4)
    model = Tensors()
    flipped = [{n: -g for n, g in step.items()} for step in grads] if maximize else grads
    optimizer, lrs = run_adam_mini(model, flipped, **PATHS[path])

    functional = Tensors()
    partition = random_partition(functional)
    named = dict(functional.named_parameters())
    layouts = {rule.param: BlockLayout.from_rule(rule, named[rule.param].shape) for rule in partition.rules}
    state = {
        n: dict(exp_avg=torch.zeros_like(p), v=torch.zeros(layouts[n].n_blocks, dtype=torch.float64),
                step=torch.tensor(0.0))
        for n, p in named.items()
    }
    with torch.no_grad():
        for step_grads, step_lrs in zip(grads, lrs):
            for hyper, lr in zip(GROUP_HYPER, step_lrs):
                names = [n for n in hyper["names"] if n in step_grads]
                adam_mini(
                    [named[n] for n in names], [step_grads[n] for n in names], [state[n]["exp_avg"] for n in names],
                    [state[n]["v"] for n in names], [state[n]["step"] for n in names], [layouts[n] for n in names],
                    lr=lr, beta1=hyper["betas"][0], beta2=hyper["betas"][1], eps=hyper["eps"],
                    weight_decay=hyper["weight_decay"], maximize=maximize, **PATHS[path],
                )
    for name, p in model.named_parameters():
        assert torch.equal(p, named[name]), name
        assert torch.equal(optimizer.state[p]["block_exp_avg_sq"], state[name]["v"]), name
        assert optimizer.state[p]["step"].item() == state[name]["step"].item()


def test_functional_adam_mini_refuses_lists_of_other_lengths():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match=r"one entry per parameter \(1\): got exp_avgs \(0\), layouts \(2\)"):
        adam_mini([p], [p], [], [p], [torch.tensor(0.0)], [None, None], lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.0)
    with pytest.raises(ValueError, match="foreach and fused cannot both be True"):
        adam_mini([], [], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, foreach=True,
                  fused=True)


@pytest.mark.parametrize("path", PATHS)
def test_maximize_is_adamw_maximize(path):
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, maximize=True)
    spec_a, spec_b = tiny_gpt(torch.float64), tiny_gpt(torch.float64)
    elements = Partition.from_rules(spec_a.model, [Rule(n, "elements") for n in trainable_shapes(spec_a.model)])
    ours = AdamMini(param_groups_no_decay(spec_a.model, 0.1), elements, **hyper, **PATHS[path])
    adamw = torch.optim.AdamW(param_groups_no_decay(spec_b.model, 0.1), **hyper, foreach=False)
    initial = spec_a.model.wte.weight.detach().clone()
    train(spec_a, ours, steps=5)
    train(spec_b, adamw, steps=5)
    assert (spec_a.model.wte.weight - initial).abs().max() > 1e-2
    for (name, a), b in zip(spec_a.model.named_parameters(), spec_b.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name


def test_adamw_options_it_cannot_honour_are_refused():
    spec = tiny_gpt()
    for option, why in (("amsgrad", "no per-coordinate maximum"), ("capturable", "captured in a CUDA graph"),
                        ("differentiable", "torch.no_grad")):
        with pytest.raises(ValueError, match=f"AdamMini does not support {option}=True: .*{why}"):
            AdamMini(spec.model, **{option: True})
        optimizer = AdamMini(list(spec.model.named_parameters())[:2], model=spec.model, **{option: False})
        with pytest.raises(ValueError, match=f"does not support {option}=True"):
            optimizer.add_param_group({"params": list(spec.model.named_parameters())[2:4], option: True})
        assert len(optimizer.param_groups) == 1


def test_state_dict_version_is_saved_and_old_versions_are_upgraded():
    spec = tiny_gpt()
    optimizer = AdamMini(spec.model, lr=1e-2)
    train(spec, optimizer, steps=2)
    saved = checkpoint(optimizer)[0]
    assert [g["version"] for g in saved["param_groups"]] == [STATE_DICT_VERSION] == [2]
    version_1 = {**saved, "param_groups": [{k: v for k, v in g.items() if k not in ("version", "maximize")}
                                           for g in saved["param_groups"]]}
    resumed = AdamMini(spec.model, lr=1e-2, maximize=True)
    resumed.load_state_dict(version_1)
    assert resumed.param_groups[0]["maximize"] is False and "version" not in resumed.param_groups[0]
    assert ("version" not in version_1["param_groups"][0]
            and "maximize" not in version_1["param_groups"][0])  # not modified
    train(spec, resumed, steps=1, start=2)
    assert resumed.state[spec.model.wte.weight]["step"].item() == 3


def test_state_dict_of_a_newer_version_or_without_block_rules_is_refused():
    spec = tiny_gpt()
    optimizer = AdamMini(spec.model, lr=1e-2)
    train(spec, optimizer, steps=1)
    saved = optimizer.state_dict()
    newer = {**saved, "param_groups": [{**saved["param_groups"][0], "version": 3}]}
    fresh = AdamMini(spec.model, lr=1e-2)
    with pytest.raises(ValueError, match="param group 0 of the state dict has version 3; "
                                         "this AdamMini reads versions 1 to 2"):
        fresh.load_state_dict(newer)
    no_rules = {**saved, "param_groups": [{k: v for k, v in saved["param_groups"][0].items() if k != "block_rules"}]}
    with pytest.raises(ValueError, match="param group 0 of the state dict has no 'block_rules' for its 20 parameters: "
                                         "it was not saved by AdamMini"):
        fresh.load_state_dict(no_rules)
    short = {**saved, "param_groups": [{**saved["param_groups"][0],
                                        "block_rules": saved["param_groups"][0]["block_rules"][:3]}]}
    with pytest.raises(ValueError, match="has 3 block rules for its 20 parameters"):
        fresh.load_state_dict(short)
    assert not fresh.state


class Identity(ParamTransform):
    """A transform that changes nothing: Adam-mini's step added to the decayed weight."""

    def __init__(self, param):
        self.shape = tuple(param.shape)

    def key(self):
        return ["identity"]

    def extra_state(self, param, dtype):
        return {"calls": torch.zeros((), dtype=dtype)}

    def gradient(self, group, name, state, grad):
        state["calls"] += 1
        return grad

    def apply(self, param, state, step, decay, group):
        param.mul_(decay).add_(step, alpha=group["gain"])


class IdentityHook(UpdateHook):
    group_key = "identities"

    def check_group(self, group):
        if group["gain"] <= 0:
            raise ValueError(f"gain must be > 0, got {group['gain']}")

    def transform(self, group, name, param, rule):
        return Identity(param) if param.ndim == 2 else None


@pytest.mark.parametrize("path", PATHS)
def test_an_update_hook_that_changes_nothing_is_adam_mini(path):
    """The declared extension point: an identity transform on the 2-D tensors (its own group option,
    state and state-dict key) gives AdamMini's trajectory, and a checkpoint carries its state."""
    grads = random_grads(Tensors(), steps=6)
    plain, hooked = Tensors(), Tensors()
    run_adam_mini(plain, grads, **PATHS[path])
    optimizer = AdamMini(groups_of(hooked), random_partition(hooked), hook=IdentityHook({"gain": 1.0}), **PATHS[path])
    for step_grads in grads:
        for name, p in hooked.named_parameters():
            p.grad = step_grads.get(name)
        optimizer.step()
    for (name, a), b in zip(hooked.named_parameters(), plain.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    assert optimizer.state[hooked.a]["calls"].item() == 6 and "calls" not in optimizer.state[hooked.d]
    saved = checkpoint(optimizer)[0]
    # a, b 2-D; c 3-D; d 1-D; i 3-D
    assert saved["param_groups"][0]["identities"] == [["identity"], ["identity"], None, None, None]
    resumed = AdamMini(groups_of(Tensors()), random_partition(hooked), hook=IdentityHook({"gain": 1.0}))
    resumed.load_state_dict(saved)
    assert resumed.state[resumed.param_groups[0]["params"][0]]["calls"].item() == 6
    with pytest.raises(ValueError, match="the checkpoint's identities entry for parameter 'a' is None "
                                         "but this optimizer's is"):
        AdamMini(groups_of(Tensors()), random_partition(hooked), hook=IdentityHook({"gain": 1.0})).load_state_dict(
            {**saved, "param_groups": [{**g, "identities": [None] * len(g["params"])} for g in saved["param_groups"]]}
        )
    with pytest.raises(ValueError, match="gain must be > 0, got 0"):
        AdamMini(groups_of(Tensors()), random_partition(hooked), hook=IdentityHook({"gain": 0}))


@pytest.mark.parametrize("path", [*PATHS, "compiled"])
def test_a_parameter_resized_after_construction_is_refused(path):
    model = nn.Linear(3, 2)
    optimizer = AdamMini(model, lr=1e-2, **PATHS.get(path, dict(fused=True)))
    model.weight.data = torch.zeros(4, 3)  # e.g. a vocabulary grown in place
    model.weight.grad, model.bias.grad = torch.ones(4, 3), torch.ones(2)
    with pytest.raises(ValueError, match=r"parameter 'weight' now has shape \[4, 3\], "
                                         r"not the \[2, 3\] its block layout"):
        optimizer.step()
    assert not optimizer.state
