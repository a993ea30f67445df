"""The 8-bit first-moment code and stochastic rounding, against their closed forms."""

import math

import pytest
import torch

from optim.low_precision import (
    QUANT_BLOCK, dequantize_blockwise, quantization_error_bound, quantize_blockwise, quantized_scale_count,
    stochastic_round_,
)


@pytest.mark.parametrize("shape", [(3,), (256,), (257,), (40, 33), (2, 3, 129)])
def test_quantization_error_stays_within_its_bound_in_every_block(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.logspace(-6, 0, math.prod(shape), dtype=torch.float64).view(shape)
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
