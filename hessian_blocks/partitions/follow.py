"""Row tags followed through a forward, ATen op by ATen op (the machinery of :mod:`.trace`).

:class:`RowFollower` is a ``TorchDispatchMode``: every op runs unchanged, and beside each tensor
that carries a projection's output features it keeps a real integer tensor of the same shape, the
*row tags* (which row of which weight each feature comes from):

- a projection is a matrix product (``mm``/``addmm``/``bmm``/``baddbmm``/``_grouped_mm``, which
  ``nn.Linear``, HF ``Conv1D``, ``matmul``, ``einsum`` and mixture-of-experts kernels become) with
  one operand a view of a parameter; the view's strides (followed on a meta "geometry" tensor of the
  parameter's shape) say which axes of the parameter it contracts and along which its output
  features run: the weight's rows (``nn.Linear``, ``[out, in]``), columns (``Conv1D``, ``[in, out]``),
  which ones (a slice of a fused weight), and for a tensor of experts (``[experts, out, in]``, one
  expert picked per product or all of them batched or grouped) the axes beside the contracted one;
- views, reshapes, transposes, splits, chunks, indexing, ``cat``/``stack``, copies and writes into
  slices move the tags with the features (the same op runs on the tag tensor); pointwise ops and
  normalisations keep them (rotary embeddings, casts, q/k norms); reductions and other products
  drop them;
- a product with a tagged operand whose result reaches a softmax is a score product (``q . k^T``);
  the product of its softmax with a tagged tensor is the value product;
  ``scaled_dot_product_attention`` (fused, or its math decomposition) is both.

What cannot be followed (a weight reshaped across its axes, an index computed from data on the
meta device) turns the tags into a *loss*: a negative code naming the weight and the op.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["Event", "RowFollower"]

UNTAGGED = -1  # a feature that comes from no projection; tags <= -2 encode a loss (what could not be followed)
_PRODUCTS = {"mm": (None, 0, 1), "bmm": (None, 0, 1), "addmm": (0, 1, 2), "baddbmm": (0, 1, 2),  # (bias, a, b)
             "_grouped_mm": (None, 0, 1)}   # tokens grouped by expert: [tokens, in] x [experts, in, out]
_PICKS = {"index", "index_select"}  # a parameter indexed along its first axis by a tensor: the experts a product uses
_SOFTMAX = {"_softmax", "_safe_softmax", "softmax"}
# elementwise ops that ATen does not tag pointwise (a mask filled with a 0-dim tensor's value: CPM-Ant's scores)
_POINTWISE_UNTAGGED = {"copy_", "masked_fill"}
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


@dataclass
class Event:
    """A product of two tagged tensors; an attention once its result reaches a softmax."""

    q: torch.Tensor  # tags [batch indices, features of one head]
    k: torch.Tensor
    confirmed: bool = False
    v: list[torch.Tensor] = field(default_factory=list)


class RowFollower(TorchDispatchMode):
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
        self.stage: dict[int, tuple[str, Event]] = {}  # id -> ("scores" | "probs", event)
        self.sources: list[tuple[str, int | tuple[int, ...]]] = []  # (param, output axes); tags start at starts[s]
        self.starts: list[int] = []
        self.losses: list[tuple[str, str]] = []  # (param, what could not be followed); tag -2 - index
        self.events: list[Event] = []
        self.biases: set[str] = set()
        self.linear_maps: dict[str, tuple[int, ...] | None] = {}  # param -> axes not contracted (None: differ)
        self.picks: set[int] = set()  # geometries of a parameter indexed along its first axis (an expert's bias)
        self.partners: dict[int, int] = {}  # real-part row tag -> imaginary-part row tag (complex views)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except RuntimeError:
            out = _meta_grouped_mm(func, args, kwargs)   # its meta kernel takes bfloat16 only
            if out is None:
                raise
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

    def length(self, source: int) -> int:
        """The number of rows of a source: its axis' length (merged axes: their product)."""
        param, axis = self.sources[source]
        return math.prod(self.shapes[param][a] for a in ((axis,) if isinstance(axis, int) else axis))

    def _rows(self, param: str, axis: int | tuple[int, ...]) -> int:
        """The first row tag of ``param``'s output axis (or merged axes; allocated on first use)."""
        if (param, axis) not in self.sources:
            self.starts.append(self.starts[-1] + self.length(len(self.sources) - 1) if self.sources else 0)
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
        elif torch.Tag.pointwise in func.tags or name in _POINTWISE_UNTAGGED:
            self._pointwise(name, args, outs)
        elif name in _NORMS and id(args[0]) in self.tags and tuple(outs[0].shape) == tuple(args[0].shape):
            self._tag(outs[0], self.tags[id(args[0])], surely=True)

    def _product(self, name: str, args, out: torch.Tensor) -> None:
        bias_at, a_at, b_at = _PRODUCTS[name]
        a, b = args[a_at], args[b_at]
        if (id(a) in self.geometry) != (id(b) in self.geometry):   # a projection: the weight is one operand
            left = id(a) in self.geometry
            param, geometry = self.geometry[id(a) if left else id(b)]
            tags = self._projection(param, geometry, tuple(out.shape), left, grouped=name == "_grouped_mm")
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

    def _event(self, q: torch.Tensor, k: torch.Tensor) -> Event:
        """Score product of ``q`` and ``k`` (either transposed): per batch index, the rows each contracts."""
        event = Event(_per_batch(q), _per_batch(k))
        self.events.append(event)
        return event

    def _projection(self, param: str, geometry: torch.Tensor | str, shape: tuple[int, ...], left: bool,
                    grouped: bool) -> torch.Tensor:
        """Row tags of a projection's output ``[..., m, n]`` from the geometry of its weight operand: the
        right one (``[..., k, n]``: features along its last dim) or the ``left`` one (``[..., m, k]``).
        ``grouped``: the product's batch (experts) is not in its output (``_grouped_mm``)."""
        if isinstance(geometry, str) or len(self.shapes[param]) < 2:
            what = geometry if isinstance(geometry, str) else "is a vector used as a matrix"
            return self._loss(param, f"(shape {list(self.shapes[param])}) {what}", shape)
        placed = _place(self.shapes[param], geometry.transpose(-2, -1) if left else geometry, grouped)
        if isinstance(placed, str):
            return self._loss(param, f"(shape {list(self.shapes[param])}) {placed}", shape)
        axes, kept, index = placed
        self.linear_maps[param] = kept if self.linear_maps.get(param, kept) == kept else None
        tags = self._rows(param, axes[0] if len(axes) == 1 else axes) + index  # [batch, features]
        if tags.shape[0] * shape[-2] * shape[-1] != math.prod(shape):
            return self._loss(param, "enters a product whose output the trace cannot lay out", shape)
        tags = tags[:, :, None] if left else tags[:, None, :]
        return tags.expand(tags.shape[0], shape[-2], shape[-1]).reshape(shape)

    def _move(self, func, name: str, args, kwargs, outs: list[torch.Tensor]) -> None:
        inputs = _tensors(args)
        first = inputs[0] if inputs else None
        if first is not None and id(first) in self.geometry:  # a view or copy of a weight
            param, geometry = self.geometry[id(first)]
            mixed = f"enters its product through aten.{name}, which mixes its axes"
            if isinstance(geometry, str):
                moved = [geometry] * len(outs)
            elif name in _PICKS and (picked := _pick(name, geometry, args)) is not None:
                moved = [picked if tuple(picked.shape) == tuple(outs[0].shape) else mixed]
                self.picks.update(id(o) for o in outs)
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
                self.biases.update(self.geometry[id(a)][0] for a in flat if id(a) in self.geometry
                                   and (a.ndim == 1 or id(a) in self.picks) and self.tags[id(tagged[0])].min() >= 0)
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

    def row_sets(self, tags: torch.Tensor) -> list[frozenset[int]]:
        """The distinct row sets of the batch indices (untagged features dropped, complex partners added)."""
        sets = []
        for row in torch.unique(tags.sort(dim=1).values, dim=0).numpy():
            rows = set(np.unique(row).tolist()) - {UNTAGGED}
            sets.append(frozenset(rows | {self.partners[r] for r in rows if r in self.partners}))
        return [s for s in dict.fromkeys(sets) if s]

    def split(self, rows: frozenset[int]) -> dict[int, frozenset[int]]:
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


def _place(shape: tuple[int, ...], geometry: torch.Tensor, grouped: bool
           ) -> tuple[tuple[int, ...], tuple[int, ...], torch.Tensor] | str:
    """Where a weight operand ``[*batch, depth, width]`` (a view of a parameter of ``shape``) sits in it:
    (the parameter axes its output features run along, over the batch too unless ``grouped``; the axes
    it does not contract; ``[batch, width]`` feature indices along the former, row-major), or what the
    trace cannot read. The contracted axes must be apart from the feature axes: then every entry of the
    view is (feature position) + (depth position) in the parameter, exactly."""
    *batch, depth, width = geometry.shape
    strides = geometry.stride()
    flat = np.full((1, 1), geometry.storage_offset(), dtype=np.int64)
    for size, stride in ([] if grouped else list(zip(batch, strides[:-2]))):
        flat = (flat[:, None] + np.arange(size)[None, :, None] * stride).reshape(-1, 1)
    flat = flat + np.arange(width)[None, :] * strides[-1]
    contiguous = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
    try:
        grid = np.stack(np.unravel_index(flat.reshape(-1), shape), axis=-1)               # [positions, ndim]
        span = np.stack(np.unravel_index(geometry.storage_offset() + np.arange(depth) * strides[-2], shape), -1)
    except ValueError:
        return "enters its product with strides the trace cannot read"
    moving = [a for a in range(len(shape)) if (grid[:, a] != grid[0, a]).any()]
    contracted = ([a for a in range(len(shape)) if (span[:, a] != span[0, a]).any()] if depth > 1 else
                  [a for a in range(len(shape)) if contiguous[a] == strides[-2] and a not in moving][-1:])
    if not contracted or set(contracted) & set(moving):
        return "enters its product with strides the trace cannot read"
    kept = tuple(a for a in range(len(shape)) if a not in contracted)
    axes = tuple(moving) or kept
    index = np.ravel_multi_index(tuple(grid[:, list(axes)].T), tuple(shape[a] for a in axes))
    return axes, kept, torch.from_numpy(index.reshape(flat.shape))


def _pick(name: str, geometry: torch.Tensor, args) -> torch.Tensor | None:
    """The geometry of ``parameter[index]`` (``index_select`` along dim 0): entry 0 of its first axis,
    repeated (the experts picked are data: any one of them has the same rows and columns), or None
    when the index is not one integer tensor along the first axis."""
    index = (args[1][0] if len(args[1]) == 1 else None) if name == "index" else (args[2] if args[1] == 0 else None)
    if not isinstance(index, torch.Tensor) or index.dtype in (torch.bool, torch.uint8) or geometry.ndim < 2:
        return None
    picked = geometry.select(0, 0)
    return picked.reshape((1,) * index.ndim + tuple(picked.shape)).expand(*index.shape, *picked.shape)


def _meta_grouped_mm(func, args, kwargs) -> torch.Tensor | None:
    """The output of ``_grouped_mm`` (``[tokens, in] x [experts, in, out]``) on the meta device, whose
    kernel there refuses every dtype but bfloat16 (only shapes matter here); None for anything else."""
    if func.overloadpacket.__name__ != "_grouped_mm" or len(args) < 2:
        return None
    a, b = args[:2]
    if not (a.is_meta and b.is_meta and a.ndim == 2 and b.ndim == 3):
        return None
    return torch.empty(a.shape[0], b.shape[-1], dtype=kwargs.get("out_dtype") or a.dtype, device="meta")


def _per_batch(tags: torch.Tensor) -> torch.Tensor:
    """``[..., m, n]`` tags -> ``[batch indices, m * n]``: one row per batch (and head) index."""
    return tags.reshape(-1, tags.shape[-2] * tags.shape[-1]) if tags.ndim > 2 else tags.reshape(1, -1)
