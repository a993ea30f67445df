"""Adam-mini: Adam with one second-moment scalar per block of a partition (update rule: optim/update.py).

The blocks come from a :class:`~hessian_blocks.blocks.Partition` (an object, a partition file, or
``"default"``: the structural default of :mod:`hessian_blocks.partitions.structural`). A rule of "elements" gives
plain AdamW for that tensor.

Four implementations, chosen like torch's AdamW: a plain per-parameter loop (``foreach=False``), a
``foreach`` path that batches the elementwise work over all tensors (the default off CUDA), the
hand-written Triton kernels of :mod:`optim.kernels` (``fused=True`` on CUDA, and the CUDA default:
a few launches per step, step counts kept and counted on the device, so a step can be captured in a
CUDA graph), and on the CPU a compiled update (``fused=True`` there: ``torch.compile`` with Inductor's
C++ backend; the first step then takes tens of seconds). What the chosen path cannot run (float64
parameters on CUDA, Triton missing, no C++ compiler) takes the foreach path with a warning.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from hessian_blocks.blocks import Partition, Rule
from hessian_blocks.partitions.structural import default_rules

from .distributed import ShardedBlockLayout, block_layout, local_tensor, shard_offset, sharded_scales
from .functional import choose_implementation, run_updates
from .hooks import ParamTransform, UpdateHook
from .kernels import KERNEL_DTYPES
from .layout import BlockLayout
from .low_precision import (
    QUANT_BLOCK,
    dequantize_blockwise,
    quantize_blockwise_,
    quantized_scale_count,
    stochastic_round_,
)
from .update import Hyperparameters, StepTensors

__all__ = ["STATE_KEYS", "AdamMini"]

Params = Union[nn.Module, Iterable[tuple[str, torch.Tensor]], Iterable[dict]]
PartitionArg = Union[Partition, str, Path]

STATE_KEYS = ("step", "exp_avg", "block_exp_avg_sq")
# Version of AdamMini's state dicts, saved in every param group under "version" (param-group keys
# survive torch.distributed.checkpoint, top-level keys do not); older ones are upgraded on load.
# 1: no "version" key, no "maximize"; 2: "maximize".
STATE_DICT_VERSION = 2
_COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts before its module's parameter names


class AdamMini(torch.optim.Optimizer):
    """Adam-mini over the blocks of a partition (see the module docstring for the update).

    Args:
        params: an ``nn.Module`` (its trainable parameters), an iterable of (name, tensor) pairs, or
            param-group dicts whose ``"params"`` are (name, tensor) pairs; names tie tensors to rules.
            Bare tensors work too when they are parameters of ``model``. A ``torch.compile``'d module
            is named as its original module, so partition files and checkpoints carry between the two.
        partition: a ``Partition``, the path of a partition file, or ``"default"`` (needs the model:
            pass it as ``params`` or as ``model``). It must hold exactly one rule per parameter.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay).
        model: the module the parameters belong to: names bare tensors, and ``partition="default"``
            derives its rules from it.
        n_heads: head count for the default partition's attention modules (default: each module's own).
        state_dtype: dtype of the first moment (default: the parameter's): a floating dtype (e.g.
            ``torch.bfloat16``), or ``torch.int8`` for an 8-bit block-quantized first moment (int8 codes
            and one float32 scale per 256 coordinates: :mod:`optim.low_precision`). Second moments are
            float32 (float64 for float64 parameters) whatever the parameter dtype. For FSDP2-sharded
            (DTensor) parameters the codes are a DTensor like the parameter and the 256-coordinate runs
            are those of each rank's shard (:func:`optim.distributed.sharded_scales`): such checkpoints
            resume with the number of ranks they were saved with.
        stochastic_rounding: write the updates of bfloat16 parameters with stochastic rounding
            (computed in float32, rounded up or down at random without bias), so that updates smaller
            than bfloat16's spacing are not lost. The draws depend only on ``rounding_seed``, the
            parameter's position and its step count: a resumed run draws what an uninterrupted one does.
            A sharded (DTensor) parameter rounds its local shard, with draws that also depend on where
            the shard starts: bit-identical across a resume with the same number of ranks; another
            number of ranks draws differently (equally unbiased).
        rounding_seed: seed of the stochastic rounding.
        foreach, fused: implementation flags, as in ``torch.optim.AdamW`` (``fused=True``: the Triton kernels
            on CUDA, the compiled update on the CPU).
        maximize: ascend the objective instead of descending it, as in ``torch.optim.AdamW``.
        hook: an :class:`~optim.hooks.UpdateHook`, the declared extension point (extra param-group
            options, per-parameter transforms of the update; GaLore-mini is AdamMini with one).
        amsgrad, capturable, differentiable: accepted for ``torch.optim.AdamW``'s signature; True is
            refused (Adam-mini has no per-coordinate maximum to keep; on CUDA its default step is
            capturable without the flag; it updates in place without autograd).

    Unlike ``torch.optim.AdamW`` (0.01), ``weight_decay`` defaults to 0.

    State per parameter: ``step`` (0-d float32 tensor), ``exp_avg`` (parameter shape) and
    ``block_exp_avg_sq`` (one entry per block, in block order of the partition).
    """

    def __init__(
        self,
        params: Params,
        partition: PartitionArg = "default",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        model: nn.Module | None = None,
        n_heads: int | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        hook: UpdateHook | None = None,
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True: pick one implementation")
        _refuse_unsupported(dict(amsgrad=amsgrad, capturable=capturable, differentiable=differentiable))
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("pass the model once: either as params or as model=")
            model = _uncompiled(params)
            params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        elif model is not None:
            model = _uncompiled(model)
        groups = _named_groups(params, model)
        shapes = _named_shapes(groups)
        self._partition, self._rules, self._rule_shapes = _resolve_partition(partition, shapes, model, n_heads)
        self._model_class = type(model).__name__ if model is not None else None
        self._layouts: dict[torch.Tensor, BlockLayout | ShardedBlockLayout] = {}
        self._state_dtype = _checked_state_dtype(state_dtype)
        self._stochastic_rounding = bool(stochastic_rounding)
        self._rounding_seed = int(rounding_seed)
        self._positions: dict[torch.Tensor, int] | None = None  # see _position; reset when groups are added
        self._warned_fallback = False
        self._kinds: dict[tuple, str] = {}  # (group id, foreach, fused, size) -> implementation
        self._hook = hook or UpdateHook()
        self._transforms: dict[torch.Tensor, ParamTransform] = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused, **self._hook.defaults)
        super().__init__(groups, defaults)

    @property
    def partition(self) -> Partition:
        """The partition in use: one rule per parameter of the optimizer (resolved on first access)."""
        names = [name for group in self.param_groups for name in group["param_names"]]
        if self._partition is None or list(self._partition.param_shapes) != names:
            shapes = {name: self._rule_shapes[name] for name in names}
            self._partition = Partition([self._rules[name] for name in names], shapes, self._model_class)
        return self._partition

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of (name, tensor) pairs; each name needs a rule in the optimizer's partition."""
        _refuse_unsupported(param_group)
        self._positions = None
        self._kinds.clear()
        pairs = list(param_group.get("params", []))
        if not all(isinstance(item, tuple) and len(item) == 2 for item in pairs):
            raise TypeError("AdamMini needs named parameters: pass (name, tensor) pairs, e.g. model.named_parameters()")
        layouts, rules = {}, []
        for name, param in pairs:
            rule = self._rules.get(name)
            if rule is None:
                raise ValueError(f"the partition has no rule for parameter '{name}': every parameter needs exactly "
                                 "one rule")
            if tuple(param.shape) != self._rule_shapes[name]:
                raise ValueError(
                    f"parameter '{name}' has shape {list(param.shape)} but the partition's rule was made for "
                    f"{list(self._rule_shapes[name])}: derive the partition again for this model"
                )
            _check_param(name, param)
            layouts[param] = block_layout(rule, param, name)
            rules.append(_rule_key(rule))
        super().add_param_group({**param_group, "params": pairs, "block_rules": rules})
        added = self.param_groups[-1]
        try:
            _check_hyperparameters(added)
            self._hook.check_group(added)
        except ValueError:
            self.param_groups.pop()
            raise
        transforms = []
        for name, param in pairs:
            transform = self._hook.transform(added, name, param, self._rules[name])
            if transform is not None:
                self._transforms[param] = transform
                layouts[param] = BlockLayout.from_rule(self._rules[name], transform.shape)
            transforms.append(None if transform is None else transform.key())
        if self._hook.group_key is not None:
            added[self._hook.group_key] = transforms
        self._layouts.update(layouts)

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam-mini step over every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps: dict[str, list[StepTensors]] = {}
        transformed: list[tuple[dict[str, Any], StepTensors, list[tuple[torch.Tensor, float]]]] = []
        write_backs: list[Callable[[], None]] = []
        for group in self.param_groups:
            kind = self._implementation(group)
            plain, transformed_step, transformed_params = self._gather(group, kind, write_backs)
            if plain.params:
                steps.setdefault(kind, []).append(plain)
            if transformed_step.params:
                transformed.append((group, transformed_step, transformed_params))
        run_updates(steps)
        for group, step, params in transformed:  # never compiled: their tensors are new every step
            run_updates({"reference" if group["foreach"] is False and not group["fused"] else "foreach": [step]})
            for (param, decay), update in zip(params, step.params):
                self._transforms[param].apply(param, self.state[param], update, decay, group)
        for write_back in write_backs:
            write_back()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; every param group also records its ``block_rules`` and the
        :data:`STATE_DICT_VERSION` (under ``"version"``)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group["version"] = STATE_DICT_VERSION
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; state tensors keep AdamMini's dtypes (torch would cast them to the
        parameter dtype) and must match this optimizer's partition. State dicts of older versions
        are upgraded; one without block rules (not saved by AdamMini) is refused. Nothing changes on
        an error."""
        state_dict = _upgraded(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            super().load_state_dict(state_dict)  # raises torch's error for a state dict of other groups
        self._check_saved_rules(saved_groups)
        self._check_saved_transforms(saved_groups)
        restored = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for pid, param, name in zip(saved["params"], group["params"], group["param_names"]):
                if pid in state_dict["state"]:
                    restored[param] = self._restored_state(name, param, state_dict["state"][pid])
        super().load_state_dict(state_dict)
        self._kinds.clear()  # the param groups are new dicts
        for param, state in restored.items():
            self.state[param] = state

    # -- internals -------------------------------------------------------------------------------

    def _implementation(self, group: dict[str, Any]) -> str:
        """The group's implementation (:func:`~optim.functional.choose_implementation`); a fallback
        from the one asked for (or from the CUDA default) is warned once. Sharded parameters keep
        their collective path (foreach)."""
        params = group["params"]
        key = (id(group), group["foreach"], group["fused"], len(params), params[0].device if params else None)
        if key not in self._kinds:
            kind, fallback = choose_implementation(params, foreach=group["foreach"], fused=group["fused"])
            if kind in ("kernel", "compiled") and any(isinstance(self._layouts[p], ShardedBlockLayout) for p in params):
                kind, fallback = "foreach", ""
            if fallback and not self._warned_fallback:
                warnings.warn(f"AdamMini: {fallback}", stacklevel=4)
                self._warned_fallback = True
            self._kinds[key] = kind
        return self._kinds[key]

    def _gather(
        self, group: dict[str, Any], kind: str, write_backs: list[Callable[[], None]]
    ) -> tuple[StepTensors, StepTensors, list[tuple[torch.Tensor, float]]]:
        """The group's parameters that have gradients and their state (created on first use); the
        transformed ones split off: their zero step tensors and transformed gradients (no weight
        decay, steps already counted), and the parameters with the decay factor their transform applies.

        Low-precision state and parameters enter as float32 working copies; ``write_backs`` gets
        what writes them back after the update (quantizing the first moment again, rounding the
        parameter stochastically). For the kernels, step counts live on the parameters' device."""
        beta1, beta2 = group["betas"]
        hyper = Hyperparameters(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["maximize"])
        plain = StepTensors(hyper)
        transformed = StepTensors(replace(hyper, weight_decay=0.0, maximize=False))
        transformed_params: list[tuple[torch.Tensor, float]] = []
        # kernels count steps on the device, except under stochastic rounding, whose draws are seeded on the host
        on_device = kind == "kernel" and not self._stochastic_rounding
        plain_tensors = self._state_dtype != torch.int8 and not self._stochastic_rounding
        for name, param in zip(group["param_names"], group["params"]):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"AdamMini does not support sparse gradients (parameter '{name}'): use a dense "
                                   "embedding")
            if param.shape != self._rule_shapes[name]:
                raise ValueError(
                    f"parameter '{name}' now has shape {list(param.shape)}, "
                    f"not the {list(self._rule_shapes[name])} its "
                    "block layout was made for: build a new optimizer (and partition) for the resized model"
                )
            state = self.state[param]
            if not state:
                _check_param(name, param)
                state.update(self._initial_state(param))
            if plain_tensors and not isinstance(param, DTensor):
                exp_avg, target = state["exp_avg"], param
            else:
                exp_avg, target = self._working_tensors(name, param, state, write_backs)
            if not grad.is_contiguous() or grad.dtype != exp_avg.dtype and not (
                    on_device and exp_avg.dtype == torch.float32 and grad.dtype in KERNEL_DTYPES):
                # (the kernels read bf16/fp16 gradients of a float32 first moment as they are: the same numbers)
                grad = grad.to(dtype=exp_avg.dtype, memory_format=torch.contiguous_format)
            transform = self._transforms.get(param)
            if transform is None:
                if on_device and state["step"].device != param.device:
                    state["step"] = state["step"].to(param.device)
                plain.add(target, local_tensor(grad), exp_avg, state["block_exp_avg_sq"], state["step"],
                          self._layouts[param])
                continue
            state["step"].add_(1.0)  # the transform sees this step counted
            grad = transform.gradient(group, name, state, grad.neg() if hyper.maximize else grad)
            transformed.add(torch.zeros_like(grad), grad, exp_avg, state["block_exp_avg_sq"], state["step"],
                            self._layouts[param])
            transformed.scalars.append(transformed.hyper.scalars(float(state["step"])))
            transformed_params.append((param, hyper.scalars(1.0).decay))
        return plain, transformed, transformed_params

    def _working_tensors(
        self, name: str, param: torch.Tensor, state: dict[str, torch.Tensor], write_backs: list[Callable[[], None]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(first moment, parameter) as the update sees them: the stored tensors, or float32 working
        copies of an 8-bit first moment and of a bfloat16 parameter under stochastic rounding, with
        the write-backs that store them after the update."""
        quantized = self._state_dtype == torch.int8
        rounded = self._stochastic_rounding and param.dtype == torch.bfloat16
        exp_avg, target = local_tensor(state["exp_avg"]), local_tensor(param)
        if quantized:
            # a DTensor's codes are its local shard, quantized per run of the shard (optim.distributed.sharded_scales)
            codes, scales = exp_avg, local_tensor(state["exp_avg_scale"]).view(-1)
            if isinstance(param, DTensor):
                scales = scales[: -(-codes.numel() // QUANT_BLOCK)]
            exp_avg = dequantize_blockwise(codes, scales)
            write_backs.append(functools.partial(quantize_blockwise_, exp_avg, codes, scales))
        if rounded:
            local = target
            target = local.float()
            generator = torch.Generator(local.device)
            # the draws of a step depend on the seed, the parameter's position and the step, not on history;
            # a shard's also on where it starts in the whole tensor, so that shards draw independently
            key = (self._rounding_seed, self._position(param), int(state["step"]) + 1)
            if isinstance(param, DTensor):
                key += (shard_offset(param),)
            generator.manual_seed(hash(key) % (1 << 63))
            write_backs.append(functools.partial(stochastic_round_, local, target, generator))
        return exp_avg, target

    def _position(self, param: torch.Tensor) -> int:
        """The parameter's index among all of the optimizer's parameters (stable across a resume)."""
        if self._positions is None:
            self._positions = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return self._positions[param]

    def _initial_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype, transform = self._exp_avg_dtype(param), self._transforms.get(param)
        state = {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": torch.zeros_like(param, dtype=dtype, memory_format=torch.contiguous_format)
            if transform is None else torch.zeros(transform.shape, dtype=dtype, device=param.device),
            "block_exp_avg_sq": torch.zeros(self._layouts[param].n_blocks, dtype=_block_dtype(param),
                                            device=param.device),
            **({} if transform is None else transform.extra_state(param, dtype)),
        }
        if self._state_dtype == torch.int8:
            state["exp_avg_scale"] = _zero_scales(param)
        return state

    def _exp_avg_dtype(self, param: torch.Tensor) -> torch.dtype:
        return self._state_dtype or param.dtype

    def _restored_state(self, name: str, param: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        missing = [key for key in STATE_KEYS if key not in saved]
        if missing:
            raise ValueError(f"saved state of parameter '{name}' lacks {missing}: it was not saved by AdamMini")
        n_blocks = self._layouts[param].n_blocks
        if tuple(saved["block_exp_avg_sq"].shape) != (n_blocks,):
            raise ValueError(
                f"saved state of parameter '{name}' has {saved['block_exp_avg_sq'].numel()} blocks but this "
                f"optimizer's partition gives it {n_blocks}: load with the partition the checkpoint was made with"
            )
        dtype, transform = self._exp_avg_dtype(param), self._transforms.get(param)
        extras = {} if transform is None else transform.extra_state(param, dtype)
        expected = {} if transform is None else {"exp_avg": transform.shape,
                                                 **{k: tuple(v.shape) for k, v in extras.items()}}
        for key, shape in expected.items():
            if key not in saved or tuple(saved[key].shape) != shape:
                found = list(saved[key].shape) if key in saved else "nothing"
                raise ValueError(
                    f"saved state of parameter '{name}' has {key} {found}, expected {list(shape)}: "
                    "load with the settings (rank, partition, ...) the checkpoint was made with"
                )
        restored = dict(saved)
        restored["step"] = saved["step"].to(dtype=torch.float32, device="cpu", copy=True)
        restored["exp_avg"] = saved["exp_avg"].to(dtype=dtype, device=param.device, copy=True)
        restored["block_exp_avg_sq"] = saved["block_exp_avg_sq"].to(dtype=_block_dtype(param), device=param.device,
                                                                    copy=True)
        quantized = self._state_dtype == torch.int8
        if quantized != ("exp_avg_scale" in saved):
            raise ValueError(
                f"saved state of parameter '{name}' has {'an 8-bit' if not quantized else 'a floating'} "
                f"first moment but this optimizer keeps {'an 8-bit' if quantized else 'a floating'} one: "
                "build it with the checkpoint's state_dtype"
            )
        if quantized:
            shape = tuple(_zero_scales(param).shape)
            if tuple(saved["exp_avg_scale"].shape) != shape:
                raise ValueError(
                    f"saved state of parameter '{name}' has first-moment scales of shape "
                    f"{list(saved['exp_avg_scale'].shape)}, expected {list(shape)}: it was saved for another shape, or "
                    "(8-bit state of a sharded parameter: one row of scales per shard) for another number of ranks"
                )
            restored["exp_avg_scale"] = saved["exp_avg_scale"].to(dtype=torch.float32, device=param.device, copy=True)
        for key, template in extras.items():
            restored[key] = saved[key].to(dtype=template.dtype, device=template.device, copy=True)
        return restored

    def _check_saved_transforms(self, saved_groups: list[dict[str, Any]]) -> None:
        key = self._hook.group_key
        if key is None:
            return
        for saved, group in zip(saved_groups, self.param_groups):
            for name, ours, theirs in zip(group["param_names"], group[key],
                                          saved.get(key, [None] * len(group["params"]))):
                if ours != theirs:
                    raise ValueError(
                        f"the checkpoint's {key} entry for parameter '{name}' is {theirs} "
                        f"but this optimizer's is {ours}: "
                        "build the optimizer with the settings (rank, partition, ...) the checkpoint was made with"
                    )

    def _check_saved_rules(self, saved_groups: list[dict[str, Any]]) -> None:
        for saved, group in zip(saved_groups, self.param_groups):
            for name, ours, theirs in zip(group["param_names"], group["block_rules"], saved["block_rules"]):
                if ours != theirs:
                    raise ValueError(
                        f"the checkpoint was saved with rule {theirs} for parameter '{name}' but this optimizer "
                        f"uses {ours}: build the optimizer with the checkpoint's partition"
                    )

def _upgraded(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (not modified) with param groups of :data:`STATE_DICT_VERSION`, without their
    "version" key; an error for a newer version or a group without one block rule per parameter."""
    groups = []
    for index, saved in enumerate(state_dict["param_groups"]):
        group = dict(saved)
        version = group.pop("version", 1)
        if not isinstance(version, int) or not 1 <= version <= STATE_DICT_VERSION:
            raise ValueError(
                f"param group {index} of the state dict has version {version!r}; this AdamMini reads versions 1 to "
                f"{STATE_DICT_VERSION}: load it with the (newer) hessian-blocks that saved it"
            )
        rules = group.get("block_rules")
        if not isinstance(rules, list) or len(rules) != len(group["params"]):
            found = ("no 'block_rules'" if rules is None
                     else f"{len(rules) if isinstance(rules, list) else rules!r} block rules")
            raise ValueError(
                f"param group {index} of the state dict has {found} for its {len(group['params'])} parameters: "
                "it was not saved by AdamMini (or was edited), so its per-block state cannot be checked against this "
                "optimizer's partition; load a state dict written by AdamMini.state_dict()"
            )
        if version < 2:
            group.setdefault("maximize", False)
        groups.append(group)
    return {**state_dict, "param_groups": groups}


def _checked_state_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """``state_dtype`` when AdamMini can keep a first moment in it: a floating dtype, or int8 (quantized)."""
    if dtype is None or dtype == torch.int8 or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise ValueError(f"state_dtype={dtype!r}: use a floating dtype (torch.float32, torch.bfloat16, ...) or torch.int8 "
                     "for an 8-bit block-quantized first moment")


def _zero_scales(param: torch.Tensor) -> torch.Tensor:
    """Zero scales of an 8-bit first moment of ``param``: one per run of :data:`QUANT_BLOCK`
    coordinates, of the whole tensor, or of each rank's shard for a DTensor."""
    if isinstance(param, DTensor):
        return sharded_scales(param, QUANT_BLOCK)
    return torch.zeros(quantized_scale_count(param.numel()), dtype=torch.float32, device=param.device)


def _block_dtype(param: torch.Tensor) -> torch.dtype:
    """Second moments are float32, or float64 for float64 parameters."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _rule_key(rule: Rule) -> dict[str, Any]:
    """A rule as plain data without its free-text evidence (what state dicts record and compare)."""
    data = rule.to_dict()
    data.pop("why", None)
    return data


def _check_hyperparameters(group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    checks = {
        "lr": group["lr"] >= 0.0,
        "beta1": 0.0 <= beta1 < 1.0,
        "beta2": 0.0 <= beta2 < 1.0,
        "eps": group["eps"] >= 0.0,
        "weight_decay": group["weight_decay"] >= 0.0,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(
            f"invalid AdamMini hyperparameter(s) {bad}: need lr >= 0, 0 <= betas < 1, eps >= 0, weight_decay >= 0; "
            f"got lr={group['lr']}, betas={group['betas']}, eps={group['eps']}, weight_decay={group['weight_decay']}"
        )


_UNSUPPORTED = {
    "amsgrad": "Adam-mini keeps one running average of g^2 per block, no per-coordinate maximum; "
    "use torch.optim.AdamW(amsgrad=True) for AMSGrad",
    "capturable": "on CUDA its default path (the Triton kernels) keeps step counts on the device and its step can "
    "be captured in a CUDA graph as it is; the other paths read step counts on the host",
    "differentiable": "it updates in place under torch.no_grad; use torch.optim.AdamW(differentiable=True) "
    "to differentiate through optimizer steps",
}


def _refuse_unsupported(options: dict[str, Any]) -> None:
    """A clear error for torch.optim.AdamW options AdamMini accepts only as False."""
    for key, why in _UNSUPPORTED.items():
        if options.get(key):
            raise ValueError(f"AdamMini does not support {key}=True: {why}")


def _check_param(name: str, param: torch.Tensor) -> None:
    if not param.is_floating_point():
        raise TypeError(f"parameter '{name}' has dtype {param.dtype}: AdamMini updates real floating-point tensors "
                        "only")
    if not param.is_contiguous():
        raise ValueError(f"parameter '{name}' is not contiguous (channels_last?): AdamMini needs contiguous parameters")


def _named_groups(params: Iterable, model: nn.Module | None) -> list[dict[str, Any]]:
    """Param groups whose "params" are lists of (name, tensor) pairs. When the (uncompiled) model is
    given, bare tensors are named after its parameters, and pairs named as its torch.compile wrapper
    names them (e.g. ``param_groups_no_decay(compiled_model)``) get the original names."""
    items = list(params)
    if not items:
        raise ValueError("AdamMini got an empty parameter list")
    if all(isinstance(g, dict) for g in items):
        groups = [{**g, "params": list(g["params"])} for g in items]
    else:
        groups = [{"params": items}]
    if model is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for group in groups:
            group["params"] = [_model_named(item, names) for item in group["params"]]
    return groups


def _model_named(item: Any, names: dict[int, str]) -> Any:
    """``item`` (a tensor or a (name, tensor) pair) named after the model's parameter it is, if it is one."""
    if isinstance(item, torch.Tensor):
        return (names[id(item)], item) if id(item) in names else item
    if isinstance(item, tuple) and len(item) == 2 and id(item[1]) in names:
        original = names[id(item[1])]
        if item[0] == _COMPILED_PREFIX + original:
            return original, item[1]
    return item


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (its parameters are the same tensors), else ``module``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return module._orig_mod if isinstance(module, OptimizedModule) else module


def _named_shapes(groups: list[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for group in groups:
        for item in group["params"]:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError(
                    f"AdamMini needs named parameters (names tie tensors to partition rules), got "
                    f"{type(item).__name__}: pass the model, model.named_parameters(), groups of (name, tensor) pairs, "
                    "or bare tensors together with model=the module they belong to. In the Hugging Face Trainer "
                    "(which passes bare tensors, and takes a 'model' key of optimizer_cls_and_kwargs "
                    "as the parameters, "
                    "dropping TrainingArguments.weight_decay) use optim.hf.adam_mini_from_training_args(model, args) "
                    "or optimizer_cls_and_kwargs=optim.hf.trainer_optimizer_cls_and_kwargs(model, args)"
                )
            name, tensor = item
            if name in shapes:
                raise ValueError(f"parameter name '{name}' appears twice: names must identify parameters uniquely")
            if name.startswith(_COMPILED_PREFIX):
                raise ValueError(
                    f"parameter name '{name}' is a torch.compile wrapper's name: partition files and checkpoints use "
                    "the original module's names; pass the compiled module itself (AdamMini(compiled_model)), or "
                    "model=compiled_model with bare tensors, or the original module's named_parameters()"
                )
            shapes[name] = tuple(tensor.shape)
    return shapes


def _resolve_partition(
    partition: PartitionArg, shapes: dict[str, tuple[int, ...]], model: nn.Module | None, n_heads: int | None
) -> tuple[Partition | None, dict[str, Rule], dict[str, tuple[int, ...]]]:
    """The partition checked against the optimizer's parameters (None for the default, which fits by
    construction and is resolved into blocks only on demand), the rules by parameter name, and the
    shapes they were made for (which can cover more parameters, for groups added later)."""
    if isinstance(partition, (str, Path)) and str(partition) == "default":
        if model is None:
            raise ValueError(
                "partition='default' derives blocks from module types and needs the model: pass the model "
                "itself, or model=..., or a Partition / partition file"
            )
        rules = default_rules(model, n_heads)
        unknown = [name for name in shapes if name not in rules]
        if unknown:
            raise ValueError(f"parameter(s) {unknown} are not parameters of the given model: the default partition "
                             "has no rule for them")
        return None, rules, {name: tuple(p.shape) for name, p in model.named_parameters()}
    if n_heads is not None:
        raise ValueError("n_heads only applies to partition='default'; a given partition already fixes the heads")
    if isinstance(partition, (str, Path)):
        source = f"partition file '{partition}'"
        partition = Partition.load(partition)
    elif isinstance(partition, Partition):
        source = "partition"
    else:
        raise TypeError("partition must be a Partition, a partition file path or 'default', got "
                        f"{type(partition).__name__}")
    for name, shape in partition.param_shapes.items():
        if name in shapes and shapes[name] != shape:
            raise ValueError(
                f"{source}: parameter '{name}' has shape {list(shape)} in the partition but {list(shapes[name])} "
                "in the optimizer; the partition was made for another model size: derive it again for this model"
            )
    if partition.param_shapes.keys() != shapes.keys():  # else the partition, checked when built, fits as it is
        try:
            partition = Partition(list(partition.rules), shapes, partition.model_class)
        except ValueError as err:
            raise ValueError(f"{source} does not fit the optimizer's parameters: {err}") from None
    return partition, {rule.param: rule for rule in partition.rules}, dict(partition.param_shapes)
