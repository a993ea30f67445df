"""Attention heads read from a model's own forward pass: which output rows of which weight form a head.

One forward runs on the meta device (shapes only: no memory for activations, no arithmetic, the
model's own parameters untouched, its hooks off) under a :class:`~.follow.RowFollower`, which tags
every projection's output features with the weight rows they come from and follows the tags, ATen
op by ATen op, to the attention-score product (``q . k^T``, eager or ``scaled_dot_product_attention``)
and the value product.

In a score product every batch index (batch and head dimensions) contracts one head: the rows
tagged in the query (key) operand at that index form one query (key) head; with grouped-query or
multi-query attention the key heads repeat over the query heads that share them. Rows of a weight
that reach no score product (values, MLPs, gates) stay one block per row. What the trace cannot
follow (a weight whose output features run along two axes, a head of non-contiguous rows, an index
computed from data) is reported as a problem naming the module, never guessed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from .follow import RowFollower
from .norms import NormFinder

__all__ = ["AttentionTrace", "RowSpan", "TracedAttention", "TracedProjection", "trace_attention"]

SEQUENCE = 4  # tokens in the traced batch (one sample)


@dataclass(frozen=True)
class RowSpan:
    """Consecutive output rows ``start:stop`` of a weight with one role, in blocks of ``head`` rows.

    ``role`` is ``"q"`` or ``"k"`` (one block per head), ``"v"`` (the value product's rows) or ``""``
    (rows that reach no attention product); ``head`` is 1 for the last two."""

    role: str
    start: int
    stop: int
    head: int


@dataclass(frozen=True)
class TracedAttention:
    """One attention seen in the forward: its module, its head counts and its query width."""

    module: str
    heads: int
    kv_heads: int
    query_features: int


@dataclass(frozen=True)
class TracedProjection:
    """The output rows of one weight (along ``axis``, or merged axes) that feed an attention, by role and head."""

    param: str
    axis: int | tuple[int, ...]
    attention: TracedAttention
    spans: tuple[RowSpan, ...]

    @property
    def packing(self) -> str:
        """The roles in storage order, e.g. ``"q"``, ``"q|k|v"`` or ``"q|k|v|q|k|v"`` (interleaved)."""
        return "|".join(s.role or "-" for s in self.spans)


@dataclass(frozen=True)
class AttentionTrace:
    """What one traced forward says about the model's attention heads.

    ``projections`` by parameter name; ``linear_maps``: every parameter the forward used as a linear
    map (a projection, an MLP or router weight, a tensor of experts), with the axes its products do not
    contract: the output axis of a 2-D weight (an int), the expert and output axes of a tensor of
    experts (a tuple: ``(0, 1)`` for ``[experts, out, in]``, ``(0, 2)`` for ``[experts, in, out]``);
    ``unplaced``: parameters of three or more axes that entered a product the trace could not read
    (what went wrong); ``biases``: parameters added to a projection's output (one block per element:
    1-D, or one row per expert picked by the routing); ``problems``: (module path, what was not
    understood about an attention); ``norms`` / ``norm_biases``: parameters that scale / shift
    normalised activations (:mod:`.norms`); ``failure``: why the forward could not run (``None`` when it
    ran)."""

    projections: dict[str, TracedProjection] = field(default_factory=dict)
    linear_maps: dict[str, int | tuple[int, ...]] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    biases: frozenset[str] = frozenset()
    problems: tuple[tuple[str, str], ...] = ()
    norms: frozenset[str] = frozenset()
    norm_biases: frozenset[str] = frozenset()
    failure: str | None = None


def trace_attention(model: nn.Module, inputs: object = None) -> AttentionTrace:
    """Trace one forward of ``model`` and read where its attention heads are.

    The forward runs on the meta device (shapes only); a model whose forward needs values (a
    data-dependent branch, ``.item()``) runs once more on its own parameters, on a batch of one.
    ``inputs``: an example batch (a tensor, a tuple of positional arguments or a dict of keywords;
    on the meta device only its shapes and dtypes count). By default one is made up: Hugging Face
    models get the inputs their ``forward`` names (``input_ids``, ``pixel_values``,
    ``input_features``, decoder ids, encoder states for cross-attention) sized from their config;
    other models a ``[1, 4]`` token batch when their first layer (module without children that has
    parameters) is an ``nn.Embedding``,
    ``[1, 4, in_features]`` when an ``nn.Linear``.
    """
    runner, prefix = (model._orig_mod, "_orig_mod.") if isinstance(getattr(model, "_orig_mod", None), nn.Module) \
        else (model, "")
    failures = []
    for device in ("meta", next((p.device for p in runner.parameters()), torch.device("cpu"))):
        example = _example(runner, device) if inputs is None else _as_call(inputs)
        if example is None:
            return AttentionTrace(failure="no example inputs could be made up for its forward: pass inputs=")
        modes = {m: m.training for m in runner.modules()}
        runner.eval()
        try:
            follower, norms = _run(runner, prefix, example, on_meta=device == "meta")
        except Exception as err:  # noqa: BLE001 (any model error: the default partition falls back and says so)
            message = " ".join(str(err).split())
            where = "on the meta device" if device == "meta" else "on its own parameters"
            failures.append(f"{where} ({type(err).__name__}: {message[:160]}{'...' if len(message) > 160 else ''})")
            continue
        finally:
            for module, training in modes.items():
                module.train(training)
        layers = {prefix + path for path, module in runner.named_modules()  # leaves with a weight (and bias)
                  if path and not next(module.children(), None)
                  and {name for name, _ in module.named_parameters(recurse=False)} <= {"weight", "bias"}}
        return replace(_read(follower, layers), norms=frozenset(norms.scales), norm_biases=frozenset(norms.biases))
    return AttentionTrace(failure="its forward failed " + ", then ".join(failures))


def _run(runner: nn.Module, prefix: str, example: tuple[tuple, dict], on_meta: bool
         ) -> tuple[RowFollower, NormFinder]:
    """One forward under the follower and the norm finder, without the modules' hooks (FSDP's all-gathers,
    a user's logging): on meta copies of the parameters and buffers, or on the model's own."""
    tensors = dict(runner.named_parameters()) if not on_meta else {
        name: _to_meta(t) for name, t in runner.named_parameters()}
    follower = RowFollower({id(t): (prefix + name, t) for name, t in tensors.items()})
    norms = NormFinder({id(t): prefix + name for name, t in tensors.items()})
    with torch.no_grad(), _without_hooks(runner), follower, norms:
        if not on_meta:
            runner(*example[0], **example[1])
        else:
            args, kwargs = tree_map(_to_meta, example)
            buffers = {name: _to_meta(t) for name, t in runner.named_buffers()}
            torch.func.functional_call(runner, tensors | buffers, args, kwargs, strict=False)
    return follower, norms


_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called")


@contextlib.contextmanager
def _without_hooks(model: nn.Module):
    saved = [(module, {name: getattr(module, name) for name in _HOOKS}) for module in model.modules()]
    try:
        for module, hooks in saved:
            for name, value in hooks.items():
                setattr(module, name, type(value)())
        yield
    finally:
        for module, hooks in saved:
            for name, value in hooks.items():
                setattr(module, name, value)


# ----------------------------------------------------------------------------- example inputs


def _to_meta(value: object) -> object:
    """A plain meta tensor of ``value``'s (global) shape and dtype; anything else unchanged."""
    return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, torch.Tensor) else value


def _as_call(inputs: object) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def _example(model: nn.Module, device: torch.device | str) -> tuple[tuple, dict] | None:
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(type(model), "main_input_name", None), str):
        return (), _hf_example(model, config, device)
    first = next((m for m in model.modules()  # the first layer: a module without children that has parameters
                  if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, nn.Embedding):
        return (torch.zeros(1, SEQUENCE, dtype=torch.long, device=device),), {}
    if isinstance(first, nn.Linear):
        return (torch.zeros(1, SEQUENCE, first.in_features, dtype=first.weight.dtype, device=device),), {}
    return None


def _hf_example(model: nn.Module, config: object, device: torch.device | str) -> dict:
    """The inputs a Hugging Face model's ``forward`` names, sized from its config."""
    accepted = inspect.signature(model.forward).parameters
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tokens = torch.zeros(1, SEQUENCE, dtype=torch.long, device=device)
    batch: dict = {}
    if "input_ids" in accepted:
        batch["input_ids"] = tokens
    vision = getattr(config, "vision_config", None) or config
    if "pixel_values" in accepted and getattr(vision, "image_size", None):
        size = vision.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        batch["pixel_values"] = torch.zeros(1, getattr(vision, "num_channels", 3), height, width, dtype=dtype,
                                            device=device)
    if "input_features" in accepted and getattr(config, "num_mel_bins", None):
        frames = 2 * getattr(config, "max_source_positions", 1500)  # audio encoders: two frames per position
        batch["input_features"] = torch.zeros(1, config.num_mel_bins, frames, dtype=dtype, device=device)
    if "decoder_input_ids" in accepted and getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = tokens
    if "encoder_hidden_states" in accepted and (getattr(config, "add_cross_attention", False)
                                                or getattr(config, "is_encoder_decoder", False)):
        width = getattr(config, "cross_attention_hidden_size", None) or config.hidden_size
        batch["encoder_hidden_states"] = torch.zeros(1, SEQUENCE, width, dtype=dtype, device=device)
    return batch


def _read(follower: RowFollower, layers: set[str]) -> AttentionTrace:
    """What the followed forward says about the heads; ``layers``: paths of modules that are single layers
    (a projection's owner: the attention is the module above)."""
    heads: dict[int, dict[frozenset, str]] = {}  # source -> row set -> role
    values: dict[int, set[int]] = {}
    attention_of: dict[int, TracedAttention] = {}
    problems: list[tuple[str, str]] = []
    in_attention: set[str] = set()  # weights whose lost rows reached an attention (its problems name them)
    for event in (e for e in follower.events if e.confirmed):
        sides = {"q": follower.row_sets(event.q), "k": follower.row_sets(event.k)}
        lost = {int(t) for sets in sides.values() for s in sets for t in s if t <= -2}
        lost |= {int(t) for v in event.v for s in follower.row_sets(v) for t in s if t <= -2}
        for code in sorted(lost, reverse=True):  # in the order the losses happened
            param, what = follower.losses[-2 - code]
            problems.append((_attention_module([param], layers), f"'{param}' {what}"))
            in_attention.add(param)
        if lost:
            continue
        per_source = {role: [follower.split(s) for s in sets] for role, sets in sides.items()}
        params = sorted({follower.sources[src][0] for split in per_source.values() for p in split for src in p})
        attention = TracedAttention(
            _attention_module(params, layers), heads=len(set(sides["q"])), kv_heads=len(set(sides["k"])),
            query_features=len(set().union(*sides["q"])))
        for role, splits in per_source.items():
            for split in splits:
                for source, rows in split.items():
                    heads.setdefault(source, {}).setdefault(rows, role)
                    attention_of.setdefault(source, attention)
        for v in event.v:
            for split in (follower.split(s) for s in follower.row_sets(v)):
                for source, rows in split.items():
                    values.setdefault(source, set()).update(rows)
                    attention_of.setdefault(source, attention)
    for source in values.keys() - heads.keys():  # value weights apart from the query/key ones
        heads[source] = {}
    projections = {}
    for source, sets in heads.items():
        param, axis = follower.sources[source]
        spans = _spans(follower.length(source), sets, values.get(source, set()))
        if isinstance(spans, str):
            problems.append((attention_of[source].module, f"'{param}' {spans}"))
            continue
        projections[param] = TracedProjection(param, axis, attention_of[source], spans)
    linear_maps = {param: axes[0] if len(follower.shapes[param]) == 2 else axes
                   for param, axes in follower.linear_maps.items() if axes is not None}
    unplaced = {param: "enters products that contract different axes" for param, axes in
                follower.linear_maps.items() if axes is None and len(follower.shapes[param]) > 2}
    for param, what in follower.losses:
        if len(follower.shapes[param]) > 2 and param not in linear_maps and param not in in_attention:
            unplaced.setdefault(param, what)
    return AttentionTrace(projections, linear_maps, unplaced, frozenset(follower.biases),
                          tuple(dict.fromkeys(problems)))


def _spans(length: int, sets: dict[frozenset, str], values: set[int]) -> tuple[RowSpan, ...] | str:
    """Consecutive spans of one weight's output rows, or what is wrong with its heads."""
    owner: dict[int, frozenset] = {}
    for rows in sets:
        for row in rows:
            if owner.setdefault(row, rows) != rows:
                return (f"has heads that share rows ({_span(owner[row])} and {_span(rows)}): "
                        "one block per output row kept")
        if max(rows) - min(rows) + 1 != len(rows):
            return (f"has a head of rows that are not contiguous ({_span(rows)}): the partition groups contiguous "
                    "rows, one block per output row kept")
    spans: list[RowSpan] = []
    row = 0
    while row < length:
        rows = owner.get(row)
        role, size = (sets[rows], len(rows)) if rows else ("v" if row in values else "", 1)
        last = spans[-1] if spans else None
        if last and last.role == role and last.head == size and last.stop == row:
            spans[-1] = RowSpan(role, last.start, row + size, size)
        else:
            spans.append(RowSpan(role, row, row + size, size))
        row += size
    return tuple(spans)


def _span(rows: frozenset[int]) -> str:
    ordered = sorted(rows)
    return f"rows {ordered[0]}..{ordered[-1]}" if len(ordered) == ordered[-1] - ordered[0] + 1 else \
        f"rows {', '.join(map(str, ordered[:4]))}{', ...' if len(ordered) > 4 else ''}"


def _attention_module(params: list[str], layers: set[str]) -> str:
    """The deepest module holding all of ``params``, above the layers that own them."""
    paths = []
    for param in params:
        path = param.rpartition(".")[0]
        paths.append(path.rpartition(".")[0] if path in layers else path)
    return ".".join(os.path.commonprefix([path.split(".") if path else [] for path in paths]))
