"""The structural default partition for Adam-mini: blocks from module *types* and the model's own
forward pass, never from names.

Rules, following the Adam-mini paper's partition (v1.1):

- ``nn.Embedding`` / ``nn.EmbeddingBag`` weight: one block per token (row);
- ``nn.Linear`` weight: one block per output neuron (row); ``nn.Conv1d/2d/3d``: one per output
  channel; HF ``Conv1D`` (weight stored ``[in, out]``): one per output neuron (column); any other
  2-D parameter the traced forward uses as a linear map (a mixture-of-experts router, a raw weight):
  one per output neuron;
- a tensor of experts (``[experts, out, in]``, 3-D or more, used by the traced forward as one matrix
  per expert: picked, batched or grouped): one block per (expert, output row), a group along the
  merged axes it does not contract (``"axis": [0, 1]``); where those axes are not neighbours
  (``[experts, in, out]``: the contracted axis between them, which the partition format cannot
  merge) one block per expert, with a warning;
- query and key projections: one block per head (key heads counted by the key/value heads, so
  grouped- and multi-query attention get fewer, shared key blocks); the value rows of fused
  projections one per output neuron. Where the heads are is read from one forward pass traced on
  the meta device (:mod:`.trace`): which output rows of which weight reach the attention-score
  product in which head, through whatever views, splits, fused or interleaved packings the model
  uses. Fused layouts become run-length groups;
- norm layers: the scale is one block, the bias one block per element. Found by type (``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, batch/instance norms, the bundled models' ``LayerNorm`` and the RMS norms
  of the Hugging Face architectures below) and, for any other family, by structure in the traced
  forward (:mod:`.norms`: a parameter multiplying activations divided by their root mean square or
  standard deviation, or passed to a fused normalisation);
- biases of all the above, and parameters the trace sees added to a projection's output (an expert's
  bias picked by the routing too): one block per element (plain Adam, as the reference implementation);
- any other parameter: one block for the whole tensor (the PyTorch default); one of three or more axes
  that the traced forward multiplies in a way it cannot read warns (it keeps one block).

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

__all__ = ["NORM_TYPES", "AttentionLayout", "default_partition", "default_rules", "is_norm", "no_decay_parameters",
           "register_attention"]

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
# Attributes that tell a module knows an expert count (only used to warn about experts an untraced forward hides).
EXPERT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Attributes that tell a module knows about heads (only used to warn about unregistered attention).
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "head_dim",
                   "head_size")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer by type (:func:`no_decay_parameters` also reads the forward)."""
    return isinstance(module, NORM_TYPES + loaded_types(LOADED_NORM_TYPES))


def no_decay_parameters(model: nn.Module, inputs: object = None) -> set[str]:
    """Names of ``model``'s parameters that get no weight decay in the papers: those of normalisation layers
    (by type, :func:`is_norm`, and by structure in the traced forward: scales and biases of normalised
    activations, whatever their class) and biases added to a projection's output (traced: a 2-D bias of
    one row per expert too). Parameters with fewer than two axes are the caller's to add."""
    traced = trace_attention(model, inputs)
    by_type = {id(p) for module in model.modules() if is_norm(module) for p in module.parameters(recurse=False)}
    return ({name for name, p in model.named_parameters() if id(p) in by_type}
            | traced.norms | traced.norm_biases | traced.biases)


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
    for name in traced.norms:
        specs.setdefault(id(params[name]), {"split": "whole", "why": "scale of a normalisation (traced: multiplies "
                                                                      "normalised activations), one block"})
    for name in traced.norm_biases:
        specs.setdefault(id(params[name]), {"split": "elements", "why": "bias of a normalisation (traced): plain Adam"})
    for name in traced.biases:
        specs.setdefault(id(params[name]), {"split": "elements", "why": "added to a projection's output (traced): "
                                                                         "a bias, plain Adam"})
    for name, axes in traced.linear_maps.items():
        specs.setdefault(id(params[name]), _linear_spec(axes, tuple(params[name].shape)))
    for name, projection in traced.projections.items():
        specs[id(params[name])] = _traced_spec(projection, n_heads)
    layouts = registered_layouts()
    unplaced: dict[tuple[type, bool], list[str]] = {}
    for path, module in model.named_modules():
        layout = layout_of(module, layouts)
        if layout is not None:
            where = f"'{path}' ({type(module).__name__})" if path else f"{type(module).__name__} (the model itself)"
            for param, spec in attention_specs(where, module, layout, n_heads):
                specs[id(param)] = spec
        elif _looks_like_attention(module) and not _placed_by_trace(module, path, traced):
            unplaced.setdefault((type(module), _used_by_trace(module, path, traced)), []).append(path)
    for (module_type, used), paths in unplaced.items():
        _warn_unplaced(module_type, paths, traced.failure, used)
    _warn_problems(model, traced)
    _warn_experts(model, traced, specs)
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


# ----------------------------------------------------------------------------- traced linear maps


def _linear_spec(kept: int | tuple[int, ...], shape: tuple[int, ...]) -> RuleSpec:
    """The rule of a weight the traced forward uses as a linear map, from the axes it does not contract:
    one block per output neuron (a 2-D weight), per (expert, output row) (a tensor of experts)."""
    if isinstance(kept, int):
        return {"split": "groups", "axis": kept, "size": 1,
                "why": "a linear map in the traced forward: one block per output neuron"}
    contracted = [a for a in range(len(shape)) if a not in kept]
    if all(b == a + 1 for a, b in zip(kept, kept[1:])):
        return {"split": "groups", "axis": kept if len(kept) > 1 else kept[0], "size": 1,
                "why": f"experts in one tensor (traced: one matrix per expert, contracted along axis "
                       f"{'/'.join(map(str, contracted))}): one block per (expert, output row)"}
    return {"split": "groups", "axis": kept[0], "size": 1,
            "why": f"experts in one tensor (traced: contracted along axis {'/'.join(map(str, contracted))}, between "
                   f"the axes {list(kept)} it keeps, which the partition format cannot merge): one block per expert"}


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


def _warn_experts(model: nn.Module, traced: AttentionTrace, specs: dict[int, RuleSpec]) -> None:
    """One warning for the tensors of three or more axes whose products the trace could not read, one for
    those whose experts' output rows are not a run of neighbouring axes (one block per expert), and, when
    the forward could not be traced, one for those of a module that knows an expert count."""
    unread, apart, untraced = [], [], []
    for path, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            name = f"{path}.{local}" if path else local
            if param.ndim < 3 or id(param) in specs and name not in traced.linear_maps:
                continue
            where = f"'{name}' {list(param.shape)} ({type(module).__name__})"
            kept = traced.linear_maps.get(name)
            if name in traced.unplaced:
                unread.append(f"{where} {traced.unplaced[name].replace(repr(name) + ' ', '')}")
            elif isinstance(kept, tuple) and any(b != a + 1 for a, b in zip(kept, kept[1:])):
                apart.append(f"{where}: its products keep axes {list(kept)}")
            elif traced.failure and any(read_count(module, a) in param.shape for a in EXPERT_ATTRIBUTES):
                untraced.append(where)
    fix = ("write its rule in a partition file (docs/partition-format.md), e.g. {\"split\": \"groups\", "
           "\"axis\": [0, 1], \"size\": 1} for [experts, out, in]")
    if unread:
        warnings.warn(f"the traced forward cannot tell the output axis of {'; '.join(unread)}: one block for the "
                      f"whole tensor, not one per (expert, output row); {fix}", stacklevel=3)
    if apart:
        warnings.warn(f"experts stored with their contracted axis between the axes of (expert, output row): "
                      f"{'; '.join(apart)}. The partition format merges neighbouring axes only, so each gets one "
                      "block per expert (per index of its first kept axis), not one per (expert, output row); for "
                      "the paper's blocks store the experts [experts, out, in], or write 'elements' (plain Adam) "
                      "for them in a partition file", stacklevel=3)
    if untraced:
        warnings.warn(f"the model's forward could not be traced ({traced.failure}): the experts {', '.join(untraced)} "
                      f"keep one block for the whole tensor; pass an example batch (default_partition(model, "
                      f"inputs=...)) or {fix}", stacklevel=3)


def _placed_by_trace(module: nn.Module, path: str, traced: AttentionTrace) -> bool:
    """Whether the trace placed query/key heads on a weight inside ``module``."""
    names = (f"{path}.{name}" if path else name for name, _ in module.named_parameters())
    return any(name in traced.projections and {"q", "k"} & {s.role for s in traced.projections[name].spans}
               for name in names)


def _used_by_trace(module: nn.Module, path: str, traced: AttentionTrace) -> bool:
    """Whether the traced forward used any weight inside ``module`` as a linear map."""
    return any((f"{path}.{name}" if path else name) in traced.linear_maps for name, _ in module.named_parameters())


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


def _warn_unplaced(module_type: type, paths: list[str], failure: str | None, used: bool) -> None:
    kind = module_type.__name__
    if failure:
        reason = f"the model's forward could not be traced: {failure}"
    elif used:
        reason = ("the traced forward saw none of its projections reach a query-key product (a kernel the trace "
                  "does not follow, or no attention: a state-space mixer's warning can be ignored)")
    else:
        reason = ("the traced forward did not use its weights (a branch the example batch did not take, such as "
                  "a decoder's cross-attention run without encoder states; its weights get no gradient from "
                  "such batches)")
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
