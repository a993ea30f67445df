"""The 8-bit first-moment code and stochastic rounding, against their closed forms."""

import math

import pytest
import torch

from optim.low_precision import (
    QUANT_BLOCK,
    dequantize_blockwise,
    quantization_error_bound,
    quantize_blockwise,
    quantized_scale_count,
    stochastic_round_,
)


@pytest.mark.parametrize("shape", [(3,), (256,), (257,), (40, 33), (2, 3, 129)])
def test_quantization_error_stays_within_its_bound_in_every_block(shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64)
         * torch.logspace(-6, 0, math.prod(shape), dtype=torch.float64).view(shape))
    codes, scales = quantize_blockwise(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.shape == (quantized_scale_count(x.numel()),) and scales.dtype == torch.float32
    restored = dequantize_blockwise(codes, scales, dtype=torch.float64)
    bound = quantization_error_bound(x)
    # the scales are float32: the run maximum itself is stored to float32 precision
    assert ((restored - x).abs() <= bound + 1e-6 * x.abs() + 1e-30).all()
    # the bound is tight: somewhere the error uses more than a third of it
    assert ((restored - x).abs() / bound.clamp_min(1e-300)).max() > 0.3


def test_code_closed_form_and_exact_values():
    x = torch.tensor([0.0, 1.0, -1.0, 0.25, -(10 / 127) ** 2, 1e-9])
    codes, scales = quantize_blockwise(x)
    assert scales.tolist() == [1.0]
    assert codes.tolist() == [0, 127, -127, round(127 * 0.5), -10, 0]
    restored = dequantize_blockwise(codes, scales)
    assert restored[:3].tolist() == [0.0, 1.0, -1.0]
    assert restored[4].item() == pytest.approx(-(10 / 127) ** 2, rel=1e-6)
    zeros_codes, zeros_scales = quantize_blockwise(torch.zeros(300))
    assert (dequantize_blockwise(zeros_codes, zeros_scales) == 0).all() and zeros_scales.tolist() == [0.0, 0.0]


def test_square_root_code_keeps_small_entries_a_linear_code_would_zero():
    x = torch.full((QUANT_BLOCK,), 1e-3)
    x[0] = 1.0  # below 1/254 of the run maximum: a linear int8 code stores 0
    restored = dequantize_blockwise(*quantize_blockwise(x))
    assert (restored[1:] > 0).all()
    assert restored[1:].sub(1e-3).abs().max() <= 1e-3 * 0.15


def test_stochastic_rounding_is_unbiased_exact_and_reproducible():
    value = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # a quarter of bf16's spacing above 1
    target = torch.empty_like(value, dtype=torch.bfloat16)
    stochastic_round_(target, value, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0078125}  # the two bf16 neighbours
    up = (target.float() > 1.0).double().mean().item()
    assert up == pytest.approx(1 / 8, abs=4 * math.sqrt(1 / 8 * 7 / 8 / value.numel()))
    assert target.double().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    again = torch.empty_like(target)
    stochastic_round_(again, value, torch.Generator().manual_seed(0))
    assert torch.equal(again, target)
    # values that bfloat16 holds exactly, negative values, infinities and NaN come through unchanged in expectation
    exact = torch.tensor([1.0, -2.5, 0.0, 3.0e38, float("inf"), -float("inf")])
    out = torch.empty_like(exact, dtype=torch.bfloat16)
    stochastic_round_(out, exact, torch.Generator().manual_seed(1))
    assert out.float()[:3].tolist() == [1.0, -2.5, 0.0] and out.float()[4:].tolist() == [float("inf"), -float("inf")]
    nan = torch.empty(1, dtype=torch.bfloat16)
    stochastic_round_(nan, torch.tensor([float("nan")]))
    assert nan.isnan().all()
    negative = torch.full((100_000,), -(1.0 + 2**-10))
    neg_out = torch.empty_like(negative, dtype=torch.bfloat16)
    stochastic_round_(neg_out, negative, torch.Generator().manual_seed(2))
    assert neg_out.double().mean().item() == pytest.approx(-(1.0 + 2**-10), abs=3e-5)


def test_stochastic_rounding_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float32 into bfloat16"):
        stochastic_round_(torch.empty(2, dtype=torch.float16), torch.zeros(2))


# -- AdamMini with low-precision state and parameters -------------------------------------------------

from hessian_blocks import Partition, Rule  # noqa: E402
from optim import AdamMini, GaLoreMini, state_memory  # noqa: E402


class Quadratic(torch.nn.Module):
    """f(x) = 1/2 sum_i h_i (x_i - x*_i)^2 over two 16x8 matrices: optimum x*, Hessian diagonal h."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.zeros(16, 8, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(16, 8, dtype=dtype))
        self.register_buffer("optimum", torch.randn(2, 16, 8, generator=gen))
        self.register_buffer("curvature", torch.rand(2, 16, 8, generator=gen) * 9 + 1)

    def loss(self) -> torch.Tensor:
        x = torch.stack([self.a, self.b]).float()
        return 0.5 * (self.curvature * (x - self.optimum) ** 2).sum()

    def distance(self) -> float:
        return (torch.stack([self.a, self.b]).float() - self.optimum).norm().item() / self.optimum.norm().item()


def rows(model):
    return Partition.from_rules(model, [Rule(name, "groups", axis=0, size=1) for name, _ in model.named_parameters()])


def train(model, steps, lr_at, **options):
    opt = AdamMini(model, rows(model), lr=lr_at(0), **options)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad()
        model.loss().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_first_moment_converges_to_the_known_optimum(state_dtype, foreach):
    model = Quadratic()
    assert model.distance() == pytest.approx(1.0)
    train(model, 600, lambda t: 0.1 * 0.99**t, state_dtype=state_dtype, foreach=foreach)
    assert model.distance() < 1e-3  # fp32, bf16 and 8-bit first moments all reach the optimum


def test_8bit_first_moment_plain_and_foreach_paths_agree_exactly():
    results = []
    for foreach in (False, True):
        model = Quadratic()
        opt = train(model, 30, lambda t: 0.05, state_dtype=torch.int8, foreach=foreach)
        results.append((model.a.detach().clone(), opt.state[model.a]["exp_avg"].clone(),
                        opt.state[model.a]["exp_avg_scale"].clone()))
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_state_memory_counts_codes_scales_and_block_moments():
    model = torch.nn.Linear(300, 7, bias=False)  # 2100 coordinates: 9 runs of 256 (the last one partial)
    opt = AdamMini(model, rows(model), state_dtype=torch.int8)
    model(torch.ones(2, 300)).sum().backward()
    opt.step()
    memory = state_memory(opt)
    assert memory.by_key == {"step": 4, "exp_avg": 2100, "exp_avg_scale": 4 * 9, "block_exp_avg_sq": 4 * 7}
    assert memory.bytes_per_param == pytest.approx((4 + 2100 + 36 + 28) / 2100)
    bf16 = AdamMini(model, rows(model), state_dtype=torch.bfloat16)
    bf16.step()
    assert state_memory(bf16).by_key == {"step": 4, "exp_avg": 2 * 2100, "block_exp_avg_sq": 4 * 7}


@pytest.mark.parametrize("options", [dict(state_dtype=torch.int8), dict(stochastic_rounding=True, rounding_seed=3)],
                         ids=["int8", "bf16-stochastic-rounding"])
def test_resume_is_bit_identical(options):
    dtype = torch.bfloat16 if options.get("stochastic_rounding") else torch.float32

    def run(split: int | None):
        model = Quadratic(dtype)
        opt = AdamMini(model, rows(model), lr=0.01, **options)
        for step in range(12):
            if step == split:
                saved_model, saved_opt = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
                model = Quadratic(dtype)
                model.load_state_dict(saved_model)
                opt = AdamMini(model, rows(model), lr=0.01, **options)
                opt.load_state_dict(saved_opt)
            opt.zero_grad()
            model.loss().backward()
            opt.step()
        return model, opt

    whole, whole_opt = run(None)
    resumed, resumed_opt = run(5)
    assert torch.equal(whole.a, resumed.a) and torch.equal(whole.b, resumed.b)
    for p, q in ((whole.a, resumed.a), (whole.b, resumed.b)):
        for key, value in whole_opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key


def test_stochastic_rounding_keeps_updates_below_bfloat16_spacing():
    """lr 1e-4 moves a parameter near 1.0 by far less than bf16's spacing there (2**-7): round to
    nearest loses every update, stochastic rounding keeps them in expectation."""
    def final(stochastic: bool) -> torch.Tensor:
        model = Quadratic(torch.bfloat16)
        with torch.no_grad():
            model.a.fill_(1.0)
            model.b.fill_(1.0)
            model.optimum.fill_(-1.0)
        train(model, 200, lambda t: 1e-4, stochastic_rounding=stochastic)
        return model.a.float()

    assert (final(False) == 1.0).all()  # every update lost
    moved = 1.0 - final(True).mean().item()
    assert moved == pytest.approx(200 * 1e-4, rel=0.1)  # Adam's normalised steps of lr each, kept on average


def test_bad_low_precision_options_are_refused():
    model = Quadratic()
    with pytest.raises(ValueError, match="state_dtype=torch.int32"):
        AdamMini(model, rows(model), state_dtype=torch.int32)
    with pytest.raises(ValueError, match="GaLoreMini keeps its first moments in the low-rank space"):
        GaLoreMini(model, rows(model), state_dtype=torch.int8)
    quantized = train(model, 2, lambda t: 0.01, state_dtype=torch.int8)
    plain = AdamMini(model, rows(model))
    with pytest.raises(ValueError, match="has an 8-bit first moment but this optimizer keeps a floating one"):
        plain.load_state_dict(quantized.state_dict())


def test_8bit_first_moment_on_the_compiled_path_matches_foreach():
    results = []
    for implementation in (dict(foreach=True), dict(fused=True)):  # fused on CPU: Inductor's C++ backend
        model = Quadratic()
        opt = train(model, 20, lambda t: 0.05, state_dtype=torch.int8, **implementation)
        results.append((model.a.detach().clone(), opt.state[model.a]["exp_avg_scale"].clone()))
    (a, scales), (b, compiled_scales) = results
    assert (a - b).abs().max() <= 1e-6 and (scales - compiled_scales).abs().max() <= 1e-6
