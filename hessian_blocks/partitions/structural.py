"""The structural default partition for Adam-mini: blocks from module *types*, never from names.

Rules, following the Adam-mini paper's partition (v1.1) as far as module types can tell:

- ``nn.Embedding`` / ``nn.EmbeddingBag`` weight: one block per token (row);
- ``nn.Linear`` weight: one block per output neuron (row); ``nn.Conv1d/2d/3d``: one per output
  channel; HF ``Conv1D`` (weight stored ``[in, out]``): one per output neuron (column);
- query and key projections of a known multi-head attention module: one block per head (rows of
  ``head_dim``; for fused ``q|k|v`` weights, run-length groups: heads for q and k, rows for v);
- norm layers (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch/instance norms and the bundled
  models' ``LayerNorm``): the scale is one block;
- biases of all the above: one block per element (plain Adam, as the reference implementation);
- any other parameter: one block for the whole tensor (the PyTorch default).

Known attention types: the bundled models' ``SelfAttention`` (head count ``n_head``),
``nn.MultiheadAttention`` (``num_heads``) and, when transformers is already imported, HF
``GPT2Attention``. Others can be added with :func:`register_attention`. The head count comes from the
module, or from ``n_heads`` where given (then it applies to every attention module).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn as nn

from hessian_blocks.blocks import Partition, Rule
from hessian_blocks.models.gpt import LayerNorm as BundledLayerNorm
from hessian_blocks.models.gpt import SelfAttention as BundledSelfAttention

__all__ = ["NORM_TYPES", "default_partition", "default_rules", "is_norm", "register_attention"]

# What a rule does, without the parameter's name: keyword arguments of Rule (split, axis, size, runs, why).
RuleSpec = dict
# An attention handler: (module, user head count or None) -> [(parameter, rule spec)] for the
# parameters whose blocks follow heads; every other parameter keeps its structural rule.
AttentionHandler = Callable[[nn.Module, "int | None"], list[tuple[torch.Tensor, RuleSpec]]]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm and InstanceNorm* share this base
    BundledLayerNorm,
)

_ATTENTION: dict[type[nn.Module], AttentionHandler] = {}


def register_attention(module_type: type[nn.Module], handler: AttentionHandler) -> None:
    """Teach the default partition where the heads of ``module_type`` attention modules are.

    ``handler(module, n_heads)`` returns (parameter, rule spec) pairs for the query/key weights,
    e.g. ``[(module.wq.weight, {"split": "groups", "axis": 0, "size": head_dim})]``.
    """
    _ATTENTION[module_type] = handler


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (by type)."""
    return isinstance(module, NORM_TYPES)


def default_rules(model: nn.Module, n_heads: int | None = None) -> dict[str, Rule]:
    """One structural rule per parameter of ``model`` (trainable or not), keyed by parameter name.

    Names only label the rules; every decision comes from module types and tensor shapes.
    """
    if n_heads is not None and n_heads < 1:
        raise ValueError(f"n_heads must be a positive integer, got {n_heads}")
    specs: dict[int, RuleSpec] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            specs[id(param)] = _structural_spec(module, param)
    handlers = _attention_handlers()
    for module in model.modules():
        handler = next((h for t, h in handlers.items() if isinstance(module, t)), None)
        if handler is not None:
            for param, spec in handler(module, n_heads):
                specs[id(param)] = spec
    return {name: Rule(name, **specs[id(param)]) for name, param in model.named_parameters()}


def default_partition(model: nn.Module, n_heads: int | None = None) -> Partition:
    """The structural default :class:`Partition` of ``model``'s trainable parameters."""
    rules = default_rules(model, n_heads)
    return Partition.from_rules(model, [rules[name] for name, p in model.named_parameters() if p.requires_grad])


def _structural_spec(module: nn.Module, param: torch.Tensor) -> RuleSpec:
    kind = type(module).__name__
    if any(param is bias for bias in _biases(module)):
        return {"split": "elements", "why": f"bias of {kind}: plain Adam"}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return {"split": "groups", "axis": 0, "size": 1, "why": f"{kind}: one block per token"}
    if isinstance(module, nn.Linear):
        return {"split": "groups", "axis": 0, "size": 1, "why": f"{kind}: one block per output neuron"}
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return {"split": "groups", "axis": 0, "size": 1, "why": f"{kind}: one block per output channel"}
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return {"split": "groups", "axis": 1, "size": 1, "why": f"{kind} ([in, out]): one block per output neuron"}
    if is_norm(module):
        return {"split": "whole", "why": f"scale of {kind}"}
    return {"split": "whole", "why": f"parameter of {kind}: no structural rule, one block"}


def _biases(module: nn.Module) -> list[torch.Tensor]:
    """The bias parameters of the module types this file knows (none for any other type)."""
    if isinstance(module, nn.MultiheadAttention):
        return [b for b in (module.in_proj_bias, module.bias_k, module.bias_v) if b is not None]
    conv1d = _hf_conv1d_type()
    known = (nn.Linear, nn.modules.conv._ConvNd, *NORM_TYPES) + ((conv1d,) if conv1d is not None else ())
    if isinstance(module, known) and isinstance(getattr(module, "bias", None), torch.Tensor):
        return [module.bias]
    return []


def _head_count(n_heads: int | None, own: int) -> int:
    return n_heads if n_heads is not None else own


def _heads_spec(kind: str, heads: int, head_dim: int, axis: int) -> RuleSpec:
    return {"split": "groups", "axis": axis, "size": head_dim, "why": f"{kind}: one block per head ({heads} heads)"}


def _head_dim(kind: str, features: int, heads: int) -> int:
    if features % heads:
        raise ValueError(f"{kind}: {features} projection features do not split into {heads} heads; pass the right "
                         "n_heads")
    return features // heads


def _bundled_attention(module: nn.Module, n_heads: int | None) -> list[tuple[torch.Tensor, RuleSpec]]:
    kind = type(module).__name__
    heads = _head_count(n_heads, module.n_head)
    head_dim = _head_dim(kind, module.q_proj.out_features, heads)
    return [(lin.weight, _heads_spec(kind, heads, head_dim, 0)) for lin in (module.q_proj, module.k_proj)]


def _torch_multihead_attention(module: nn.Module, n_heads: int | None) -> list[tuple[torch.Tensor, RuleSpec]]:
    kind = type(module).__name__
    heads = _head_count(n_heads, module.num_heads)
    head_dim = _head_dim(kind, module.embed_dim, heads)
    if module.in_proj_weight is not None:  # fused [q; k; v] rows
        runs = {"split": "groups", "axis": 0, "runs": ((head_dim, 2 * heads), (1, module.embed_dim)),
                "why": f"{kind} fused q|k|v: one block per head of q and k, one per row of v"}
        return [(module.in_proj_weight, runs)]
    value_rows = {"split": "groups", "axis": 0, "size": 1, "why": f"{kind} value: one block per output neuron"}
    heads_qk = [(w, _heads_spec(kind, heads, head_dim, 0)) for w in (module.q_proj_weight, module.k_proj_weight)]
    return heads_qk + [(module.v_proj_weight, value_rows)]


def _hf_gpt2_attention(module: nn.Module, n_heads: int | None) -> list[tuple[torch.Tensor, RuleSpec]]:
    kind = type(module).__name__
    heads = _head_count(n_heads, module.num_heads)
    head_dim = _head_dim(kind, module.embed_dim, heads)
    if getattr(module, "is_cross_attention", False):  # q alone, then fused [k | v] columns
        kv = {"split": "groups", "axis": 1, "runs": ((head_dim, heads), (1, module.embed_dim)),
              "why": f"{kind} fused k|v columns: one block per head of k, one per column of v"}
        return [(module.q_attn.weight, _heads_spec(kind, heads, head_dim, 1)), (module.c_attn.weight, kv)]
    qkv = {"split": "groups", "axis": 1, "runs": ((head_dim, 2 * heads), (1, module.embed_dim)),
           "why": f"{kind} fused q|k|v columns: one block per head of q and k, one per column of v"}
    return [(module.c_attn.weight, qkv)]


def _hf_conv1d_type() -> type | None:
    """transformers' Conv1D, only when transformers is already imported (never imported from here)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _attention_handlers() -> dict[type[nn.Module], AttentionHandler]:
    handlers: dict[type[nn.Module], AttentionHandler] = {
        BundledSelfAttention: _bundled_attention,
        nn.MultiheadAttention: _torch_multihead_attention,
    }
    gpt2 = sys.modules.get("transformers.models.gpt2.modeling_gpt2")
    if gpt2 is not None:
        handlers[gpt2.GPT2Attention] = _hf_gpt2_attention
    handlers.update(_ATTENTION)
    return handlers
