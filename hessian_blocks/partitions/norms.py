"""Normalisation layers read from a forward pass: which parameters scale (and shift) normalised activations.

A normalisation divides activations by a statistic of themselves and multiplies the result by a
learned scale: RMSNorm ``x * rsqrt(mean(x^2) + eps) * w``, LayerNorm ``(x - mean) / sqrt(var + eps)
* w + b``, ``F.normalize(x) * g``, or torch's fused ``layer_norm`` / ``rms_norm`` / ``group_norm`` /
``batch_norm`` with the parameters as arguments. :class:`NormFinder` is a ``TorchDispatchMode`` that
runs beside the head tracer (:mod:`.follow`) and marks, ATen op by ATen op:

- *statistics*: reductions with ``keepdim`` (``mean``, ``var``, ``sum``, a vector norm ...) of an
  activation (not of a parameter), and pointwise ops on statistics with constants (``+ eps``,
  ``rsqrt``, ``sqrt``, ``reciprocal``, ``clamp``); a statistic that went through a square root
  (``rsqrt``, ``sqrt``, a vector norm) is a *scale statistic*;
- *normalised* activations: an activation multiplied by, or divided by, a scale statistic, and casts,
  copies and views of them; *scaled* ones: a normalised activation times a parameter;
- a parameter (or a cast, view or ``1 + w`` of it) that multiplies a normalised activation is a norm
  *scale*; one added to a normalised or scaled activation is a norm *bias*.

A softmax written by hand (``exp(x) / sum(exp(x))``) divides by a statistic without a square root, and
a weight normalised by its own norm is no activation: neither is a normalisation here.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["NormFinder"]

_REDUCTIONS = {"mean", "sum", "var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm", "amax"}
_ROOTS = {"rsqrt", "sqrt", "linalg_vector_norm", "norm", "std", "std_mean"}
_COPIES = {"_to_copy", "clone", "contiguous", "alias", "detach", "copy", "lift_fresh", "expand", "view",
           "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand_as", "t", "transpose", "permute"}
# fused normalisations: positions of (scale, bias) among the arguments
_FUSED = {"native_layer_norm": (2, 3), "_fused_rms_norm": (2, None), "native_group_norm": (1, 2),
          "native_batch_norm": (1, 2), "_native_batch_norm_legit": (1, 2),
          "_native_batch_norm_legit_no_training": (1, 2)}


class NormFinder(TorchDispatchMode):
    """Runs every ATen op unchanged and collects the parameters that scale or shift normalised activations."""

    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.keep: list[torch.Tensor] = []        # tracked tensors stay alive: their ids are never reused
        self.derived: dict[int, str] = dict(params)  # id -> parameter it is a cast, view or pointwise copy of
        self.stats: dict[int, bool] = {}          # id -> whether the statistic went through a square root
        self.normalised: set[int] = set()
        self.scaled: set[int] = set()
        self.scales: set[str] = set()
        self.biases: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._follow(func.overloadpacket.__name__, func, args, kwargs, out)
        except Exception:  # noqa: BLE001 (bookkeeping only: the forward itself never depends on it)
            pass
        return out

    def _mark(self, where: dict | set, tensor: object, value: object = None) -> None:
        if isinstance(tensor, torch.Tensor):
            self.keep.append(tensor)
            if isinstance(where, dict):
                where[id(tensor)] = value
            else:
                where.add(id(tensor))

    def _follow(self, name: str, func, args, kwargs, out) -> None:
        if name in _FUSED:
            for at, found in zip(_FUSED[name], (self.scales, self.biases)):
                if at is not None and len(args) > at and id(args[at]) in self.derived:
                    found.add(self.derived[id(args[at])])
            return
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.ndim > 0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not tensors or not isinstance(out, torch.Tensor):
            return
        kinds = [self._kind(t) for t in tensors]
        pointwise = torch.Tag.pointwise in func.tags
        if name in _REDUCTIONS and len(kinds) == 1 and kinds[0] not in ("parameter", "statistic") \
                and out.ndim == tensors[0].ndim and out.numel() < tensors[0].numel():   # mean(x^2, -1, keepdim=True)
            self._mark(self.stats, out, name in _ROOTS)
        elif set(kinds) == {"statistic"} and pointwise:                    # + eps, rsqrt, clamp
            self._mark(self.stats, out, name in _ROOTS or any(self.stats[id(t)] for t in tensors))
        elif set(kinds) == {"parameter"} and len(tensors) == 1 and (pointwise or name in _COPIES):
            self._mark(self.derived, out, self.derived[id(tensors[0])])  # w.float(), 1 + w, w.view(...)
        elif len(tensors) == 1 and name in _COPIES:                        # casts and views keep what they copy
            self._copy(tensors[0], out)
        elif len(tensors) == 2 and name in ("mul", "div"):
            self._product(name, tensors, kinds, out)
        elif len(tensors) == 2 and name == "add" and "parameter" in kinds and {"normalised", "scaled"} & set(kinds):
            self.biases.add(self.derived[id(tensors[kinds.index("parameter")])])
            self._mark(self.scaled, out)

    def _kind(self, tensor: torch.Tensor) -> str:
        if id(tensor) in self.derived:
            return "parameter"
        if id(tensor) in self.stats:
            return "statistic"
        if id(tensor) in self.normalised:
            return "normalised"
        return "scaled" if id(tensor) in self.scaled else "activation"

    def _copy(self, source: torch.Tensor, out: torch.Tensor) -> None:
        if id(source) in self.stats:
            self._mark(self.stats, out, self.stats[id(source)])
        for mark in (self.normalised, self.scaled):
            if id(source) in mark:
                self._mark(mark, out)

    def _product(self, name: str, tensors: list[torch.Tensor], kinds: list[str], out: torch.Tensor) -> None:
        root = [k == "statistic" and self.stats[id(t)] for t, k in zip(tensors, kinds)]
        moving = [k not in ("statistic", "parameter") for k in kinds]     # activations, normalised or not
        if sum(moving) == 1 and any(root) and (name == "mul" or root[1]):
            self._mark(self.normalised, out)                                # x * rsqrt(...), x / sqrt(...)
        elif name == "mul" and "normalised" in kinds and "parameter" in kinds:
            self.scales.add(self.derived[id(tensors[kinds.index("parameter")])])
            self._mark(self.scaled, out)                                    # w * normalised
