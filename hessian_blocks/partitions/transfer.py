"""Rules measured on a smaller instance of an architecture, carried over to the full model.

A model too large to measure is measured on a smaller instance of the same architecture (fewer
layers, narrower, same head size; :func:`small_overrides` chooses one from a config, the CLI's
``--small auto``); :func:`map_rules` carries its rules over to the full model by module structure
(parameter path with layer indices abstracted, module type, nearest relative depth), scaling
run-length groups with the axis (a merged run of axes, with their product).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from torch import nn

from ..blocks import Rule, layer_indices, trainable_shapes
from .render import repeat_period, runs_text

__all__ = ["SMALL_KV_HEADS", "SMALL_LAYERS", "SMALL_VOCAB", "map_rules", "small_overrides"]

# config fields of the bundled models (first name) and of Hugging Face PretrainedConfig (second)
_CONFIG_FIELDS = {
    "layers": ("n_layer", "num_hidden_layers"),
    "width": ("n_embd", "hidden_size"),
    "heads": ("n_head", "num_attention_heads"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "ffn": ("intermediate_size",),
    "expert_ffn": ("moe_intermediate_size",),  # the experts' width of a mixture of experts (Qwen-MoE, DeepSeek)
    "vocab": ("vocab_size",),
}
SMALL_LAYERS = 2      # --small auto: at most this many layers,
SMALL_KV_HEADS = 2    # at least this many key/value heads (where the model has them),
SMALL_VOCAB = 512     # and at most this many tokens


def small_overrides(config: Any) -> dict[str, int]:
    """Config overrides that build a smaller instance of the same architecture (``--small auto``).

    ``config`` is a bundled model's config (``n_layer``, ``n_embd``, ``n_head``, ``vocab_size``)
    or a Hugging Face ``PretrainedConfig`` (``num_hidden_layers``, ``hidden_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``,
    ``vocab_size``, ``moe_intermediate_size``). The smaller instance keeps the head size, has at most
    2 layers, at least 2 key/value heads (so per-head structure stays visible; at most 2 query heads
    per key/value head with grouped-query attention), the width those heads need, the MLP (and
    experts') width in the same ratio to it, its experts, and at most 512 tokens. Fields already at
    most that size are left alone. A config without layers, width and heads is an error naming what
    is missing.
    """
    found = {key: next((name for name in names if getattr(config, name, None) is not None), None)
             for key, names in _CONFIG_FIELDS.items()}
    missing = [names[0] + "/" + names[-1] for key, names in _CONFIG_FIELDS.items()
               if key in ("layers", "width", "heads") and found[key] is None]
    if missing:
        raise ValueError(
            f"cannot build a smaller instance of {type(config).__name__} automatically: it has no "
            f"{', '.join(missing)} field; give the smaller instance's config fields yourself "
            "(e.g. --small n_layer=2 --small n_embd=64), or measure the model itself"
        )
    value = {key: int(getattr(config, name)) for key, name in found.items() if name is not None}
    head_dim = value.get("head_dim") or value["width"] // value["heads"]
    kv_heads = value.get("kv_heads", value["heads"])
    if value["heads"] % kv_heads:
        raise ValueError(f"{type(config).__name__}: {value['heads']} attention heads do not share "
                         f"{kv_heads} key/value heads evenly")
    small_kv = min(kv_heads, SMALL_KV_HEADS)
    small_heads = small_kv * min(value["heads"] // kv_heads, 2)
    small_width = value["width"] * small_heads // value["heads"]
    wanted = {"layers": min(value["layers"], SMALL_LAYERS), "heads": small_heads, "kv_heads": small_kv,
              "width": small_width, "head_dim": head_dim, "vocab": min(value.get("vocab", SMALL_VOCAB), SMALL_VOCAB)}
    for ffn in ("ffn", "expert_ffn"):
        if ffn in value:
            wanted[ffn] = max(1, round(value[ffn] * small_width / value["width"]))
    return {found[key]: size for key, size in wanted.items() if found.get(key) is not None and size != value[key]}


def map_rules(small: nn.Module, rules: Sequence[Rule], full: nn.Module) -> list[Rule]:
    """Carry rules measured on ``small`` over to ``full``, a larger instance of the same architecture.

    A full-model parameter is matched to the small-model parameters with the same *structural
    path* (its dotted path with every integer index replaced by ``#``) and the same module type;
    among several (one per layer), the one at the nearest relative depth is taken. Group sizes
    carry over unchanged (the head size is the same); run-length groups are scaled with the axis
    (each run keeps its share of the axis). Any parameter without a counterpart, or whose shape
    does not fit the rule, is an error naming it.
    """
    small_rules = {r.param: r for r in rules}
    small_shapes = trainable_shapes(small)
    small_types = _owner_types(small)
    full_types = _owner_types(full)
    full_shapes = trainable_shapes(full)
    full_spans, small_spans = _layer_spans(full_shapes), _layer_spans(small_shapes)
    candidates: dict[tuple[str, str], list[str]] = {}
    for name in small_shapes:
        if name not in small_rules:
            raise ValueError(f"no rule for small-model parameter '{name}': measure every parameter of the small model")
        candidates.setdefault((_structural_path(name), small_types[name]), []).append(name)
    mapped = []
    for name, shape in full_shapes.items():
        key = (_structural_path(name), full_types[name])
        if key not in candidates:
            raise ValueError(
                f"cannot map rules to '{name}' ({full_types[name]}, shape {list(shape)}): the small model has no "
                f"parameter at path pattern '{key[0]}' of that module type. Build the small instance from the same "
                "architecture (same module tree, fewer layers or narrower), or measure the full model directly."
            )
        source = _nearest_depth(name, candidates[key], full_spans, small_spans)
        mapped.append(_scaled_rule(small_rules[source], small_shapes[source], name, shape))
    return mapped


def _scaled_rule(rule: Rule, small_shape: tuple[int, ...], name: str, shape: tuple[int, ...]) -> Rule:
    why = f"mapped from '{rule.param}' {list(small_shape)} of the measured small model: {rule.why or ''}".rstrip(": ")
    if len(shape) != len(small_shape):
        raise ValueError(
            f"cannot map the rule of '{rule.param}' (shape {list(small_shape)}) to '{name}' (shape {list(shape)}): "
            "the tensors have a different number of dimensions"
        )
    if rule.split != "groups":
        return Rule(name, rule.split, why=why)
    axes = rule.axes(shape)
    axis = axes[0] if len(axes) == 1 else axes                 # one axis, or a merged run (its length: the product)
    where = f"axis {axis}" if len(axes) == 1 else f"axes {list(axes)}"
    length, small_length = math.prod(shape[a] for a in axes), math.prod(small_shape[a] for a in axes)
    if rule.size is not None:
        if length % rule.size:
            raise ValueError(
                f"cannot map groups of {rule.size} along {where} from '{rule.param}' to '{name}' (shape "
                f"{list(shape)}): {rule.size} does not divide {length}. The small model must keep the group "
                "(head) size of the full model."
            )
        return Rule(name, "groups", axis=axis, size=rule.size, why=why)
    period = repeat_period(rule.runs)
    if period < len(rule.runs):   # a pattern repeated per head: repeat it as often as the full axis holds it
        pattern = rule.runs[:period]
        unit = sum(size * count for size, count in pattern)
        if length % unit:
            raise ValueError(
                f"cannot map the run-length groups of '{rule.param}' ({runs_text(rule.runs)} along {where}) to "
                f"'{name}' (length {length}): the repeated pattern of {unit} slices does not divide it. The "
                "small model must keep the head size of the full model."
            )
        return Rule(name, "groups", axis=axis, runs=tuple(pattern) * (length // unit), why=why)
    runs = []
    for size, count in rule.runs:
        covered = size * count * length
        if covered % small_length or (covered // small_length) % size:
            raise ValueError(
                f"cannot map run-length groups {list(map(list, rule.runs))} of '{rule.param}' ({where} of length "
                f"{small_length}) to '{name}' (length {length}): the run of {count} groups of {size} does "
                "not scale to whole groups. Choose a small instance whose widths divide the full model's."
            )
        runs.append((size, covered // small_length // size))
    return Rule(name, "groups", axis=axis, runs=tuple(runs), why=why)


def _structural_path(name: str) -> str:
    """The parameter path with every layer index (integer component) replaced by ``#``."""
    return ".".join("#" if part.isdecimal() else part for part in name.split("."))


def _layer_spans(names: Iterable[str]) -> dict[str, list[int]]:
    """Structural path -> largest index at each integer position (the number of layers - 1)."""
    spans: dict[str, list[int]] = {}
    for name in names:
        key, indices = _structural_path(name), list(layer_indices(name))
        spans[key] = [max(a, b) for a, b in zip(spans.get(key, indices), indices)]
    return spans


def _relative_depth(name: str, spans: dict[str, list[int]]) -> list[float]:
    return [i / max(span, 1) for i, span in zip(layer_indices(name), spans[_structural_path(name)])]


def _nearest_depth(name: str, sources: list[str], full_spans: dict, small_spans: dict) -> str:
    """The source at the nearest relative depth (first layer <-> first layer, last <-> last)."""
    target = _relative_depth(name, full_spans)

    def distance(source: str) -> float:
        return sum(abs(a - b) for a, b in zip(_relative_depth(source, small_spans), target))

    return min(sources, key=distance)


def _owner_types(model: nn.Module) -> dict[str, str]:
    """Parameter name -> type name of the module that owns it."""
    types = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            types[f"{module_name}.{param_name}" if module_name else param_name] = type(module).__name__
    return types
