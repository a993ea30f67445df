"""The structural default partition for Adam-mini: blocks from module *types*, never from names.

Rules, following the Adam-mini paper's partition (v1.1) as far as module types can tell:

- ``nn.Embedding`` / ``nn.EmbeddingBag`` weight: one block per token (row);
- ``nn.Linear`` weight: one block per output neuron (row); ``nn.Conv1d/2d/3d``: one per output
  channel; HF ``Conv1D`` (weight stored ``[in, out]``): one per output neuron (column);
- query and key projections of a known attention module: one block per head (``head_dim``
  contiguous outputs; key heads counted by the key/value head count, so grouped-query attention gets
  fewer, shared key blocks); value outputs of fused projections one per output neuron. Fused
  layouts (concatenated ``q|k|v``, per-head interleaved ``[q, k, v]``) become run-length groups;
- norm layers (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, batch/instance norms, the bundled models'
  ``LayerNorm`` and the RMS norms of the Hugging Face architectures below): the scale is one block;
- biases of all the above: one block per element (plain Adam, as the reference implementation);
- any other parameter: one block for the whole tensor (the PyTorch default).

Where the heads are is declared per attention module type by an :class:`AttentionLayout` (which
child holds which projection, which attributes hold the head counts), kept in one registry filled
by :func:`register_attention`. Built in: the bundled ``SelfAttention``, ``nn.MultiheadAttention``
and, once transformers is imported by the caller (never from here), the attention modules of
Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma2, Phi-3, GPT-NeoX, BERT, RoBERTa, ELECTRA, DistilBERT,
T5, GPT-2, OPT, BART, Whisper, ViT and CLIP. A module of another type that looks like attention (it
has a head-count attribute and two or more projections) keeps one block per output row, with one
warning per type saying how to register it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from hessian_blocks.blocks import Partition, Rule, runs_of
from hessian_blocks.models.gpt import LayerNorm as BundledLayerNorm
from hessian_blocks.models.gpt import SelfAttention as BundledSelfAttention

__all__ = ["NORM_TYPES", "AttentionLayout", "default_partition", "default_rules", "is_norm", "register_attention"]

# What a rule does, without the parameter's name: keyword arguments of Rule (split, axis, size, runs, why).
RuleSpec = dict

ROLES = ("q", "k", "v")

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm and InstanceNorm* share this base
    BundledLayerNorm,
)
# Hugging Face norm classes (not subclasses of torch's), by import path: resolved only when loaded.
HF_NORM_TYPES: tuple[str, ...] = (
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm",  # scales by (1 + weight): still one block
    "transformers.models.phi3.modeling_phi3.Phi3RMSNorm",
    "transformers.models.t5.modeling_t5.T5LayerNorm",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm",  # also Qwen3's per-head q_norm / k_norm
    "transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm",
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
    return isinstance(module, NORM_TYPES + _loaded_types(HF_NORM_TYPES))


def default_rules(model: nn.Module, n_heads: int | None = None) -> dict[str, Rule]:
    """One structural rule per parameter of ``model`` (trainable or not), keyed by parameter name.

    Names only label the rules; every decision comes from module types, attributes and shapes.
    ``n_heads`` replaces the query head count of every attention module (key heads follow from the
    key width); by default head counts come from each module (or its ``config``).
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
    layouts = _registered_layouts()
    unregistered: dict[type, list[str]] = {}
    for path, module in model.named_modules():
        layout = _layout_of(module, layouts)
        if layout is not None:
            where = f"'{path}' ({type(module).__name__})" if path else f"{type(module).__name__} (the model itself)"
            for param, spec in _attention_specs(where, module, layout, n_heads):
                specs[id(param)] = spec
        elif _looks_like_attention(module):
            unregistered.setdefault(type(module), []).append(path)
    for module_type, paths in unregistered.items():
        _warn_unregistered(module_type, paths)
    rules = {}
    for name, param in model.named_parameters():
        fallback = {"split": "whole", "why": f"parameter of {owners[id(param)]}: no structural rule, one block"}
        rules[name] = Rule(name, **specs.get(id(param), fallback))
    return rules


def default_partition(model: nn.Module, n_heads: int | None = None) -> Partition:
    """The structural default :class:`Partition` of ``model``'s trainable parameters."""
    rules = default_rules(model, n_heads)
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
    known = ((nn.Linear, nn.modules.conv._ConvNd, *NORM_TYPES, *_loaded_types(HF_NORM_TYPES))
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
        runs = _head_runs(kind, segments, geometry.group)
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


def _head_runs(kind: str, segments: list[tuple[str, int]], group: int) -> list[tuple[int, int]]:
    """Run-length (size, count) groups: q and k segments in blocks of ``group``, v one per row."""
    sizes: list[int] = []
    for role, width in segments:
        if role != "v" and width % group:
            raise ValueError(f"{kind}: {width} {role} projection features do not split into heads of {group}; "
                             "pass the right n_heads")
        sizes += [1] * width if role == "v" else [group] * (width // group)
    return list(runs_of(sizes))


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


def _warn_unregistered(module_type: type, paths: list[str]) -> None:
    where = ((f"'{paths[0]}'" if paths[0] else "the model itself")
             + (f" and {len(paths) - 1} more" if len(paths) > 1 else ""))
    warnings.warn(
        f"{where} ({module_type.__name__}) looks like attention (it has a head count and projections), but no "
        f"AttentionLayout is registered for {module_type.__name__}: its query/key weights get one block per "
        "output row, not one per head. Register it: "
        f"hessian_blocks.partitions.register_attention({module_type.__name__}, "
        "AttentionLayout({'<query attribute>': 'q', '<key attribute>': 'k', '<value attribute>': 'v'}, "
        "heads='<head-count attribute>')) "
        "(see docs/partition-default.md)",
        stacklevel=3,
    )


# ----------------------------------------------------------------------------- built-in layouts


def _separate(q: str, k: str, v: str, **geometry) -> AttentionLayout:
    return AttentionLayout({q: "q", k: "k", v: "v"}, **geometry)


_LLAMA_STYLE = _separate(
    "q_proj", "k_proj", "v_proj", heads="config.num_attention_heads", kv_heads="config.num_key_value_heads",
    head_dim="head_dim"
)
_BERT_STYLE = _separate("query", "key", "value", heads="num_attention_heads", head_dim="attention_head_size")
_T5 = _separate("q", "k", "v", heads="n_heads", head_dim="key_value_proj_dim")
_T5_WITH_BIAS = replace(_T5, head_columns=("relative_attention_bias",))
_GPT2 = AttentionLayout({"c_attn": "q|k|v"}, heads="num_heads", head_dim="head_dim")
_GPT2_CROSS = AttentionLayout({"q_attn": "q", "c_attn": "k|v"}, heads="num_heads", head_dim="head_dim")
_MHA_FUSED = AttentionLayout({"in_proj_weight": "q|k|v"}, heads="num_heads", head_dim="head_dim")
_MHA_SEPARATE = _separate("q_proj_weight", "k_proj_weight", "v_proj_weight", heads="num_heads", head_dim="head_dim")

register_attention(BundledSelfAttention, _separate("q_proj", "k_proj", "v_proj", heads="n_head"))
register_attention(nn.MultiheadAttention, lambda m: _MHA_FUSED if m.in_proj_weight is not None else _MHA_SEPARATE)
for _path in (
    "transformers.models.llama.modeling_llama.LlamaAttention",
    "transformers.models.qwen2.modeling_qwen2.Qwen2Attention",
    "transformers.models.mistral.modeling_mistral.MistralAttention",
    "transformers.models.gemma.modeling_gemma.GemmaAttention",
    "transformers.models.qwen3.modeling_qwen3.Qwen3Attention",
    "transformers.models.gemma2.modeling_gemma2.Gemma2Attention",
):
    register_attention(_path, _LLAMA_STYLE)
for _path in (
    "transformers.models.opt.modeling_opt.OPTAttention",
    "transformers.models.bart.modeling_bart.BartAttention",
    "transformers.models.whisper.modeling_whisper.WhisperAttention",
    "transformers.models.clip.modeling_clip.CLIPAttention",
):
    register_attention(_path, _separate("q_proj", "k_proj", "v_proj", heads="num_heads", head_dim="head_dim"))
register_attention(
    "transformers.models.vit.modeling_vit.ViTAttention",
    _separate("q_proj", "k_proj", "v_proj", heads="num_attention_heads", head_dim="head_dim"),
)
register_attention(
    "transformers.models.phi3.modeling_phi3.Phi3Attention",
    AttentionLayout({"qkv_proj": "q|k|v"}, heads="config.num_attention_heads", kv_heads="num_key_value_heads",
                    head_dim="head_dim"),
)
register_attention(
    "transformers.models.gpt_neox.modeling_gpt_neox.GPTNeoXAttention",
    AttentionLayout({"query_key_value": "[q,k,v]"}, heads="config.num_attention_heads", head_dim="head_size"),
)
for _path in (
    "transformers.models.bert.modeling_bert.BertSelfAttention",
    "transformers.models.bert.modeling_bert.BertCrossAttention",
    "transformers.models.roberta.modeling_roberta.RobertaSelfAttention",
    "transformers.models.roberta.modeling_roberta.RobertaCrossAttention",
    "transformers.models.electra.modeling_electra.ElectraSelfAttention",
    "transformers.models.electra.modeling_electra.ElectraCrossAttention",
):
    register_attention(_path, _BERT_STYLE)
register_attention(
    "transformers.models.distilbert.modeling_distilbert.DistilBertSelfAttention",
    _separate("q_lin", "k_lin", "v_lin", heads="n_heads", head_dim="attention_head_size"),
)
register_attention("transformers.models.t5.modeling_t5.T5Attention",
                   lambda m: _T5_WITH_BIAS if m.has_relative_attention_bias else _T5)
register_attention("transformers.models.gpt2.modeling_gpt2.GPT2Attention",
                   lambda m: _GPT2_CROSS if m.is_cross_attention else _GPT2)
del _path
