"""Adam-mini: Adam with one second-moment scalar per block of a partition (update rule: optim/update.py).

The blocks come from a :class:`~hessian_blocks.blocks.Partition` (an object, a partition file, or
``"default"``: the structural default of :mod:`hessian_blocks.partitions.structural`). A rule of "elements" gives
plain AdamW for that tensor.

Three implementations, chosen like torch's AdamW: a plain per-parameter loop (``foreach=False``),
a ``foreach`` path that batches the elementwise work over all tensors (the default off CUDA), and a
fused CUDA path (``fused=True``, the default when every parameter is on CUDA and Triton is present)
that compiles the whole update with ``torch.compile``; without CUDA or Triton ``fused=True`` falls
back to ``foreach`` with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Union

import torch
import torch.nn as nn

from hessian_blocks.blocks import Partition, Rule

from . import _fused
from hessian_blocks.partitions.structural import default_rules
from .distributed import ShardedBlockLayout, block_layout, local_tensor, reduce_block_mean_squares
from .layout import BlockLayout
from .update import Batch, StepScalars, foreach_update, reference_update

Params = Union[nn.Module, Iterable[tuple[str, torch.Tensor]], Iterable[dict]]
PartitionArg = Union[Partition, str, Path]

STATE_KEYS = ("step", "exp_avg", "block_exp_avg_sq")
_COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts before its module's parameter names
_ONE = torch.tensor(1.0)


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
        state_dtype: dtype of the first moment (default: the parameter's). Second moments are float32
            (float64 for float64 parameters) whatever the parameter dtype.
        foreach, fused: implementation flags, as in ``torch.optim.AdamW``.

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
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True: pick one implementation")
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
        self._state_dtype = state_dtype
        self._warned_fallback = False
        self._fused_steps: dict[tuple, _fused.FusedStep] = {}
        self._fused_failed = False
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
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
        pairs = list(param_group.get("params", []))
        if not all(isinstance(item, tuple) and len(item) == 2 for item in pairs):
            raise TypeError("AdamMini needs named parameters: pass (name, tensor) pairs, e.g. model.named_parameters()")
        layouts, rules = {}, []
        for name, param in pairs:
            rule = self._rules.get(name)
            if rule is None:
                raise ValueError(f"the partition has no rule for parameter '{name}': every parameter needs exactly one rule")
            if tuple(param.shape) != self._rule_shapes[name]:
                raise ValueError(
                    f"parameter '{name}' has shape {list(param.shape)} but the partition's rule was made for "
                    f"{list(self._rule_shapes[name])}: derive the partition again for this model"
                )
            _check_param(name, param)
            layouts[param] = block_layout(rule, param, name)
            rules.append(_rule_key(rule))
        super().add_param_group({**param_group, "params": pairs, "block_rules": rules})
        try:
            _check_hyperparameters(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        self._layouts.update(layouts)

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam-mini step over every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches: dict[str, list[Batch]] = {"reference": [], "foreach": [], "fused": []}
        for group in self.param_groups:
            batch = self._gather(group)
            if batch.params:
                kind = self._implementation(group, batch.params)
                sharded = any(isinstance(layout, ShardedBlockLayout) for layout in batch.layouts)
                batches["foreach" if sharded and kind == "fused" else kind].append(batch)
        reduce_block_mean_squares(batch for kind in batches.values() for batch in kind)
        for batch in batches["reference"]:
            reference_update(batch)
        for batch in batches["foreach"]:
            foreach_update(batch)
        if batches["fused"]:
            self._fused_update(batches["fused"])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; state tensors keep AdamMini's dtypes (torch would cast them to the
        parameter dtype) and must match this optimizer's partition. Nothing changes on an error."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            super().load_state_dict(state_dict)  # raises torch's error for a state dict of other groups
        self._check_saved_rules(saved_groups)
        restored = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for pid, param, name in zip(saved["params"], group["params"], group["param_names"]):
                if pid in state_dict["state"]:
                    restored[param] = self._restored_state(name, param, state_dict["state"][pid])
        super().load_state_dict(state_dict)
        for param, state in restored.items():
            self.state[param] = state

    # -- internals -------------------------------------------------------------------------------

    def _gather(self, group: dict[str, Any]) -> Batch:
        """The group's parameters that have gradients, their state (created on first use) and scalars."""
        batch = Batch()
        for name, param in zip(group["param_names"], group["params"]):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"AdamMini does not support sparse gradients (parameter '{name}'): use a dense embedding")
            state = self.state[param]
            if not state:
                _check_param(name, param)
                state.update(self._initial_state(param))
            if grad.dtype != state["exp_avg"].dtype or not grad.is_contiguous():
                grad = grad.to(dtype=state["exp_avg"].dtype, memory_format=torch.contiguous_format)
            local_state = {**state, "exp_avg": local_tensor(state["exp_avg"])}
            batch.add(local_tensor(param), local_tensor(grad), local_state, self._layouts[param])
        if batch.steps:
            torch._foreach_add_(batch.steps, _ONE, alpha=1.0)  # a tensor 1, wrapped once (torch's AdamW trick)
            by_step: dict[float, StepScalars] = {}
            for t in torch.stack(batch.steps).tolist():
                if t not in by_step:
                    by_step[t] = _step_scalars(group, t)
                batch.scalars.append(by_step[t])
        return batch

    def _initial_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": torch.zeros_like(param, dtype=self._exp_avg_dtype(param), memory_format=torch.contiguous_format),
            "block_exp_avg_sq": torch.zeros(self._layouts[param].n_blocks, dtype=_block_dtype(param), device=param.device),
        }

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
        restored = dict(saved)
        restored["step"] = saved["step"].to(dtype=torch.float32, device="cpu", copy=True)
        restored["exp_avg"] = saved["exp_avg"].to(dtype=self._exp_avg_dtype(param), device=param.device, copy=True)
        restored["block_exp_avg_sq"] = saved["block_exp_avg_sq"].to(dtype=_block_dtype(param), device=param.device, copy=True)
        return restored

    def _check_saved_rules(self, saved_groups: list[dict[str, Any]]) -> None:
        for saved, group in zip(saved_groups, self.param_groups):
            for name, ours, theirs in zip(group["param_names"], group["block_rules"], saved.get("block_rules", [])):
                if ours != theirs:
                    raise ValueError(
                        f"the checkpoint was saved with rule {theirs} for parameter '{name}' but this optimizer "
                        f"uses {ours}: build the optimizer with the checkpoint's partition"
                    )

    def _implementation(self, group: dict[str, Any], params: list[torch.Tensor]) -> str:
        foreach, fused = group["foreach"], group["fused"]
        if fused is None and foreach is None:
            return "fused" if not self._fused_failed and _fused.available(params) else "foreach"
        if fused:
            if self._fused_failed:  # warned when compiling failed
                return "foreach"
            if _fused.available(params):
                return "fused"
            if not self._warned_fallback:
                warnings.warn(f"AdamMini(fused=True): {_fused.unavailable_reason(params)}; using the foreach path", stacklevel=3)
                self._warned_fallback = True
            return "foreach"
        return "foreach" if foreach or foreach is None else "reference"

    def _fused_update(self, group_batches: list[Batch]) -> None:
        """All groups' fused parameters in one compiled call (foreach, per group, if compiling fails)."""
        batch = Batch.concatenate(group_batches)
        key = tuple(map(id, batch.params))  # the parameters fix the layouts
        if key not in self._fused_steps:
            self._fused_steps[key] = _fused.FusedStep(batch.layouts)
        fused_step = self._fused_steps[key]
        coefficients = torch.tensor([s.as_row() for s in batch.scalars], dtype=torch.float64)
        try:
            fused_step(batch.params, batch.grads, batch.exp_avgs, batch.block_avgs, coefficients)
        except torch._dynamo.exc.TorchDynamoException as err:
            if fused_step.ran:  # compiled and ran before: not a compilation problem
                raise
            # compilation fails before any kernel runs: nothing was updated yet
            warnings.warn(
                f"AdamMini(fused): compiling the update failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "using the foreach path from now on",
                stacklevel=3,
            )
            self._fused_failed = True
            for group_batch in group_batches:
                foreach_update(group_batch)


def _step_scalars(group: dict[str, Any], t: float) -> StepScalars:
    beta1, beta2 = group["betas"]
    return StepScalars(
        decay=1.0 - group["lr"] * group["weight_decay"],
        beta1=beta1,
        beta2=beta2,
        inv_bias_correction2=1.0 / (1.0 - beta2**t),
        step_size=group["lr"] / (1.0 - beta1**t),
        eps=group["eps"],
    )


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


def _check_param(name: str, param: torch.Tensor) -> None:
    if not param.is_floating_point():
        raise TypeError(f"parameter '{name}' has dtype {param.dtype}: AdamMini updates real floating-point tensors only")
    if not param.is_contiguous():
        raise ValueError(f"parameter '{name}' is not contiguous (channels_last?): AdamMini needs contiguous parameters")


def _named_groups(params: Iterable, model: nn.Module | None) -> list[dict[str, Any]]:
    """Param groups whose "params" are lists of (name, tensor) pairs. When the (uncompiled) model is
    given, bare tensors are named after its parameters, and pairs named as its torch.compile wrapper
    names them (e.g. ``param_groups_no_decay(compiled_model)``) get the original names."""
    items = list(params)
    if not items:
        raise ValueError("AdamMini got an empty parameter list")
    groups = [{**g, "params": list(g["params"])} for g in items] if all(isinstance(g, dict) for g in items) else [{"params": items}]
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
                    "(which passes bare tensors, and takes a 'model' key of optimizer_cls_and_kwargs as the parameters, "
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
            raise ValueError(f"parameter(s) {unknown} are not parameters of the given model: the default partition has no rule for them")
        return None, rules, {name: tuple(p.shape) for name, p in model.named_parameters()}
    if n_heads is not None:
        raise ValueError("n_heads only applies to partition='default'; a given partition already fixes the heads")
    if isinstance(partition, (str, Path)):
        source = f"partition file '{partition}'"
        partition = Partition.load(partition)
    elif isinstance(partition, Partition):
        source = "partition"
    else:
        raise TypeError(f"partition must be a Partition, a partition file path or 'default', got {type(partition).__name__}")
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
