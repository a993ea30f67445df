"""Attention layouts declared per module type: the registry that overrides the traced heads.

An :class:`AttentionLayout` says which child of an attention module holds which projection and
which attributes hold its head counts; :func:`register_attention` keeps one registry of them, by
class or by import path (used once that module is imported, never importing it). The default
partition (:mod:`.structural`) places the heads of a registered module type from its layout instead
of the traced forward: for what a trace cannot see (T5's relative position bias table) and as an
explicit override.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from hessian_blocks.blocks import runs_of

__all__ = ["AttentionLayout", "register_attention"]

# What a rule does, without the parameter's name: keyword arguments of Rule (split, axis, size, runs, why).
RuleSpec = dict

ROLES = ("q", "k", "v")


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


def hf_conv1d_type() -> type | None:
    """transformers' Conv1D, only when transformers is already imported (never imported from here)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def loaded_types(import_paths: tuple[str, ...]) -> tuple[type, ...]:
    """The classes behind ``package.module.ClassName`` paths whose module is already imported."""
    found = []
    for import_path in import_paths:
        module_name, _, class_name = import_path.rpartition(".")
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def registered_layouts() -> dict[type, LayoutChoice]:
    resolved: dict[type, LayoutChoice] = {}
    for key, layout in _ATTENTION.items():
        for cls in loaded_types((key,)) if isinstance(key, str) else (key,):
            resolved.pop(cls, None)
            resolved[cls] = layout
    return resolved


def layout_of(module: nn.Module, layouts: dict[type, LayoutChoice]) -> AttentionLayout | None:
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


def read_count(module: nn.Module, attribute_path: str) -> int | None:
    """The positive integer at a dotted attribute path of ``module`` (None if absent or not one)."""
    value = module
    for attribute in attribute_path.split("."):
        value = getattr(value, attribute, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def output_axis(holder: object) -> tuple[torch.Tensor, int]:
    """(weight, axis of its output features) of a projection: a module or a 2-D parameter."""
    conv1d = hf_conv1d_type()
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

    def spans(self, roles: tuple[str, ...], interleaved: bool) -> list[tuple[str, int]]:
        """(role, width) of consecutive output features of a projection packed as ``roles``."""
        if interleaved:  # per key/value head: its group of query heads, its key head, its value head
            return ([("q", self.heads // self.kv_heads * self.head_dim), ("k", self.head_dim), ("v", self.head_dim)]
                    * self.kv_heads)
        return [(role, (self.heads if role == "q" else self.kv_heads) * self.head_dim) for role in roles]


def attention_specs(where: str, module: nn.Module, layout: AttentionLayout,
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
        spans = geometry.spans(roles, interleaved)
        needed = sum(width for _, width in spans)
        if needed != weight.shape[axis]:
            raise ValueError(
                f"attention module {where}: its projection '{attribute}' has {weight.shape[axis]} outputs, "
                f"but {packing!r} with {geometry.heads} query heads, {geometry.kv_heads} key/value heads "
                f"of dimension {geometry.head_dim} needs {needed}; "
                f"pass the right n_heads, or {layout_fix}"
            )
        runs = head_runs(kind, [(role, width, geometry.group) for role, width in spans])
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
        return output_axis(holder)
    except ValueError as err:
        raise ValueError(f"attention module {where}: its layout's '{attribute}' {err}; {layout_fix}") from None


def _geometry(where: str, module: nn.Module, layout: AttentionLayout, projections: dict, n_heads: int | None,
              layout_fix: str) -> _Geometry:
    """Head counts from the layout's attributes (the query count from ``n_heads`` where unreadable);
    head_dim from its attribute or the query-carrying projection; the block width from ``n_heads``."""
    kind = type(module).__name__

    def fail(problem: str, fix: str = layout_fix) -> ValueError:
        return ValueError(f"attention module {where}: {problem}; {fix}")

    heads = read_count(module, layout.heads) or n_heads
    if heads is None:
        raise fail(f"cannot read its head count from '{layout.heads}'", f"pass n_heads=, or {layout_fix}")
    kv_heads = heads if layout.kv_heads is None else read_count(module, layout.kv_heads)
    if kv_heads is None:
        raise fail(f"cannot read its key/value head count from '{layout.kv_heads}'")
    if heads % kv_heads:
        raise fail(f"{heads} query heads do not split into groups for {kv_heads} key/value heads")
    if layout.head_dim is not None:
        head_dim = read_count(module, layout.head_dim)
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


def head_runs(kind: str, spans: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """Run-length (size, count) groups of (role, width, head width) spans: q and k in blocks of
    their head width, every other row (v, unplaced) one block."""
    sizes: list[int] = []
    for role, width, group in spans:
        if role in ("q", "k") and width % group:
            raise ValueError(f"{kind}: {width} {role} projection features do not split into heads of {group}; "
                             "pass the right n_heads")
        sizes += [group] * (width // group) if role in ("q", "k") else [1] * width
    return list(runs_of(sizes))


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
