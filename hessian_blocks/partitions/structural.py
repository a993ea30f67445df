"""The structural default partition for Adam-mini: blocks from module *types* and the model's own
forward pass, never from names.

Rules, following the Adam-mini paper's partition (v1.1):

- ``nn.Embedding`` / ``nn.EmbeddingBag`` weight: one block per token (row);
- ``nn.Linear`` weight: one block per output neuron (row); ``nn.Conv1d/2d/3d``: one per output
  channel; HF ``Conv1D`` (weight stored ``[in, out]``): one per output neuron (column); any other
  2-D parameter the traced forward uses as a linear map (a mixture-of-experts router, a raw weight):
  one per output neuron;
- query and key projections: one block per head (key heads counted by the key/value heads, so
  grouped- and multi-query attention get fewer, shared key blocks); the value rows of fused
  projections one per output neuron. Where the heads are is read from one forward pass traced on
  the meta device (:mod:`.trace`): which output rows of which weight reach the attention-score
  product in which head, through whatever views, splits, fused or interleaved packings the model
  uses. Fused layouts become run-length groups;
- norm layers (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch/instance norms, the bundled models'
  ``LayerNorm`` and the RMS norms of the Hugging Face architectures below): the scale is one block;
- biases of all the above, and parameters the trace sees added to a projection's output: one block
  per element (plain Adam, as the reference implementation);
- any other parameter: one block for the whole tensor (the PyTorch default). A 3-D expert tensor
  (mixture-of-experts) falls here for now: its rule would come from :func:`_structural_spec`.

An :class:`AttentionLayout` registered for an attention module type (:func:`register_attention`)
overrides the trace for that type: it says which child holds which projection and which attributes
hold the head counts. Built in: the bundled ``SelfAttention``, ``nn.MultiheadAttention`` and T5's
attention (its relative position bias table, one block per head, is not a projection the trace
follows). A module that looks like attention (a head-count attribute and two or more projections)
whose heads neither the trace nor a layout placed keeps one block per output row, with one warning
per type saying why and how to register it; so does what the trace saw but could not follow.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from hessian_blocks.blocks import Partition, Rule

from .layouts import (
    AttentionLayout,
    RuleSpec,
    attention_specs,
    head_runs,
    hf_conv1d_type,
    layout_of,
    loaded_types,
    output_axis,
    read_count,
    register_attention,
    registered_layouts,
)
from .trace import AttentionTrace, TracedProjection, trace_attention

__all__ = ["NORM_TYPES", "AttentionLayout", "default_partition", "default_rules", "is_norm", "register_attention"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm and InstanceNorm* share this base
)
# Norm classes that are not subclasses of torch's, by import path: resolved only when their module is
# loaded (nothing is imported from here): the bundled models' and those of Hugging Face architectures.
LOADED_NORM_TYPES: tuple[str, ...] = (
    "hessian_blocks.models.gpt.LayerNorm",
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm",  # scales by (1 + weight): still one block
    "transformers.models.phi3.modeling_phi3.Phi3RMSNorm",
    "transformers.models.t5.modeling_t5.T5LayerNorm",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm",  # also Qwen3's per-head q_norm / k_norm
    "transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm",
    "transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm",
    "transformers.models.olmo.modeling_olmo.OlmoLayerNorm",  # no parameters
    "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm",
    "transformers.models.cohere.modeling_cohere.CohereLayerNorm",
    "transformers.models.granite.modeling_granite.GraniteRMSNorm",
)
# Attributes that tell a module knows about heads (only used to warn about unregistered attention).
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "head_dim",
                   "head_size")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (by type)."""
    return isinstance(module, NORM_TYPES + loaded_types(LOADED_NORM_TYPES))


def default_rules(model: nn.Module, n_heads: int | None = None, inputs: object = None) -> dict[str, Rule]:
    """One structural rule per parameter of ``model`` (trainable or not), keyed by parameter name.

    Names only label the rules; every decision comes from module types, shapes and one forward pass
    traced on the meta device (:func:`~hessian_blocks.partitions.trace.trace_attention`; ``inputs``:
    an example batch for it, only its shapes are used; by default one is made up). ``n_heads``
    replaces the query head count of every attention (key heads follow from the key width).
    """
    if n_heads is not None and (isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1):
        raise ValueError(f"n_heads must be a positive integer, got {n_heads!r}")
    specs: dict[int, RuleSpec] = {}
    owners: dict[int, str] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), type(module).__name__)
            spec = _structural_spec(module, param)
            if spec is not None:
                specs.setdefault(id(param), spec)  # a tied parameter: the first owner whose type has a rule
    params = dict(model.named_parameters())
    traced = trace_attention(model, inputs)
    for name in traced.biases:
        specs.setdefault(id(params[name]), {"split": "elements", "why": "added to a projection's output (traced): "
                                                                         "a bias, plain Adam"})
    for name, axis in traced.linear_maps.items():
        specs.setdefault(id(params[name]), {"split": "groups", "axis": axis, "size": 1,
                                            "why": "a linear map in the traced forward: one block per output neuron"})
    for name, projection in traced.projections.items():
        specs[id(params[name])] = _traced_spec(projection, n_heads)
    layouts = registered_layouts()
    unplaced: dict[type, list[str]] = {}
    for path, module in model.named_modules():
        layout = layout_of(module, layouts)
        if layout is not None:
            where = f"'{path}' ({type(module).__name__})" if path else f"{type(module).__name__} (the model itself)"
            for param, spec in attention_specs(where, module, layout, n_heads):
                specs[id(param)] = spec
        elif _looks_like_attention(module) and not _placed_by_trace(module, path, traced):
            unplaced.setdefault(type(module), []).append(path)
    for module_type, paths in unplaced.items():
        _warn_unplaced(module_type, paths, traced.failure)
    _warn_problems(model, traced)
    rules = {}
    for name, param in params.items():
        fallback = {"split": "whole", "why": f"parameter of {owners[id(param)]}: no structural rule, one block"}
        rules[name] = Rule(name, **specs.get(id(param), fallback))
    return rules


def default_partition(model: nn.Module, n_heads: int | None = None, inputs: object = None) -> Partition:
    """The structural default :class:`Partition` of ``model``'s trainable parameters (see :func:`default_rules`)."""
    rules = default_rules(model, n_heads, inputs)
    return Partition.from_rules(model, [rules[name] for name, p in model.named_parameters() if p.requires_grad])


# ----------------------------------------------------------------------------- structural rules


def _structural_spec(module: nn.Module, param: torch.Tensor) -> RuleSpec | None:
    """The rule of a parameter owned directly by ``module``; None where its type says nothing."""
    kind = type(module).__name__
    if any(param is bias for bias in _biases(module)):
        return {"split": "elements", "why": f"bias of {kind}: plain Adam"}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return {"split": "groups", "axis": 0, "size": 1, "why": f"{kind}: one block per token"}
    if isinstance(module, nn.Linear):
        return {"split": "groups", "axis": 0, "size": 1, "why": f"{kind}: one block per output neuron"}
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return {"split": "groups", "axis": 0, "size": 1, "why": f"{kind}: one block per output channel"}
    conv1d = hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return {"split": "groups", "axis": 1, "size": 1, "why": f"{kind} ([in, out]): one block per output neuron"}
    if is_norm(module):
        return {"split": "whole", "why": f"scale of {kind}"}
    return None


def _biases(module: nn.Module) -> list[torch.Tensor]:
    """The bias parameters of the module types this file knows (none for any other type)."""
    if isinstance(module, nn.MultiheadAttention):
        return [b for b in (module.in_proj_bias, module.bias_k, module.bias_v) if b is not None]
    conv1d = hf_conv1d_type()
    known = ((nn.Linear, nn.modules.conv._ConvNd, *NORM_TYPES, *loaded_types(LOADED_NORM_TYPES))
             + ((conv1d,) if conv1d else ()))
    if isinstance(module, known) and isinstance(getattr(module, "bias", None), torch.Tensor):
        return [module.bias]
    return []


# ----------------------------------------------------------------------------- attention heads


# ----------------------------------------------------------------------------- traced heads


def _traced_spec(projection: TracedProjection, n_heads: int | None) -> RuleSpec:
    """The rule of a weight whose output rows the traced forward placed in heads."""
    attention = projection.attention
    where = f"traced attention '{attention.module}'" if attention.module else "traced attention (the model itself)"
    group = None
    if n_heads is not None and attention.query_features:  # (no query rows traced: the key widths stay)
        if attention.query_features % n_heads:
            raise ValueError(f"{where}: {attention.query_features} projection features do not split into {n_heads} "
                             "heads; pass the right n_heads")
        group = attention.query_features // n_heads
    spans = [(s.role, s.stop - s.start, group or s.head) for s in projection.spans]
    runs = head_runs(where, spans)
    split = {"size": runs[0][0]} if len(runs) == 1 else {"runs": tuple(runs)}
    roles = [s.role or "other" for s in projection.spans]
    if not {"q", "k"} & set(roles):
        return {"split": "groups", "axis": projection.axis, "size": 1,
                "why": f"{where} value: one block per output neuron"}
    widths = sorted({width for role, _, width in spans if role in ("q", "k")})
    why = (f"{where} {_packing(roles)}: one block per head of {'/'.join(map(str, widths))} "
           f"({f'{attention.heads} query' if attention.heads else 'query heads not traced'}, "
           f"{attention.kv_heads} key/value heads)"
           + (", one per row of v" if "v" in roles else "") + (", one per other row" if "other" in roles else ""))
    return {"split": "groups", "axis": projection.axis, **split, "why": why}


def _packing(roles: list[str]) -> str:
    """Roles in storage order, a repeated unit written once: ``q|k|v``, ``(q|k|v) x 4``."""
    for unit in range(1, len(roles) // 2 + 1):
        if len(roles) % unit == 0 and roles == roles[:unit] * (len(roles) // unit):
            return f"({'|'.join(roles[:unit])}) x {len(roles) // unit}" if unit > 1 else \
                f"{roles[0]} x {len(roles)}"
    return "|".join(roles)


def _placed_by_trace(module: nn.Module, path: str, traced: AttentionTrace) -> bool:
    """Whether the trace placed query/key heads on a weight inside ``module``."""
    names = (f"{path}.{name}" if path else name for name, _ in module.named_parameters())
    return any(name in traced.projections and {"q", "k"} & {s.role for s in traced.projections[name].spans}
               for name in names)


def _looks_like_attention(module: nn.Module) -> bool:
    """An unregistered module that knows a head count and owns two or more projections."""
    knows_heads = any(read_count(module, attribute) for attribute in HEAD_ATTRIBUTES)
    projections = 0
    for child in module.children():
        try:
            output_axis(child)
        except ValueError:
            continue
        projections += not isinstance(child, nn.Embedding)
    projections += sum(p.ndim == 2 for p in module.parameters(recurse=False))
    return knows_heads and projections >= 2


def _where(paths: list[str]) -> str:
    return ((f"'{paths[0]}'" if paths[0] else "the model itself")
            + (f" and {len(paths) - 1} more" if len(paths) > 1 else ""))


_REGISTER_HINT = ("AttentionLayout({'<query attribute>': 'q', '<key attribute>': 'k', '<value attribute>': 'v'}, "
                  "heads='<head-count attribute>'))")


def _warn_unplaced(module_type: type, paths: list[str], failure: str | None) -> None:
    kind = module_type.__name__
    reason = (f"the model's forward could not be traced: {failure}" if failure
              else "the traced forward saw none of its projections reach a query-key product")
    warnings.warn(
        f"{_where(paths)} ({kind}) looks like attention (it has a head count and projections), but {reason}, and "
        f"no AttentionLayout is registered for {kind}: its query/key weights get one block per output row, not one "
        f"per head. Pass an example batch (default_partition(model, inputs=...)) or register it: "
        f"hessian_blocks.partitions.register_attention({kind}, {_REGISTER_HINT} "
        "(see docs/partition-default.md)",
        stacklevel=3,
    )


def _warn_problems(model: nn.Module, traced: AttentionTrace) -> None:
    """One warning per attention type and set of problems: what the trace saw but could not place."""
    found: dict[str, list[str]] = {}
    for path, what in traced.problems:
        found.setdefault(path, []).append(what.replace(f"'{path}.", "'") if path else what)
    grouped: dict[tuple[str, str], list[str]] = {}
    for path, whats in found.items():
        grouped.setdefault((type(model.get_submodule(path)).__name__, "; ".join(whats)), []).append(path)
    for (kind, what), paths in grouped.items():
        warnings.warn(
            f"{_where(paths)} ({kind}): the traced forward reached its attention but cannot place its heads: {what}. "
            "Its query/key weights keep their structural rule (one block per output row for nn.Linear), not one "
            f"block per head. Register its layout: hessian_blocks.partitions.register_attention({kind}, "
            f"{_REGISTER_HINT} (see docs/partition-default.md)",
            stacklevel=3,
        )
