"""Attention heads read from a model's own forward pass: which output rows of which weight form a head.

One forward runs on the meta device (shapes only: no memory for activations, no arithmetic, the
model's own parameters untouched) under a ``TorchDispatchMode`` that sees every ATen operation.
Each projection's output features carry *row tags* (which row of which weight they come from):

- a projection is a matrix product (``mm``/``addmm``/``bmm``/``baddbmm``, which ``nn.Linear``, HF
  ``Conv1D``, ``matmul`` and ``einsum`` all become) whose right operand is a view of a 2-D parameter;
  the view's strides say whether its output features are the weight's rows (``nn.Linear``,
  ``[out, in]``) or columns (``Conv1D``, ``[in, out]``) and which ones (a slice of a fused weight);
- views, reshapes, transposes, splits, chunks, indexing, ``cat``/``stack`` and copies move the tags
  with the features (the same operation runs on the tag tensor); pointwise operations (rotary
  embeddings, casts, q/k norms' scaling) keep them; reductions and other products drop them;
- a product of two tagged tensors whose result reaches a softmax is an attention-score product
  (``q . k^T``); the product of its softmax with a tagged tensor is the value product;
  ``scaled_dot_product_attention`` (fused, or its math decomposition) is both.

In a score product every batch index (batch and head dimensions) contracts one head: the rows
tagged in the query (key) operand at that index form one query (key) head; with grouped-query or
multi-query attention the key heads repeat over the query heads that share them. Rows of a weight
that reach no score product (values, MLPs, gates) stay one block per row. What the trace cannot
follow (a weight whose output features run along two axes, a head of non-contiguous rows, an index
computed from data) is reported as a problem naming the module, never guessed.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["AttentionTrace", "HeadSegment", "TracedAttention", "TracedProjection", "trace_attention"]

UNTAGGED = -1  # a feature that comes from no projection; tags <= -2 encode a loss (what could not be followed)
SEQUENCE = 4  # tokens in the traced batch (one sample)
_PRODUCTS = {"mm": (None, 0, 1), "bmm": (None, 0, 1), "addmm": (0, 1, 2), "baddbmm": (0, 1, 2)}  # (bias, a, b)
_SOFTMAX = {"_softmax", "_safe_softmax", "softmax"}
_COPIES = {"_to_copy", "clone", "contiguous", "alias", "detach", "lift_fresh", "lift_fresh_copy", "copy"}
# views between real pairs and complex numbers (rotary embeddings): a complex feature carries the tag of
# its real part, and the trace remembers that the imaginary part's row goes with it
_COMPLEX_VIEWS = {"view_as_complex": lambda tags: tags[..., 0],
                  "view_as_real": lambda tags: tags.unsqueeze(-1).expand(*tags.shape, 2)}
# normalisations: output i is input i rescaled (the statistics and the scale are no projection's rows)
_NORMS = {"native_layer_norm", "_fused_rms_norm", "native_group_norm", "native_batch_norm", "native_dropout",
          "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"}
_MOVES = {"_unsafe_view", "cat", "stack", "repeat", "index_select", "index", "gather", "flip", "roll",
          "slice_scatter", "select_scatter", "index_put",
          "repeat_interleave", "expand_copy", "view_copy", "permute_copy", "transpose_copy", "t_copy",
          "unsqueeze_copy", "squeeze_copy", "slice_copy", "select_copy", "split_copy", "unbind_copy"}


@dataclass(frozen=True)
class HeadSegment:
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
    """The output rows of one weight (along ``axis``) that feed an attention, by role and head."""

    param: str
    axis: int
    attention: TracedAttention
    segments: tuple[HeadSegment, ...]

    @property
    def packing(self) -> str:
        """The roles in storage order, e.g. ``"q"``, ``"q|k|v"`` or ``"q|k|v|q|k|v"`` (interleaved)."""
        return "|".join(s.role or "-" for s in self.segments)


@dataclass(frozen=True)
class AttentionTrace:
    """What one traced forward says about the model's attention heads.

    ``projections`` by parameter name; ``linear_maps``: every 2-D parameter the forward used as a
    linear map (a projection, an MLP or router weight), with its output axis; ``biases``: 1-D
    parameters added to a projection's output (one block per element); ``problems``: (module path,
    what was not understood); ``failure``: why the forward could not run (``None`` when it ran)."""

    projections: dict[str, TracedProjection] = field(default_factory=dict)
    linear_maps: dict[str, int] = field(default_factory=dict)
    biases: frozenset[str] = frozenset()
    problems: tuple[tuple[str, str], ...] = ()
    failure: str | None = None


def trace_attention(model: nn.Module, inputs: object = None) -> AttentionTrace:
    """Trace one forward of ``model`` and read where its attention heads are.

    The forward runs on the meta device (shapes only); a model whose forward needs values (a
    data-dependent branch, ``.item()``) runs once more on its own parameters, on a batch of one.
    ``inputs``: an example batch (a tensor, a tuple of positional arguments or a dict of keywords;
    on the meta device only its shapes and dtypes count). By default one is made up: Hugging Face
    models get the inputs their ``forward`` names (``input_ids``, ``pixel_values``,
    ``input_features``, decoder ids, encoder states for cross-attention) sized from their config;
    other models a ``[1, 4]`` token batch when their first layer is an ``nn.Embedding``,
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
            follower = _run(runner, prefix, example, on_meta=device == "meta")
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
        return follower.result(layers)
    return AttentionTrace(failure="its forward failed " + ", then ".join(failures))


def _run(runner: nn.Module, prefix: str, example: tuple[tuple, dict], on_meta: bool) -> _Follower:
    """One forward under the follower, without the modules' hooks (FSDP's all-gathers, a user's logging):
    on meta copies of the parameters and buffers, or on the model's own."""
    if not on_meta:
        follower = _Follower({id(t): (prefix + name, t) for name, t in runner.named_parameters()})
        with torch.no_grad(), _without_hooks(runner), follower:
            runner(*example[0], **example[1])
        return follower
    args, kwargs = tree_map(_to_meta, example)
    tensors = {name: _to_meta(t) for name, t in runner.named_parameters()}
    buffers = {name: _to_meta(t) for name, t in runner.named_buffers()}
    follower = _Follower({id(t): (prefix + name, t) for name, t in tensors.items()})
    with torch.no_grad(), _without_hooks(runner), follower:
        torch.func.functional_call(runner, tensors | buffers, args, kwargs, strict=False)
    return follower


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
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
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


# ----------------------------------------------------------------------------- following the forward


@dataclass
class _Event:
    """A product of two tagged tensors; an attention once its result reaches a softmax."""

    q: torch.Tensor  # tags [batch indices, features of one head]
    k: torch.Tensor
    confirmed: bool = False
    v: list[torch.Tensor] = field(default_factory=list)


class _Follower(TorchDispatchMode):
    """Runs every ATen op unchanged and moves row tags (real CPU integer tensors) alongside."""

    def __init__(self, params: dict[int, tuple[str, torch.Tensor]]):
        super().__init__()
        self.keep: list[object] = []  # every tracked tensor stays alive: its id is never reused
        self.shapes = {name: tuple(t.shape) for name, t in params.values()}
        # id -> (param, geometry): a meta tensor whose strides index the parameter's row-major entries, or
        # why its entries cannot be followed any more
        self.geometry: dict[int, tuple[str, torch.Tensor | str]] = {
            i: (name, torch.empty(t.shape, device="meta")) for i, (name, t) in params.items()}
        self.tags: dict[int, torch.Tensor] = {}  # id -> int64 row tags, the tensor's shape
        self.stage: dict[int, tuple[str, _Event]] = {}  # id -> ("scores" | "probs", event)
        self.sources: list[tuple[str, int]] = []  # (param, output axis); row tags of source s start at starts[s]
        self.starts: list[int] = []
        self.losses: list[tuple[str, str]] = []  # (param, what could not be followed); tag -2 - index
        self.events: list[_Event] = []
        self.biases: set[str] = set()
        self.linear_maps: dict[str, int | None] = {}  # param -> output axis (None: used along both)
        self.partners: dict[int, int] = {}  # real-part row tag -> imaginary-part row tag (complex views)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(id(t) in self.geometry or id(t) in self.tags or id(t) in self.stage
               for t in _tensors((args, tuple(kwargs.values())))):
            self._follow(func, args, kwargs, out)
        return out

    # -- bookkeeping

    def _tag(self, tensor: torch.Tensor, tags: torch.Tensor, surely: bool = False) -> None:
        """Record ``tags`` for ``tensor`` unless none of them is a row (``surely``: some are)."""
        if surely or bool((tags != UNTAGGED).any()):
            self.keep.append(tensor)
            self.tags[id(tensor)] = tags

    def _loss(self, param: str, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        self.losses.append((param, what))
        return torch.full(shape, -2 - (len(self.losses) - 1), dtype=torch.long)

    def _lost(self, tags: torch.Tensor, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tags replaced by a loss naming the first weight they came from."""
        known = tags[tags >= 0]
        param = self.sources[self._source_of(int(known[0]))][0] if len(known) else self._loss_param(tags)
        return self._loss(param, what, shape)

    def _loss_param(self, tags: torch.Tensor) -> str:
        lost = tags[tags <= -2]
        return self.losses[-2 - int(lost[0])][0] if len(lost) else "?"

    def _source_of(self, tag: int) -> int:
        return bisect.bisect_right(self.starts, tag) - 1

    def _rows(self, param: str, axis: int) -> int:
        """The first row tag of ``param``'s output axis (allocated on first use)."""
        if (param, axis) not in self.sources:
            last = self.sources[-1] if self.sources else None
            self.starts.append(self.starts[-1] + self.shapes[last[0]][last[1]] if last else 0)
            self.sources.append((param, axis))
        return self.starts[self.sources.index((param, axis))]

    # -- one ATen op

    def _follow(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        outs = _tensors(out)
        if name in _PRODUCTS:
            self._product(name, args, out)
        elif "scaled_dot_product" in name:
            q, k, v = args[:3]
            if id(q) in self.tags or id(k) in self.tags:
                event = self._event(*(self.tags.get(id(t), torch.full(t.shape, UNTAGGED, dtype=torch.long))
                                      for t in (q, k)))
                event.confirmed = True
                if id(v) in self.tags:
                    event.v.append(_per_batch(self.tags[id(v)]))
        elif name in _SOFTMAX:
            if id(args[0]) in self.stage:
                event = self.stage[id(args[0])][1]
                event.confirmed = True
                self.keep.append(outs[0])
                self.stage[id(outs[0])] = ("probs", event)
        elif (func.is_view and name != "as_strided") or name in _COPIES or name in _MOVES:
            self._move(func, name, args, kwargs, outs)
        elif torch.Tag.pointwise in func.tags or name == "copy_":
            self._pointwise(name, args, outs)
        elif name in _NORMS and id(args[0]) in self.tags and tuple(outs[0].shape) == tuple(args[0].shape):
            self._tag(outs[0], self.tags[id(args[0])], surely=True)

    def _product(self, name: str, args, out: torch.Tensor) -> None:
        bias_at, a_at, b_at = _PRODUCTS[name]
        a, b = args[a_at], args[b_at]
        if id(b) in self.geometry and id(a) not in self.geometry:
            param, geometry = self.geometry[id(b)]
            tags = self._projection(param, geometry, tuple(out.shape))
            self._tag(out, tags, surely=True)
            if bias_at is not None and id(args[bias_at]) in self.geometry and tags.min() >= 0:
                self.biases.add(self.geometry[id(args[bias_at])][0])
        elif self.stage.get(id(a), ("",))[0] == "probs":
            if id(b) in self.tags:
                self.stage[id(a)][1].v.append(_per_batch(self.tags[id(b)]))
        elif (id(a) in self.tags or id(b) in self.tags) and id(a) not in self.geometry and id(b) not in self.geometry:
            # a score product candidate; one side may come from no projection the trace followed (then only
            # the other side's heads are read)
            event = self._event(*(self.tags.get(id(t), torch.full(t.shape, UNTAGGED, dtype=torch.long))
                                  for t in (a, b)))
            self.keep.append(out)
            self.stage[id(out)] = ("scores", event)

    def _event(self, q: torch.Tensor, k: torch.Tensor) -> _Event:
        """Score product of ``q`` and ``k`` (either transposed): per batch index, the rows each contracts."""
        event = _Event(_per_batch(q), _per_batch(k))
        self.events.append(event)
        return event

    def _projection(self, param: str, geometry: torch.Tensor | str, shape: tuple[int, ...]) -> torch.Tensor:
        """Row tags of a projection's output ``[..., m, n]`` from the geometry of its weight operand."""
        if isinstance(geometry, str):
            return self._loss(param, f"(shape {list(self.shapes[param])}) {geometry}", shape)
        if len(self.shapes[param]) != 2:  # a 3-D expert tensor [experts, out, in] would get (expert, row) blocks here
            return self._loss(param, f"(shape {list(self.shapes[param])}) enters its product with its output "
                                     "features along more than one axis", shape)
        rows, columns = self.shapes[param]
        *batch, depth, width = geometry.shape
        strides = geometry.stride()
        base = torch.full((1, 1), geometry.storage_offset())
        if batch:
            base = base + torch.arange(math.prod(batch))[:, None] * (strides[0] if len(batch) == 1 else 0)
            if len(batch) > 1 and any(s for s in strides[:-2]):
                return self._loss(param, "is batched over more than one axis in its product", shape)
        base = base + torch.arange(width)[None, :] * strides[-1]  # flat index of column n's first entry
        step, feature_step = strides[-2], strides[-1] if width > 1 else None
        along_rows = step == 1 and feature_step in (None, columns) and bool((base % columns + depth <= columns).all())
        along_columns = (step == columns and feature_step in (None, 1)
                         and bool((base // columns + depth <= rows).all()))
        if along_rows == along_columns:
            return self._loss(param, "enters its product with strides the trace cannot read", shape)
        axis, index = (0, base // columns) if along_rows else (1, base % columns)
        self.linear_maps[param] = axis if self.linear_maps.get(param, axis) == axis else None
        tags = self._rows(param, axis) + index  # [batch, n]
        return tags[:, None, :].expand(tags.shape[0], shape[-2], shape[-1]).reshape(shape)

    def _move(self, func, name: str, args, kwargs, outs: list[torch.Tensor]) -> None:
        inputs = _tensors(args)
        first = inputs[0] if inputs else None
        if first is not None and id(first) in self.geometry:  # a view or copy of a weight
            param, geometry = self.geometry[id(first)]
            mixed = f"enters its product through aten.{name}, which mixes its axes"
            if isinstance(geometry, str):
                moved = [geometry] * len(outs)
            elif name in _COPIES:
                moved = [geometry if tuple(o.shape) == tuple(geometry.shape) else mixed for o in outs]
            else:
                try:
                    moved = _tensors(func(geometry, *args[1:], **kwargs))
                    moved = [g if tuple(g.shape) == tuple(o.shape) else mixed for g, o in zip(moved, outs)]
                except Exception:  # noqa: BLE001 (not a view of the weight's entries: its rows are lost)
                    moved = [mixed] * len(outs)
            for o, g in zip(outs, moved):
                self.keep.append(o)
                self.geometry[id(o)] = (param, g)
            return
        stage = next((self.stage[id(a)] for a in inputs if id(a) in self.stage), None)
        if stage is not None:
            for o in outs:
                self.keep.append(o)
                self.stage[id(o)] = stage
        if not any(id(a) in self.tags for a in inputs):
            return
        if name in _COMPLEX_VIEWS and id(first) in self.tags:
            tags = self.tags[id(first)]
            if name == "view_as_complex":
                self.partners.update(zip(tags[..., 0].flatten().tolist(), tags[..., 1].flatten().tolist()))
            self._tag(outs[0], _COMPLEX_VIEWS[name](tags), surely=True)
            return
        if name in _COPIES:
            source = self.tags[id(first)]
            for o in outs:
                self._tag(o, source if tuple(o.shape) == tuple(source.shape) else self._lost(source, name, o.shape),
                          surely=True)
            return
        replaced, lost_in = self._tag_arguments(args)
        try:
            if lost_in is not None:
                raise ValueError
            moved = _tensors(func(*replaced, **kwargs))
        except Exception:  # noqa: BLE001 (an index computed on the meta device from data)
            tags = next(self.tags[id(a)] for a in inputs if id(a) in self.tags)
            moved = [self._lost(tags, f"reaches attention through aten.{name} with an index computed from data",
                                tuple(o.shape)) for o in outs]
        for o, t in zip(outs, moved):
            self._tag(o, t)

    def _tag_arguments(self, args):
        """``args`` with tagged tensors replaced by their tags, other data by untagged tags; an index
        tensor stays if it is real (returns the name of the first meta index otherwise)."""
        lost = []

        def replace(value):
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) in self.tags:  # contiguous: a view that works on the tensor works on its tags
                return self.tags[id(value)].contiguous()
            if value.is_floating_point():
                return torch.full(value.shape, UNTAGGED, dtype=torch.long)
            if value.is_meta:
                lost.append(value)
                return value
            return value.cpu()

        return tree_map(replace, args), (lost[0] if lost else None)

    def _pointwise(self, name: str, args, outs: list[torch.Tensor]) -> None:
        flat = _tensors(args)
        if name == "copy_":
            self._write(flat[0], flat[1])
            return
        tagged = [a for a in flat if id(a) in self.tags]
        if tagged:
            if name in ("add", "add_"):
                self.biases.update(self.geometry[id(a)][0] for a in flat
                                   if id(a) in self.geometry and a.ndim == 1 and self.tags[id(tagged[0])].min() >= 0)
            for o in outs:
                try:
                    self._tag(o, torch.broadcast_to(self.tags[id(tagged[0])], o.shape), surely=True)
                except RuntimeError:
                    continue
        stage = next((self.stage[id(a)] for a in flat if id(a) in self.stage), None)
        if stage is not None:
            for o in outs:
                self.keep.append(o)
                self.stage[id(o)] = stage
        first = flat[0] if flat else None
        if not tagged and first is not None and id(first) in self.geometry:
            param, geometry = self.geometry[id(first)]
            for o in outs:
                if not isinstance(geometry, str) and tuple(o.shape) == tuple(geometry.shape):
                    self.keep.append(o)
                    self.geometry[id(o)] = (param, geometry)

    def _write(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """``target.copy_(source)``: the target, and the tensor it is a view of, take the source's tags."""
        tags = (torch.broadcast_to(self.tags[id(source)], target.shape) if id(source) in self.tags
                else torch.full(target.shape, UNTAGGED, dtype=torch.long))
        self.tags.pop(id(target), None)
        self._tag(target, tags.contiguous())
        base = target._base
        if base is None:
            return
        size = base.untyped_storage().nbytes() // base.element_size()
        storage = torch.full((size,), UNTAGGED, dtype=torch.long)

        def positions(tensor: torch.Tensor) -> torch.Tensor:
            return torch.arange(size).as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

        if id(base) in self.tags:
            storage[positions(base).reshape(-1)] = self.tags[id(base)].reshape(-1)
        storage[positions(target).reshape(-1)] = tags.reshape(-1)
        self.tags.pop(id(base), None)
        self._tag(base, storage[positions(base)])

    # -- the result

    def result(self, layers: set[str]) -> AttentionTrace:
        """The trace's answer; ``layers``: paths of modules that are single layers (a projection's owner)."""
        heads: dict[int, dict[frozenset, str]] = {}  # source -> row set -> role
        values: dict[int, set[int]] = {}
        attention_of: dict[int, TracedAttention] = {}
        problems: list[tuple[str, str]] = []
        for event in (e for e in self.events if e.confirmed):
            sides = {"q": self._row_sets(event.q), "k": self._row_sets(event.k)}
            lost = {int(t) for sets in sides.values() for s in sets for t in s if t <= -2}
            lost |= {int(t) for v in event.v for s in self._row_sets(v) for t in s if t <= -2}
            for code in sorted(lost, reverse=True):  # in the order the losses happened
                param, what = self.losses[-2 - code]
                problems.append((_attention_module([param], layers), f"'{param}' {what}"))
            if lost:
                continue
            per_source = {role: [self._split(s) for s in sets] for role, sets in sides.items()}
            params = sorted({self.sources[src][0] for split in per_source.values() for p in split for src in p})
            attention = TracedAttention(
                _attention_module(params, layers), heads=len(set(sides["q"])), kv_heads=len(set(sides["k"])),
                query_features=len(set().union(*sides["q"])))
            for role, splits in per_source.items():
                for split in splits:
                    for source, rows in split.items():
                        heads.setdefault(source, {}).setdefault(rows, role)
                        attention_of.setdefault(source, attention)
            for v in event.v:
                for split in (self._split(s) for s in self._row_sets(v)):
                    for source, rows in split.items():
                        values.setdefault(source, set()).update(rows)
                        attention_of.setdefault(source, attention)
        for source in values.keys() - heads.keys():  # value weights apart from the query/key ones
            heads[source] = {}
        projections = {}
        for source, sets in heads.items():
            param, axis = self.sources[source]
            segments = _segments(self.shapes[param][axis], sets, values.get(source, set()))
            if isinstance(segments, str):
                problems.append((attention_of[source].module, f"'{param}' {segments}"))
                continue
            projections[param] = TracedProjection(param, axis, attention_of[source], segments)
        linear_maps = {param: axis for param, axis in self.linear_maps.items() if axis is not None}
        return AttentionTrace(projections, linear_maps, frozenset(self.biases), tuple(dict.fromkeys(problems)))

    def _row_sets(self, tags: torch.Tensor) -> list[frozenset[int]]:
        """The distinct row sets of the batch indices (untagged features dropped, complex partners added)."""
        sets = []
        for row in torch.unique(tags.sort(dim=1).values, dim=0).numpy():
            rows = set(np.unique(row).tolist()) - {UNTAGGED}
            sets.append(frozenset(rows | {self.partners[r] for r in rows if r in self.partners}))
        return [s for s in dict.fromkeys(sets) if s]

    def _split(self, rows: frozenset[int]) -> dict[int, frozenset[int]]:
        """Global row tags -> {source: its local rows}."""
        tags = np.array(sorted(t for t in rows if t >= 0), dtype=np.int64)
        sources = np.searchsorted(np.array(self.starts), tags, side="right") - 1
        return {int(source): frozenset((tags[sources == source] - self.starts[source]).tolist())
                for source in np.unique(sources)}


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors in an ATen op's arguments or results (tensors, and lists or tuples of them, nested)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _per_batch(tags: torch.Tensor) -> torch.Tensor:
    """``[..., m, n]`` tags -> ``[batch indices, m * n]``: one row per batch (and head) index."""
    return tags.reshape(-1, tags.shape[-2] * tags.shape[-1]) if tags.ndim > 2 else tags.reshape(1, -1)


def _segments(length: int, sets: dict[frozenset, str], values: set[int]) -> tuple[HeadSegment, ...] | str:
    """Consecutive segments of one weight's output rows, or what is wrong with its heads."""
    owner: dict[int, frozenset] = {}
    for rows in sets:
        for row in rows:
            if owner.setdefault(row, rows) != rows:
                return (f"has heads that share rows ({_span(owner[row])} and {_span(rows)}): "
                        "one block per output row kept")
        if max(rows) - min(rows) + 1 != len(rows):
            return (f"has a head of rows that are not contiguous ({_span(rows)}): the partition groups contiguous "
                    "rows, one block per output row kept")
    segments: list[HeadSegment] = []
    row = 0
    while row < length:
        rows = owner.get(row)
        role, size = (sets[rows], len(rows)) if rows else ("v" if row in values else "", 1)
        last = segments[-1] if segments else None
        if last and last.role == role and last.head == size and last.stop == row:
            segments[-1] = HeadSegment(role, last.start, row + size, size)
        else:
            segments.append(HeadSegment(role, row, row + size, size))
        row += size
    return tuple(segments)


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
