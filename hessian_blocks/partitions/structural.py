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

import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from hessian_blocks.blocks import Partition, Rule

from .trace import AttentionTrace, TracedProjection, trace_attention

__all__ = ["NORM_TYPES", "AttentionLayout", "default_partition", "default_rules", "is_norm", "register_attention"]

# What a rule does, without the parameter's name: keyword arguments of Rule (split, axis, size, runs, why).
RuleSpec = dict

ROLES = ("q", "k", "v")

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


@dataclass(frozen=True)
class AttentionLayout:
    """Where the query and key heads of one attention module type are stored.

    ``projections`` maps an attribute of the attention module (a child ``nn.Linear``, ``nn.Conv1d``,
    HF ``Conv1D``, or a 2-D ``nn.Parameter``) to what its output features hold, in order:

    - ``"q"``, ``"k"`` or ``"v"``: one projection;
    - parts joined by ``|``, e.g. ``"q|k|v"`` or ``"k|v"``: concatenated (q: ``heads * head_dim``
      outputs, k and v: ``kv_heads * head_dim`` each);
    - ``"[q,k,v]"``: interleaved per key/value head: for each key/value head, the query heads of its
      group, then its key head, then its value head (GPT-NeoX's per-head ``[q_h, k_h, v_h]``).

    ``heads``, ``kv_heads`` and ``head_dim`` are dotted attribute paths on the module (e.g.
    ``"num_heads"`` or ``"config.num_key_value_heads"``); ``kv_heads=None`` means as many as query
    heads, ``head_dim=None`` means the query-carrying projection's outputs divided evenly.
    ``head_columns`` names children whose weight has one column per query head (T5's relative
    position bias table ``[buckets, heads]``): one block per column.
    """

    projections: Mapping[str, str]
    heads: str
    kv_heads: str | None = None
    head_dim: str | None = None
    head_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "projections", dict(self.projections))
        object.__setattr__(self, "head_columns", tuple(self.head_columns))
        roles = [role for packing in self.projections.values() for role in _parse_packing(packing)[0]]
        for role in ("q", "k"):
            if roles.count(role) != 1:
                raise ValueError(
                    f"AttentionLayout {self.projections}: '{role}' must appear in exactly one projection, "
                    f"found {roles.count(role)}"
                )
        if roles.count("v") > 1:
            raise ValueError(f"AttentionLayout {self.projections}: 'v' appears in more than one projection")


# A layout, or a function choosing one for a module instance (e.g. self- vs cross-attention).
LayoutChoice = AttentionLayout | Callable[[nn.Module], AttentionLayout]

# The one registry: module type (or its import path, resolved once the module is loaded) -> layout.
_ATTENTION: dict[type[nn.Module] | str, LayoutChoice] = {}


def register_attention(module_type: type[nn.Module] | str, layout: LayoutChoice) -> None:
    """Teach the default partition where the heads of ``module_type`` attention modules are.

    ``module_type`` is a class or its import path (``"package.module.ClassName"``: used once that
    module is imported, never importing it); ``layout`` an :class:`AttentionLayout` or a function
    ``module -> AttentionLayout``. A later registration for the same type replaces an earlier one::

        register_attention(MyAttention, AttentionLayout({"wq": "q", "wk": "k", "wv": "v"}, heads="n_heads"))
    """
    if not (isinstance(module_type, str) or (isinstance(module_type, type) and issubclass(module_type, nn.Module))):
        raise TypeError(f"register_attention needs an nn.Module subclass or its import path, got {module_type!r}")
    if not (isinstance(layout, AttentionLayout) or callable(layout)):
        raise TypeError("register_attention needs an AttentionLayout or a function returning one, "
                        f"got {type(layout).__name__}")
    _ATTENTION.pop(module_type, None)  # re-registering moves the entry last, so it wins
    _ATTENTION[module_type] = layout


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (by type)."""
    return isinstance(module, NORM_TYPES + _loaded_types(LOADED_NORM_TYPES))


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
    layouts = _registered_layouts()
    unplaced: dict[type, list[str]] = {}
    for path, module in model.named_modules():
        layout = _layout_of(module, layouts)
        if layout is not None:
            where = f"'{path}' ({type(module).__name__})" if path else f"{type(module).__name__} (the model itself)"
            for param, spec in _attention_specs(where, module, layout, n_heads):
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
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return {"split": "groups", "axis": 1, "size": 1, "why": f"{kind} ([in, out]): one block per output neuron"}
    if is_norm(module):
        return {"split": "whole", "why": f"scale of {kind}"}
    return None


def _biases(module: nn.Module) -> list[torch.Tensor]:
    """The bias parameters of the module types this file knows (none for any other type)."""
    if isinstance(module, nn.MultiheadAttention):
        return [b for b in (module.in_proj_bias, module.bias_k, module.bias_v) if b is not None]
    conv1d = _hf_conv1d_type()
    known = ((nn.Linear, nn.modules.conv._ConvNd, *NORM_TYPES, *_loaded_types(LOADED_NORM_TYPES))
             + ((conv1d,) if conv1d else ()))
    if isinstance(module, known) and isinstance(getattr(module, "bias", None), torch.Tensor):
        return [module.bias]
    return []


def _hf_conv1d_type() -> type | None:
    """transformers' Conv1D, only when transformers is already imported (never imported from here)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def _loaded_types(import_paths: tuple[str, ...]) -> tuple[type, ...]:
    """The classes behind ``package.module.ClassName`` paths whose module is already imported."""
    found = []
    for import_path in import_paths:
        module_name, _, class_name = import_path.rpartition(".")
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


# ----------------------------------------------------------------------------- attention heads


def _registered_layouts() -> dict[type, LayoutChoice]:
    resolved: dict[type, LayoutChoice] = {}
    for key, layout in _ATTENTION.items():
        for cls in _loaded_types((key,)) if isinstance(key, str) else (key,):
            resolved.pop(cls, None)
            resolved[cls] = layout
    return resolved


def _layout_of(module: nn.Module, layouts: dict[type, LayoutChoice]) -> AttentionLayout | None:
    """The layout registered for the most specific class of ``module`` (None if none is)."""
    choice = next((layouts[cls] for cls in type(module).__mro__ if cls in layouts), None)
    if choice is None or isinstance(choice, AttentionLayout):
        return choice
    layout = choice(module)
    if not isinstance(layout, AttentionLayout):
        raise TypeError(
            f"the layout function registered for {type(module).__name__} returned {type(layout).__name__}, "
            "not an AttentionLayout"
        )
    return layout


def _parse_packing(packing: str) -> tuple[tuple[str, ...], bool]:
    """(roles in output order, interleaved per key/value head) of a packing string."""
    text = packing.replace(" ", "")
    interleaved = text.startswith("[") and text.endswith("]")
    roles = tuple(text[1:-1].split(",") if interleaved else text.split("|"))
    if not set(roles) <= set(ROLES) or len(set(roles)) != len(roles) or (interleaved and roles != ROLES):
        raise ValueError(
            f"projection packing {packing!r} is not understood: use 'q', 'k', 'v', parts joined by '|' "
            "(e.g. 'q|k|v', 'k|v') or '[q,k,v]' for per-head interleaving"
        )
    return roles, interleaved


def _read_count(module: nn.Module, attribute_path: str) -> int | None:
    """The positive integer at a dotted attribute path of ``module`` (None if absent or not one)."""
    value = module
    for attribute in attribute_path.split("."):
        value = getattr(value, attribute, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def _output_axis(holder: object) -> tuple[torch.Tensor, int]:
    """(weight, axis of its output features) of a projection: a module or a 2-D parameter."""
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(holder, conv1d):
        return holder.weight, 1
    if (isinstance(holder, (nn.Linear, nn.Embedding))
            or (isinstance(holder, nn.modules.conv._ConvNd) and not holder.transposed)):
        return holder.weight, 0
    if isinstance(holder, nn.Parameter) and holder.ndim >= 2:
        return holder, 0
    raise ValueError(f"is a {type(holder).__name__}, not a Linear, Conv1d, HF Conv1D or a 2-D parameter")


@dataclass(frozen=True)
class _Geometry:
    """Head counts and widths of one attention module; ``group`` is the width of one q/k block."""

    heads: int
    kv_heads: int
    head_dim: int
    group: int

    def segments(self, roles: tuple[str, ...], interleaved: bool) -> list[tuple[str, int]]:
        """(role, width) of consecutive output features of a projection packed as ``roles``."""
        if interleaved:  # per key/value head: its group of query heads, its key head, its value head
            return ([("q", self.heads // self.kv_heads * self.head_dim), ("k", self.head_dim), ("v", self.head_dim)]
                    * self.kv_heads)
        return [(role, (self.heads if role == "q" else self.kv_heads) * self.head_dim) for role in roles]


def _attention_specs(where: str, module: nn.Module, layout: AttentionLayout,
                     n_heads: int | None) -> list[tuple[torch.Tensor, RuleSpec]]:
    """(parameter, rule spec) for the head-split weights of one attention module."""
    kind = type(module).__name__
    layout_fix = f"register the right layout with register_attention({kind}, AttentionLayout(...))"
    projections = {attribute: (*_projection(where, module, attribute, layout_fix), *_parse_packing(packing))
                   for attribute, packing in layout.projections.items()}
    geometry = _geometry(where, module, layout, projections, n_heads, layout_fix)
    specs = []
    for attribute, (weight, axis, roles, interleaved) in projections.items():
        packing = layout.projections[attribute]
        if roles == ("v",):
            specs.append((weight, {"split": "groups", "axis": axis, "size": 1,
                                   "why": f"{kind} value: one block per output neuron"}))
            continue
        segments = geometry.segments(roles, interleaved)
        needed = sum(width for _, width in segments)
        if needed != weight.shape[axis]:
            raise ValueError(
                f"attention module {where}: its projection '{attribute}' has {weight.shape[axis]} outputs, "
                f"but {packing!r} with {geometry.heads} query heads, {geometry.kv_heads} key/value heads "
                f"of dimension {geometry.head_dim} needs {needed}; "
                f"pass the right n_heads, or {layout_fix}"
            )
        runs = _head_runs(kind, [(role, width, geometry.group) for role, width in segments])
        split = {"size": runs[0][0]} if len(runs) == 1 else {"runs": tuple(runs)}
        why = (f"{kind} {packing}: one block per head of {geometry.group} ({geometry.heads} query, "
               f"{geometry.kv_heads} key/value heads)"
               + (", one per row of v" if "v" in roles else ""))
        specs.append((weight, {"split": "groups", "axis": axis, **split, "why": why}))
    for attribute in layout.head_columns:
        weight, _ = _projection(where, module, attribute, layout_fix)
        if weight.ndim != 2 or weight.shape[1] != geometry.heads:
            raise ValueError(f"attention module {where}: its head-column table '{attribute}' "
                             f"has shape {tuple(weight.shape)}, not [n, {geometry.heads} heads]; {layout_fix}")
        specs.append((weight, {"split": "groups", "axis": 1, "size": 1,
                               "why": f"{kind} per-head table: one block per head (column)"}))
    return specs


def _projection(where: str, module: nn.Module, attribute: str, layout_fix: str) -> tuple[torch.Tensor, int]:
    """(weight, output axis) of the projection held by ``module.<attribute>``."""
    holder = getattr(module, attribute, None)
    try:
        return _output_axis(holder)
    except ValueError as err:
        raise ValueError(f"attention module {where}: its layout's '{attribute}' {err}; {layout_fix}") from None


def _geometry(where: str, module: nn.Module, layout: AttentionLayout, projections: dict, n_heads: int | None,
              layout_fix: str) -> _Geometry:
    """Head counts from the layout's attributes (the query count from ``n_heads`` where unreadable);
    head_dim from its attribute or the query-carrying projection; the block width from ``n_heads``."""
    kind = type(module).__name__

    def fail(problem: str, fix: str = layout_fix) -> ValueError:
        return ValueError(f"attention module {where}: {problem}; {fix}")

    heads = _read_count(module, layout.heads) or n_heads
    if heads is None:
        raise fail(f"cannot read its head count from '{layout.heads}'", f"pass n_heads=, or {layout_fix}")
    kv_heads = heads if layout.kv_heads is None else _read_count(module, layout.kv_heads)
    if kv_heads is None:
        raise fail(f"cannot read its key/value head count from '{layout.kv_heads}'")
    if heads % kv_heads:
        raise fail(f"{heads} query heads do not split into groups for {kv_heads} key/value heads")
    if layout.head_dim is not None:
        head_dim = _read_count(module, layout.head_dim)
        if head_dim is None:
            raise fail(f"cannot read its head dimension from '{layout.head_dim}'")
    else:  # the query-carrying projection's outputs, divided evenly among the heads it holds
        weight, axis, roles, _ = next(p for p in projections.values() if "q" in p[2])
        units = sum(heads if role == "q" else kv_heads for role in roles)
        if weight.shape[axis] % units:
            raise fail(f"{weight.shape[axis]} outputs of {'|'.join(roles)} do not split into "
                       f"{heads} query / {kv_heads} key-value heads",
                       "pass the right n_heads")
        head_dim = weight.shape[axis] // units
    group = head_dim
    if n_heads is not None:
        if (heads * head_dim) % n_heads:
            raise ValueError(f"{kind}: {heads * head_dim} projection features do not split into {n_heads} heads; "
                             "pass the right n_heads")
        group = heads * head_dim // n_heads
    return _Geometry(heads, kv_heads, head_dim, group)


def _head_runs(kind: str, segments: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """Run-length (size, count) groups of (role, width, head width) segments: q and k in blocks of
    their head width, every other row (v, unplaced) one block."""
    runs: list[tuple[int, int]] = []
    for role, width, group in segments:
        if role in ("q", "k") and width % group:
            raise ValueError(f"{kind}: {width} {role} projection features do not split into heads of {group}; "
                             "pass the right n_heads")
        size, count = (group, width // group) if role in ("q", "k") else (1, width)
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + count)
        else:
            runs.append((size, count))
    return runs


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
    segments = [(s.role, s.stop - s.start, group or s.head) for s in projection.segments]
    runs = _head_runs(where, segments)
    split = {"size": runs[0][0]} if len(runs) == 1 else {"runs": tuple(runs)}
    roles = [s.role or "other" for s in projection.segments]
    if not {"q", "k"} & set(roles):
        return {"split": "groups", "axis": projection.axis, "size": 1,
                "why": f"{where} value: one block per output neuron"}
    widths = sorted({width for role, _, width in segments if role in ("q", "k")})
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
    return any(name in traced.projections and {"q", "k"} & {s.role for s in traced.projections[name].segments}
               for name in names)


def _looks_like_attention(module: nn.Module) -> bool:
    """An unregistered module that knows a head count and owns two or more projections."""
    knows_heads = any(_read_count(module, attribute) for attribute in HEAD_ATTRIBUTES)
    projections = 0
    for child in module.children():
        try:
            _output_axis(child)
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


# ----------------------------------------------------------------------------- built-in layouts

# What a trace cannot see: T5's relative position bias table (one block per head: a column) is no
# projection. The bundled attention and torch's nn.MultiheadAttention are registered too, so that
# their heads do not depend on a forward that can run on made-up inputs.


def _separate(q: str, k: str, v: str, **geometry) -> AttentionLayout:
    return AttentionLayout({q: "q", k: "k", v: "v"}, **geometry)


_T5 = _separate("q", "k", "v", heads="n_heads", head_dim="key_value_proj_dim")
_T5_WITH_BIAS = replace(_T5, head_columns=("relative_attention_bias",))
_MHA_FUSED = AttentionLayout({"in_proj_weight": "q|k|v"}, heads="num_heads", head_dim="head_dim")
_MHA_SEPARATE = _separate("q_proj_weight", "k_proj_weight", "v_proj_weight", heads="num_heads", head_dim="head_dim")

register_attention("hessian_blocks.models.gpt.SelfAttention", _separate("q_proj", "k_proj", "v_proj", heads="n_head"))
register_attention(nn.MultiheadAttention, lambda m: _MHA_FUSED if m.in_proj_weight is not None else _MHA_SEPARATE)
register_attention("transformers.models.t5.modeling_t5.T5Attention",
                   lambda m: _T5_WITH_BIAS if m.has_relative_attention_bias else _T5)
