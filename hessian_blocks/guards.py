"""Checks that a model and a dataset define one fixed, twice-differentiable loss.

Hessian spectra are only meaningful when every evaluation of the loss is the same function of the
parameters. Each check raises :class:`HessianSetupError` naming the problem and the fix; a forward that
computes part of the loss in a lower precision than the one asked for gets one :class:`PrecisionWarning`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .batching import batch_tensors, batch_to, call_model, describe_batch

__all__ = [
    "DataFaultError", "HessianSetupError", "PrecisionWarning", "check_batches", "check_device", "check_eval_mode",
    "check_gradients", "check_precision", "check_same_loss", "explain_double_backward_failure", "failing_module",
    "full_float32_precision", "lower_precision_operations", "train_mode_modules", "twice_differentiable_attention",
]


class HessianSetupError(ValueError):
    """The model or data cannot give exact Hessian-vector products as they are."""


class DataFaultError(ValueError):
    """The data hold NaN or infinite values: a fault of the data, not of the model or the optimizer."""


class PrecisionWarning(UserWarning):
    """The forward computes part of the loss in a lower precision than the dtype asked for (e.g. a norm
    that casts float64 activations to float32): the products are only as accurate as that precision."""


# Module types whose output depends on the batch or on random numbers in train mode.
_TRAIN_MODE_SENSITIVE = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``: "cpu", "cuda" or "cuda:N". Other strings, and a CUDA device this
    machine does not have, are refused with a ValueError naming the fix."""
    accepted = "use cpu, cuda or cuda:N (N: the GPU's index)"
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {str(device)!r}: {accepted}") from err
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported here: {accepted}")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use device 'cpu'")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return target


def train_mode_modules(model: nn.Module) -> list[str]:
    """``'name' (Type)`` of every BatchNorm / InstanceNorm / active Dropout module in train mode: the
    modules whose output changes between evaluations of the loss in train mode."""
    return [
        f"'{name}' ({type(module).__name__})"
        for name, module in model.named_modules()
        if module.training and isinstance(module, _TRAIN_MODE_SENSITIVE) and getattr(module, "p", 1.0) != 0
    ]


def check_eval_mode(model: nn.Module) -> None:
    """Refuse BatchNorm / Dropout modules left in train mode.

    BatchNorm in train mode normalises with the statistics of each batch (and updates its running
    buffers on every pass); Dropout draws a new mask on every pass. Either way the HVP would not be
    the Hessian of one loss.
    """
    offending = train_mode_modules(model)
    if offending:
        listed = ", ".join(offending[:5]) + (f" and {len(offending) - 5} more" if len(offending) > 5 else "")
        raise HessianSetupError(
            f"{listed} in train mode: batch statistics / random masks change the loss between evaluations. "
            "Call model.eval() before measuring the Hessian (the papers measure in eval mode)."
        )


def check_batches(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batches: Sequence[tuple[Any, Any]],
                  what: str = "batch", *, forward_batches: int | None = None) -> None:
    """Refuse batches that cannot give a meaningful loss, naming the batch (``what`` names the batches,
    e.g. "training batch"), before any training step or Hessian-vector product:

    * NaN or infinite inputs or targets: :class:`DataFaultError` (else every loss and product is NaN,
      which looks like a diverging model);
    * data that do not fit the model (input shapes, labels out of range, negative or fractional): the
      model or the loss fails on the batch, a ValueError with the shapes and the fix;
    * a loss that is not one finite number: ValueError.

    The model runs on the first ``forward_batches`` batches (default: all), without gradients, in eval
    mode (no dropout draws, no BatchNorm buffer updates; the mode is restored afterwards). The targets of
    the other batches are checked by the loss on zero outputs shaped like the first batch's (no forward
    pass: for training on thousands of batches), when that output is one tensor per sample.
    """
    for index, (inputs, targets) in enumerate(batches):
        _check_finite(inputs, targets, f"{what} {index + 1} of {len(batches)}")
    run = len(batches) if forward_batches is None else max(1, min(forward_batches, len(batches)))
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (weight.device, weight.dtype) if weight is not None else ("cpu", None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = [_checked_loss(lambda x=inputs: call_model(model, batch_to(x, device, dtype)), loss_fn, inputs,
                                     targets, f"{what} {index + 1} of {len(batches)}")
                       for index, (inputs, targets) in enumerate(batches[:run])]
    finally:
        model.train(was_training)
    first, first_targets = outputs[0], batches[0][1]
    if run == len(batches) or not isinstance(first, torch.Tensor) or not isinstance(first_targets, torch.Tensor) \
            or first.dim() == 0 or len(first) != len(first_targets):
        return
    for index, (inputs, targets) in enumerate(batches[run:], start=run):
        if isinstance(targets, torch.Tensor):
            zeros = first.new_zeros((len(targets), *first.shape[1:]))
            _checked_loss(lambda z=zeros: z, loss_fn, inputs, targets, f"{what} {index + 1} of {len(batches)}")


def _check_finite(inputs: Any, targets: Any, where: str) -> None:
    for part, value in (("inputs", inputs), ("targets", targets)):
        for key, tensor in batch_tensors(value):
            if tensor.is_floating_point() or tensor.is_complex():
                bad = ~torch.isfinite(tensor.reshape(len(tensor), -1) if tensor.dim() else tensor.reshape(1, 1))
                rows = torch.nonzero(bad.any(dim=1)).flatten()
                if rows.numel():
                    field = f" '{key}'" if key else ""
                    raise DataFaultError(
                        f"the data hold NaN or infinite values: {where}, {part}{field}, sample {int(rows[0])} (and "
                        f"{rows.numel() - 1} more in that batch). This is a fault of the data, not of the model or "
                        "the optimizer: clean the data source (drop those samples or replace the values, e.g. "
                        "numpy.nan_to_num) or use another one"
                    )


def _checked_loss(output_of: Callable[[], Any], loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any, targets: Any,
                  where: str) -> Any:
    """``output_of()`` (the model's output on the batch), after checking that the loss on it is one finite number."""
    try:
        output = output_of()
        loss = loss_fn(output, targets)
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the model fails on {where} (inputs {describe_batch(inputs)}, targets "
                         f"{describe_batch(targets)}): "
                         f"{first_line}. Check that the data source fits the model's input and that the labels "
                         "fit its output (integer class indices in [0, classes))") from err
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not math.isfinite(float(loss)):
        shown = loss.detach().cpu().numpy() if isinstance(loss, torch.Tensor) else repr(loss)
        raise ValueError(f"the loss on {where} is {shown} at the initial parameters: it must be one finite number; "
                         "look for a loss function that does not reduce to a scalar, or for an initialisation or "
                         "targets (e.g. every label ignored) that make it NaN")
    return output


@contextlib.contextmanager
def twice_differentiable_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on its math backend, the one with a double backward.

    Fused attention kernels (flash, memory-efficient, cuDNN) implement only a first derivative.
    """
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def explain_double_backward_failure(err: RuntimeError) -> HessianSetupError:
    """Turn autograd's message about a missing second derivative into an actionable one."""
    return HessianSetupError(
        "the model uses an operation without a second derivative, so exact Hessian-vector products "
        f"are impossible (autograd: {err}). Fused attention kernels and custom autograd Functions marked "
        "once_differentiable are the usual causes; scaled_dot_product_attention "
        "is already forced onto its math backend here, so replace any other fused kernel (e.g. xformers, "
        "flash-attn, custom CUDA ops) with plain tensor operations (naive attention: softmax(q @ k^T) @ v)."
    )


def check_same_loss(first: torch.Tensor, second: torch.Tensor) -> None:
    """Refuse a non-finite loss, and a loss that differs between two evaluations on the same batch."""
    if not torch.isfinite(first):
        raise HessianSetupError(
            f"the loss on the first batch is {first.item()}: check the data (NaN/inf inputs), the targets "
            "and the initialisation before measuring the Hessian."
        )
    tol = 1e-12 if first.dtype == torch.float64 else 1e-6
    if not torch.isclose(first, second, rtol=tol, atol=0.0):
        raise HessianSetupError(
            f"two evaluations of the loss on the same batch differ ({first.item():.17g} vs {second.item():.17g}): "
            "the model is not deterministic (dropout applied in forward, random augmentation, sampling). "
            "Remove the randomness (model.eval(), F.dropout(..., training=False)) before measuring the Hessian."
        )


def check_gradients(names: list[str], grads: list[torch.Tensor | None]) -> None:
    """Refuse parameters the loss does not depend on, and non-finite gradients."""
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise HessianSetupError(
            f"the loss does not depend on parameter(s) {unused[:5]}{' ...' if len(unused) > 5 else ''}: "
            "their Hessian blocks are empty. Leave them out of the block selection or set requires_grad=False."
        )
    bad = [n for n, g in zip(names, grads) if not torch.isfinite(g).all()]
    if bad:
        raise HessianSetupError(
            f"non-finite gradient for parameter(s) {bad[:5]}: check the data (NaN/inf inputs), the loss, "
            "and the initialisation before measuring the Hessian."
        )


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype.to_real() if dtype.is_complex else dtype).eps


class LowerPrecisionRecorder(TorchDispatchMode):
    """Records the operations of one forward that touch values depending on the parameters (tensors that
    require grad) in a lower precision than ``dtype``: casts down (``aten._to_copy`` float64 -> float32) and
    operations computed in the lower precision. A lower-precision constant that never meets a
    parameter-dependent value (a float32 table of positions) is not recorded: it is one fixed input of a
    function still computed in ``dtype``."""

    _BOOKKEEPING = ("detach", "alias", "lift_fresh")  # autograd's own copies, not computations

    def __init__(self, dtype: torch.dtype, where: Callable[[], str]) -> None:
        super().__init__()
        self.eps = _eps(dtype)
        self.where = where
        self.casts: dict[tuple[str, torch.dtype, torch.dtype], list[str]] = {}  # (op, from, to) -> places
        self.computed: dict[str, list[str]] = {}  # op -> places (operations run in a lower precision)
        self.lower: set[torch.dtype] = set()
        self.count = 0  # operations recorded
        self.computed_count = 0  # of which computed in the lower precision (not casts down)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self._BOOKKEEPING:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        dependent = [t for t in inputs if t.requires_grad]  # inside the dispatch: depends on the parameters
        if not dependent:
            return out
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        low_in = [t.dtype for t in dependent if _eps(t.dtype) > self.eps]
        low_out = [t.dtype for t in outputs if _eps(t.dtype) > self.eps]
        if not low_in and not low_out:
            return out
        self.count += 1
        self.lower.update(low_in + low_out)
        place, name = self.where(), func.overloadpacket.__name__
        if not low_in:  # every parameter-dependent input in the precision asked for, a lower output
            places = self.casts.setdefault((name, min((t.dtype for t in dependent), key=_eps), low_out[0]), [])
        else:
            self.computed_count += 1
            places = self.computed.setdefault(name, [])
        if place not in places:
            places.append(place)
        return out


@contextlib.contextmanager
def _module_stack(model: nn.Module, *, pop_on_error: bool = True) -> Iterator[Callable[[], str]]:
    """Within the block, track which of ``model``'s modules runs its forward; yields ``where()``, the
    innermost one as "'name' (Type)" ("the loss function" outside every module). With ``pop_on_error``
    False a module whose forward raised stays on the stack, so ``where()`` names it afterwards."""
    stack: list[int] = []  # ids of the modules whose forward runs
    names = {id(module): (name, type(module).__name__) for name, module in model.named_modules()}

    def where() -> str:
        if not stack:
            return "the loss function"
        name, kind = names[stack[-1]]
        return f"'{name}' ({kind})" if name else f"the forward of {kind}"

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(id(module))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack and stack[-1] == id(module):
            stack.pop()

    handles = []
    try:
        for module in dict.fromkeys(m for _, m in model.named_modules()):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=pop_on_error))
        yield where
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def lower_precision_operations(model: nn.Module, dtype: torch.dtype) -> Iterator[LowerPrecisionRecorder]:
    """Within the block, record the operations of ``model`` (run with parameters that require grad) that
    compute parameter-dependent values in a lower precision than ``dtype``, with the module they run in."""
    with _module_stack(model) as where, LowerPrecisionRecorder(dtype, where) as recorder:
        yield recorder


def failing_module(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """The module of ``model`` whose forward raised when ``run()`` failed ("'name' (Type)", or "the loss
    function"), or None when ``run()`` succeeds."""
    with _module_stack(model, pop_on_error=False) as where:
        try:
            run()
        except Exception:  # noqa: BLE001 - any failure is located, the caller reports it
            return where()
    return None


def _listed(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_precision(model: nn.Module, loss: Callable[[], torch.Tensor], dtype: torch.dtype,
                    stacklevel: int = 2) -> bool:
    """Run ``loss()`` (one forward of the loss, with parameters that require grad) and warn once
    (:class:`PrecisionWarning`) when it computes parameter-dependent values in a lower precision than
    ``dtype``, naming the operations, the modules they run in, the consequence and the fixes. Returns
    whether it warned."""
    with lower_precision_operations(model, dtype) as found:
        loss()
    if not found.count:
        return False
    def short(d: torch.dtype) -> str:
        return str(d).removeprefix("torch.")

    worst = max(found.lower, key=_eps)
    low = "/".join(short(d) for d in sorted(found.lower, key=_eps))
    casts = "; ".join(f"aten.{op} ({short(a)} -> {short(b)}) in {_listed(places)}"
                      for (op, a, b), places in found.casts.items())
    computed = (f"{found.computed_count} operation(s) run in {low} on "
                f"{'them' if casts else 'values that depend on the parameters'} ({_listed(list(found.computed), 6)})")
    if casts:
        what = f"values that depend on the parameters are cast down by {casts}"
        what += f", and {computed}" if found.computed_count else ""
    else:
        what = computed
    warnings.warn(
        f"dtype={dtype} was asked for, but the forward computes part of the loss in {low}: {what}. "
        f"Hessian-vector products (and losses, gradients) are then only as accurate as {short(worst)} "
        f"(about {_eps(worst):.0e} relative), not {short(dtype)}. For {short(dtype)} accuracy, make the forward keep "
        "the dtype (e.g. patch a norm that casts its input to float32 to compute in its input's dtype); or accept "
        f"that accuracy; or measure with dtype={worst}{' (--dtype float32)' if worst == torch.float32 else ''}, "
        "where the products are consistent with the forward.",
        PrecisionWarning, stacklevel=stacklevel + 1,
    )
    return True


@contextlib.contextmanager
def full_float32_precision() -> Iterator[None]:
    """Within the block, float32 matrix products and convolutions on CUDA run in full float32 (IEEE), not
    TF32: cuDNN convolutions use TF32 by default (and a program may have allowed it for matmuls), which
    rounds their inputs to 10 mantissa bits, about 1e-3 relative, far from float32's 1e-7."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
