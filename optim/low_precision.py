"""Low-precision optimizer state and updates: an 8-bit block-quantized first moment, and stochastic
rounding of bfloat16 parameter updates.

**8-bit first moment.** The first moment ``m`` of a parameter is kept as int8 *codes* (one per
coordinate) and float32 *scales* (one per run of :data:`QUANT_BLOCK` consecutive coordinates of the
flattened tensor: 1 + 4/256 bytes per coordinate). Within a run with absolute maximum ``a``, a
value ``x`` is stored as ``q = round(127 * sqrt(|x| / a)) * sign(x)`` and read back as
``a * (q / 127)**2 * sign(q)``: a square-root code, whose steps are finer near zero than a linear
code's, where most of a first moment's entries lie (a linear code rounds every entry below a/254 to
zero, freezing those coordinates). With ``u = |x| / a`` the error of one entry is at most
``a * (2 * sqrt(u) + 1/254) / 254`` (:func:`quantization_error_bound`): at most 0.8% of the run's
maximum, and 0.4% of ``a`` times 1/127 for the smallest entries. Each step dequantizes, updates in
float32, and quantizes again (round to nearest).

**Stochastic rounding.** A bfloat16 parameter updated by ``lr * m / sqrt(v)`` much smaller than its
spacing (2**-8 relative) loses the update to round-to-nearest. :func:`stochastic_round_` writes a
float32 value into bfloat16 rounding up with probability equal to the distance to the lower
neighbour (in units of the spacing), so the update survives in expectation. Draws come from a seeded
``torch.Generator`` that the optimizer keeps (and saves in its state dict), so runs are reproducible.

Why not a library's quantized tensor: torchao's low-bit optimizer states are tensor subclasses that
implement the aten operations of torchao's own single-tensor optimizers; AdamMini's foreach path
batches ``torch._foreach_*`` kernels and its block reductions over segment views, which those
subclasses do not provide, and bitsandbytes' kernels need CUDA. Codes and scales as plain tensors
work on every path (plain, foreach, compiled), on CPU, and under ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "QUANT_BLOCK", "dequantize_blockwise", "quantization_error_bound", "quantize_blockwise", "quantize_blockwise_",
    "quantized_scale_count", "stochastic_round_",
]

QUANT_BLOCK = 256  # coordinates per float32 scale of an 8-bit first moment
_LEVELS = 127  # int8 codes -127 .. 127 (the code -128 is never used: the code is symmetric)


def quantized_scale_count(numel: int, block: int = QUANT_BLOCK) -> int:
    """Number of scales of a tensor of ``numel`` coordinates."""
    return max(1, math.ceil(numel / block))


def _runs(flat: torch.Tensor, block: int) -> torch.Tensor:
    """``flat`` as ``[runs, block]``, zero-padded at the end."""
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block)


def quantize_blockwise_(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block: int = QUANT_BLOCK
) -> None:
    """Quantize ``x`` into ``codes`` (int8, ``x``'s number of elements) and ``scales`` (float32,
    :func:`quantized_scale_count` entries), in place."""
    runs = _runs(x.detach().reshape(-1).float(), block)
    absmax = runs.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    magnitude = (runs.abs() / safe[:, None]).sqrt_().mul_(_LEVELS).round_()
    quantized = magnitude.copysign_(runs).view(-1)[: x.numel()]
    codes.view(-1).copy_(quantized)
    scales.copy_(absmax)


def quantize_blockwise(x: torch.Tensor, block: int = QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x``: int8 codes shaped like ``x`` and float32 scales."""
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(quantized_scale_count(x.numel(), block), dtype=torch.float32, device=x.device)
    quantize_blockwise_(x, codes, scales, block)
    return codes, scales


def dequantize_blockwise(
    codes: torch.Tensor, scales: torch.Tensor, block: int = QUANT_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The tensor that ``codes`` and ``scales`` store, shaped like ``codes``, in ``dtype``."""
    runs = _runs(codes.reshape(-1).float(), block)
    values = (runs / _LEVELS).square_().copysign_(runs).mul_(scales[:, None])
    return values.view(-1)[: codes.numel()].view(codes.shape).to(dtype)


def quantization_error_bound(x: torch.Tensor, block: int = QUANT_BLOCK) -> torch.Tensor:
    """The largest error the 8-bit code can make on each entry of ``x`` (shaped like ``x``):
    ``a * (2 sqrt(u) + 1/254) / 254`` with ``a`` the entry's run maximum and ``u = |x| / a``."""
    runs = _runs(x.detach().reshape(-1).double(), block)
    absmax = runs.abs().amax(dim=1, keepdim=True)
    u = torch.where(absmax > 0, runs.abs() / absmax, torch.zeros_like(runs))
    bound = absmax * (2 * u.sqrt() + 1 / (2 * _LEVELS)) / (2 * _LEVELS)
    return bound.view(-1)[: x.numel()].view(x.shape)


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write float32 ``value`` into the bfloat16 tensor ``target``, rounding each entry up or down to a
    neighbouring bfloat16 number at random, with probabilities that make the result unbiased."""
    if target.dtype != torch.bfloat16 or value.dtype != torch.float32:
        raise TypeError(f"stochastic rounding writes float32 into bfloat16, got {value.dtype} into {target.dtype}")
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # adding noise below the 16 kept bits, then truncating them, moves the magnitude up with
    # probability (dropped bits) / 2**16: unbiased. Infinities and NaNs are copied as they are.
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)
    target.copy_(torch.where(torch.isfinite(value), rounded, value).view(target.shape))
