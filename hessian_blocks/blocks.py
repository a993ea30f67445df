"""Blocks and partitions of a model's parameters.

A *Block* is a named slice of one parameter tensor: the whole tensor, a contiguous group of
indices along one axis (an attention head, an output neuron, a token row) or along a merged run of
consecutive axes (an output row of one expert of a ``[experts, rows, columns]`` tensor), or a single
element. A *Rule* says how one parameter tensor is split into blocks; a *Partition* is an ordered
list of rules, one per parameter, checked against a model and resolved into blocks.

Partition files are JSON (docs/partition-format.md)::

    {"format": "hessian-blocks/partition", "version": 1,
     "model": {"class": "GPT", "param_shapes": {"wte.weight": [512, 128], ...}},
     "rules": [{"param": "wte.weight", "split": "groups", "axis": 0, "size": 1}, ...]}

Version 2 lets ``"axis"`` be a list of consecutive axes (``[0, 1]``: groups along the row-major merge
of axes 0 and 1); a file is written as version 2 only when some rule uses such a list.
"""

from __future__ import annotations

import fnmatch
import json
import numbers
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .files import atomic_write_text

__all__ = ["FORMAT", "SPLITS", "VERSION", "VERSIONS", "Axis", "Block", "Partition", "PartitionFileError", "Rule",
           "layer_indices", "runs_of", "straddling", "sample_layers", "select_blocks", "trainable_shapes"]

FORMAT = "hessian-blocks/partition"
VERSION = 2            # the newest version this release writes: 2 only where a rule merges axes, else 1
VERSIONS = (1, 2)      # the versions it reads
SPLITS = ("whole", "elements", "groups")

Axis = int | tuple[int, ...]  # one tensor axis, or a run of two or more consecutive axes, merged row-major


class PartitionFileError(ValueError):
    """A partition file (or its dict) is malformed or does not fit the model; the message names the file,
    the parameter or rule, and the fix."""


@dataclass(frozen=True)
class Block:
    """A contiguous slice of one parameter tensor.

    ``axis`` is the tensor axis the slice runs along, with ``start:stop`` the index range on it, or a
    tuple of consecutive axes (non-negative, increasing) merged into one axis in row-major order
    (their product its length: ``(0, 1)`` of ``[experts, rows, columns]`` runs over (expert, row)
    pairs); ``axis=None`` means a range of the flattened tensor (a whole tensor or a single element).
    """

    name: str
    param: str
    param_shape: tuple[int, ...]
    axis: Axis | None
    start: int
    stop: int

    @property
    def axes(self) -> tuple[int, ...]:
        """The tensor axes the slice runs along (one, or the merged run; empty for a flat range)."""
        return () if self.axis is None else (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the slice (1-D for flat ranges of a tensor with more than one element); merged
        axes count as one axis of length ``stop - start``."""
        if self.axis is None:
            if self.start == 0 and self.stop == _numel(self.param_shape):
                return self.param_shape
            return (self.stop - self.start,)
        first, last = self.axes[0], self.axes[-1]
        return self.param_shape[:first] + (self.stop - self.start,) + self.param_shape[last + 1 :]

    @property
    def numel(self) -> int:
        """Number of coordinates in the block."""
        return _numel(self.shape)

    def flat_indices(self) -> torch.Tensor:
        """Indices of the block's entries in the flattened parameter, in row-major order."""
        if self.axis is None:
            return torch.arange(self.start, self.stop)
        first, last = self.axes[0], self.axes[-1]
        merged = self.param_shape[:first] + (_numel(self.param_shape[first : last + 1]),) + self.param_shape[last + 1 :]
        index = torch.arange(_numel(self.param_shape)).reshape(merged)
        return index.narrow(first, self.start, self.stop - self.start).reshape(-1)


@dataclass(frozen=True)
class Rule:
    """How one parameter tensor splits into blocks.

    split="whole": one block; "elements": one block per entry; "groups": contiguous groups along
    ``axis``, either all of ``size`` indices or run-length ``runs`` of (group_size, count) pairs.
    ``axis`` is one tensor axis or a tuple of two or more consecutive increasing axes (a list is
    taken as a tuple, one axis in a list as that axis): the groups then run along the row-major
    merge of those axes, whose length is the product of theirs, and a group may not straddle an
    index of the outer merged axes (it lies inside one expert of ``(0, 1)`` on ``[experts, rows,
    columns]``, or covers whole experts). ``why`` records the evidence for the choice (free text,
    kept in partition files).
    """

    param: str
    split: str
    axis: Axis | None = None
    size: int | None = None
    runs: tuple[tuple[int, int], ...] | None = None
    why: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise TypeError(f"rule {self.param!r}: 'param' must be a parameter name (a non-empty string)")
        if not isinstance(self.split, str) or self.split not in SPLITS:
            raise ValueError(f"rule for '{self.param}': split must be one of {SPLITS}, got {self.split!r}")
        if self.why is not None and not isinstance(self.why, str):
            raise TypeError(f"rule for '{self.param}': 'why' must be a string, got {self.why!r}")
        if self.split == "groups":
            if self.axis is None:
                raise ValueError(f"rule for '{self.param}': split 'groups' needs an 'axis'")
            object.__setattr__(self, "axis", _axis(self.axis, self.param))
            if (self.size is None) == (self.runs is None):
                raise ValueError(f"rule for '{self.param}': split 'groups' needs exactly one of 'size' or 'runs'")
            if self.size is not None:
                object.__setattr__(self, "size", _integer(self.size, f"rule for '{self.param}': 'size'"))
                if self.size < 1:
                    raise ValueError(f"rule for '{self.param}': group size must be >= 1, got {self.size}")
            if self.runs is not None:
                object.__setattr__(self, "runs", _runs(self.runs, self.param))
        elif self.axis is not None or self.size is not None or self.runs is not None:
            raise ValueError(f"rule for '{self.param}': split '{self.split}' takes no axis, size or runs")

    @property
    def merged(self) -> bool:
        """Whether the groups run along a merged run of axes (a version-2 rule)."""
        return isinstance(self.axis, tuple)

    def axes(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The (non-negative) tensor axes the groups run along for a tensor of ``shape``: one axis,
        or the merged run (split='groups' only); an axis out of range raises."""
        ndim = len(shape)
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        if any(not -ndim <= a < ndim for a in axes):
            raise ValueError(f"rule for '{self.param}': axis {_axis_text(self.axis)} is out of range for shape "
                             f"{tuple(shape)} ({ndim} axes: 0..{ndim - 1}, or negative from the end)")
        return tuple(a % ndim for a in axes)

    def group_sizes(self, shape: Sequence[int]) -> list[int]:
        """Sizes of the groups along ``axis`` (the merged axes' product, if merged) for a tensor of
        ``shape`` (split='groups' only)."""
        axes = self.axes(shape)
        length = _numel([shape[a] for a in axes])
        where = (f"axis {axes[0]} of length {length}" if len(axes) == 1 else
                 f"axes {list(axes)} (merged length {' x '.join(str(shape[a]) for a in axes)} = {length})")
        if self.size is not None:
            if length % self.size:
                raise ValueError(
                    f"rule for '{self.param}': group size {self.size} does not divide {where} "
                    f"(shape {tuple(shape)}); use a divisor or run-length 'runs'"
                )
            sizes = [self.size] * (length // self.size)
        else:
            sizes = [s for s, c in self.runs for _ in range(c)]
            if sum(sizes) != length:
                raise ValueError(
                    f"rule for '{self.param}': runs {list(map(list, self.runs))} cover {sum(sizes)} indices "
                    f"but {where} (shape {tuple(shape)})"
                )
        if len(axes) > 1:
            self._check_straddles(shape, axes, sizes)
        return sizes

    def _check_straddles(self, shape: Sequence[int], axes: tuple[int, ...], sizes: list[int]) -> None:
        """Refuse a group that holds part of one index of an outer merged axis and part of the next
        (the last rows of one expert and the first of the next); see :func:`straddling`."""
        units = tuple(_numel([shape[a] for a in axes[level:]]) for level in range(1, len(axes)))
        found = straddling(sizes, units)
        if found is not None:
            g, level = found
            edges = np.cumsum([0, *sizes])
            outer = " x ".join(str(shape[a]) for a in axes[: level + 1])
            raise ValueError(
                f"rule for '{self.param}': group {g} (merged indices {edges[g]}:{edges[g + 1]}) straddles a "
                f"boundary of the outer merged axes {list(axes[: level + 1])} ({outer} indices of {units[level]} "
                f"slices each, shape {tuple(shape)}): a group must lie inside one index or cover whole ones; use a "
                f"group size that divides {units[level]} or is a multiple of it, or 'runs' that respect it"
            )

    def check(self, shape: Sequence[int]) -> None:
        """Raise a clear error unless this rule fits a parameter of ``shape`` (what :meth:`resolve` checks,
        without making the blocks)."""
        if _numel(shape) == 0:
            raise ValueError(f"parameter '{self.param}' has no entries (shape {tuple(shape)}): an empty block has no "
                             "spectrum")
        if self.split == "groups":
            self.group_sizes(shape)

    def resolve(self, shape: Sequence[int]) -> list[Block]:
        """The blocks this rule makes of a parameter of ``shape``."""
        shape = tuple(int(s) for s in shape)
        numel = _numel(shape)
        if numel == 0:
            self.check(shape)   # raises: an empty tensor has no block
        if self.split == "whole":
            return [Block(self.param, self.param, shape, None, 0, numel)]
        if self.split == "elements":
            return [Block(f"{self.param}[{i}]", self.param, shape, None, i, i + 1) for i in range(numel)]
        axes = self.axes(shape)
        axis = axes[0] if len(axes) == 1 else axes
        label = _axis_label(axes, len(shape))
        blocks, start = [], 0
        for size in self.group_sizes(shape):
            blocks.append(Block(f"{self.param}[{label} {start}:{start + size}]", self.param, shape, axis, start,
                                start + size))
            start += size
        return blocks

    def to_dict(self) -> dict:
        out: dict = {"param": self.param, "split": self.split}
        if self.axis is not None:
            out["axis"] = list(self.axis) if self.merged else self.axis
        if self.size is not None:
            out["size"] = self.size
        if self.runs is not None:
            out["runs"] = [list(r) for r in self.runs]
        if self.why is not None:
            out["why"] = self.why
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Rule:
        """A rule from its JSON object (the inverse of :meth:`to_dict`)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"each rule must be a JSON object like {{\"param\": ..., \"split\": ...}}, got {data!r}")
        unknown = set(data) - {"param", "split", "axis", "size", "runs", "why"}
        if unknown:
            raise ValueError(f"rule {dict(data)!r}: unknown keys {sorted(map(str, unknown))}")
        if "param" not in data or "split" not in data:
            raise ValueError(f"rule {dict(data)!r}: 'param' and 'split' are required")
        return cls(param=data["param"], split=data["split"], axis=data.get("axis"), size=data.get("size"),
                   runs=data.get("runs"), why=data.get("why"))



def straddling(sizes: Sequence[int], units: Sequence[int]) -> tuple[int, int] | None:
    """The first group of ``sizes`` (along a merged run of axes) that straddles an index of the outer
    axes, as (group, level), or None. ``units[level]`` is the number of slices per index of the merged
    axes before ``level + 1`` (for ``[0, 1]`` of ``[experts, rows, ...]``: ``(rows,)``); a group must lie
    inside one such index or cover whole ones, at every level."""
    edges = np.cumsum([0, *sizes])
    start, stop = edges[:-1], edges[1:]
    for level, unit in enumerate(units):
        bad = np.flatnonzero(~((start // unit == (stop - 1) // unit) | ((start % unit == 0) & (stop % unit == 0))))
        if bad.size:
            return int(bad[0]), level
    return None


def runs_of(sizes: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Run-length encoding of group sizes as (group size, count) pairs, the inverse of
    :meth:`Rule.group_sizes`: ``[8, 8, 1, 1, 1]`` -> ``((8, 2), (1, 3))``."""
    runs: list[tuple[int, int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1] = (size, runs[-1][1] + 1)
        else:
            runs.append((size, 1))
    return tuple(runs)


def layer_indices(param: str) -> tuple[int, ...]:
    """The integer components of a parameter path, outermost first: the positions of the tensor in
    the repeated containers it sits in (``"h.3.mlp.0.weight"`` -> ``(3, 0)``; ``"wte.weight"`` -> ``()``)."""
    return tuple(int(part) for part in param.split(".") if part.isdecimal())


@dataclass
class Partition:
    """One rule per parameter tensor of a model, resolved into blocks.

    Build it with :meth:`per_tensor` (the papers' default: one block per tensor),
    :meth:`from_rules` or :meth:`load`; every constructor checks the rules against the model. The
    blocks are made when first asked for (a Mixtral-8x7B shape has 8.6 million; an optimizer reads
    the rules only).
    """

    rules: list[Rule]
    param_shapes: dict[str, tuple[int, ...]]
    model_class: str | None = None

    def __post_init__(self) -> None:
        self.param_shapes = {name: tuple(int(s) for s in shape) for name, shape in self.param_shapes.items()}
        seen: set[str] = set()
        for rule in self.rules:
            if rule.param in seen:
                raise ValueError(f"partition has two rules for parameter '{rule.param}': keep exactly one")
            if rule.param not in self.param_shapes:
                raise ValueError(f"partition has a rule for '{rule.param}', which is not a trainable parameter of the "
                                 "model")
            seen.add(rule.param)
        missing = [name for name in self.param_shapes if name not in seen]
        if missing:
            raise ValueError(f"partition has no rule for parameter(s) {missing}: every parameter needs exactly one "
                             "rule")
        by_param = {rule.param: rule for rule in self.rules}
        self.rules = [by_param[name] for name in self.param_shapes]
        for rule in self.rules:
            rule.check(self.param_shapes[rule.param])

    @cached_property
    def blocks(self) -> list[Block]:
        """Every rule's blocks, in parameter order."""
        return [block for rule in self.rules for block in rule.resolve(self.param_shapes[rule.param])]

    @classmethod
    def from_rules(cls, model: torch.nn.Module, rules: Iterable[Rule]) -> Partition:
        """A partition of ``model``'s trainable parameters with the given rules (one per parameter)."""
        return cls(list(rules), trainable_shapes(model), type(model).__name__)

    @classmethod
    def per_tensor(cls, model: torch.nn.Module) -> Partition:
        """One block per trainable parameter tensor (the papers' blockwise spectra)."""
        return cls.from_rules(model, [Rule(name, "whole") for name in trainable_shapes(model)])

    @property
    def version(self) -> int:
        """The file version this partition needs: 2 when some rule merges axes, else 1 (readable by
        older releases)."""
        return 2 if any(rule.merged for rule in self.rules) else 1

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": self.version,
            "model": {"class": self.model_class, "param_shapes": {k: list(v) for k, v in self.param_shapes.items()}},
            "rules": [rule.to_dict() for rule in self.rules],
        }

    def save(self, path: str | Path) -> Path:
        """Write the partition file (JSON) to ``path``, atomically: a reader never sees half of it."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module | None = None) -> Partition:
        """Read a partition file; with ``model``, check that it fits the model's parameters.

        A file that is not valid JSON, is malformed, or does not fit ``model`` raises
        :class:`PartitionFileError` naming the file and the problem.
        """
        path = Path(path)
        if path.is_dir():
            raise PartitionFileError(f"partition file '{path}' is a folder: pass the JSON file itself")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"partition file '{path}' does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PartitionFileError(f"partition file '{path}' is not valid JSON: {err}") from None
        return cls.from_dict(data, model, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping, model: torch.nn.Module | None = None, *, source: str = "partition") -> Partition:
        """A partition from the JSON object of a partition file (``source`` names it in errors);
        malformed data raise :class:`PartitionFileError`."""
        try:
            return cls._from_dict(data, model, source)
        except PartitionFileError:
            raise
        except (ValueError, TypeError) as err:
            raise PartitionFileError(f"{source}: {err}") from None

    @classmethod
    def _from_dict(cls, data: object, model: torch.nn.Module | None, source: str) -> Partition:
        layout = '{"format": ..., "version": ..., "model": {"param_shapes": ...}, "rules": [...]}'
        if not isinstance(data, Mapping):
            raise TypeError(f"a partition file holds one JSON object {layout}, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"'format' must be {FORMAT!r}, got {data.get('format')!r}")
        version = data.get("version")
        if isinstance(version, bool) or version not in VERSIONS:
            raise ValueError(f"unsupported version {version!r} (this release reads versions "
                             f"{', '.join(map(str, VERSIONS))}): load it with the (newer) hessian-blocks that wrote it")
        described = data.get("model", {})
        if not isinstance(described, Mapping):
            raise TypeError(f"'model' must be an object {{\"class\": ..., \"param_shapes\": ...}}, got {described!r}")
        recorded = _param_shapes(described.get("param_shapes", {}))
        rules = data.get("rules", [])
        if not isinstance(rules, list):
            raise TypeError(f"'rules' must be a list of rule objects, got {type(rules).__name__}")
        if version == 1:
            merged = next((r for r in rules if isinstance(r, Mapping) and isinstance(r.get("axis"), (list, tuple))),
                          None)
            if merged is not None:
                raise ValueError(f"rule for '{merged.get('param')}': 'axis' {merged.get('axis')!r} (a list of axes) "
                                 "needs a version-2 file: write \"version\": 2")
        rules = [Rule.from_dict(r) for r in rules]
        model_class = described.get("class")
        if model is None:
            if not recorded:
                raise ValueError("'model.param_shapes' is missing; pass the model to check the rules against")
            return cls(rules, recorded, model_class if isinstance(model_class, str) else None)
        actual = trainable_shapes(model)
        for name, shape in recorded.items():
            if name in actual and actual[name] != shape:
                raise ValueError(
                    f"parameter '{name}' has shape {list(shape)} in the file but {list(actual[name])} in the model; "
                    "the partition was made for another model size: derive it again for this model"
                )
        try:
            return cls(rules, actual, type(model).__name__)
        except ValueError as err:
            raise PartitionFileError(f"{source} does not fit {type(model).__name__}: {err}") from None


def trainable_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters that require grad, in ``named_parameters`` order."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def select_blocks(blocks: Sequence[Block], patterns: Sequence[str]) -> list[Block]:
    """Blocks whose block name or parameter name matches any of the glob ``patterns``, in order.

    A pattern that matches nothing is an error (a typo would otherwise silently drop blocks).
    """
    chosen = []
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(b.name, pattern) or fnmatch.fnmatchcase(b.param, pattern) for b in blocks):
            raise ValueError(f"block pattern {pattern!r} matches no block; parameter names look like "
                             f"{_examples(blocks)}")
    for block in blocks:
        if any(fnmatch.fnmatchcase(block.name, p) or fnmatch.fnmatchcase(block.param, p) for p in patterns):
            chosen.append(block)
    return chosen


def sample_layers(blocks: Sequence[Block], n_layers: int = 3) -> list[Block]:
    """The papers' "sample of layers": matrix blocks of ``n_layers`` evenly spaced layers plus the
    matrix blocks outside the repeated layers (embeddings, output head).

    A *layer* is an entry of the first repeated container in the module tree (``h.3`` of
    ``h.3.attn.c_attn.weight``: the path up to its first integer component); matrices in a later
    container (a VGG's ``classifier.0`` after its ``features.N``) count as outside the layers, like the
    head. A *matrix block* belongs to a parameter with two or more dimensions.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    matrices = [b for b in blocks if len(b.param_shape) >= 2]
    layer = {b.param: _layer_of(b.param) for b in matrices}
    container = next((place[0] for place in layer.values() if place is not None), None)
    index = {param: place[1] for param, place in layer.items() if place is not None and place[0] == container}
    layers = sorted(set(index.values()))
    if len(layers) <= n_layers:
        kept = set(layers)
    else:
        positions = torch.linspace(0, len(layers) - 1, n_layers).round().long().tolist()
        kept = {layers[i] for i in positions}
    return [b for b in matrices if b.param not in index or index[b.param] in kept]


def _layer_of(param: str) -> tuple[str, int] | None:
    """(container, index) of a parameter's first integer path component (``("h", 3)`` of
    ``h.3.attn.c_attn.weight``; see :func:`layer_indices`), or None outside every repeated container."""
    parts = param.split(".")
    first = next((i for i, part in enumerate(parts) if part.isdecimal()), None)
    return None if first is None else (".".join(parts[:first]), int(parts[first]))


def _integer(value: object, what: str) -> int:
    """``value`` as an int; booleans, floats and strings are refused (JSON ``true`` is not 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__}); write a number "
                        "without quotes, e.g. 8")
    return int(value)


def _axis(axis: object, param: str) -> Axis:
    """A rule's ``axis``: an integer, or a list/tuple of consecutive increasing integers (one entry: that
    axis); negative entries count from the end, all of one sign."""
    what = f"rule for '{param}': 'axis'"
    if isinstance(axis, (list, tuple)):
        axes = tuple(_integer(a, f"{what} entry") for a in axis)
        if not axes:
            raise ValueError(f"{what} is an empty list: give one axis (e.g. 0) or consecutive axes (e.g. [0, 1])")
        if len(axes) == 1:
            return axes[0]
        if any(b != a + 1 for a, b in zip(axes, axes[1:])) or (axes[0] < 0) != (axes[-1] < 0):
            raise ValueError(f"{what} {list(axes)} must be consecutive increasing axes of one sign, e.g. [0, 1] or "
                             "[-2, -1]: groups run along the row-major merge of neighbouring axes only (for other "
                             "axes, reorder the parameter or write one rule per axis)")
        return axes
    return _integer(axis, what)


def _axis_text(axis: Axis) -> str:
    return str(list(axis)) if isinstance(axis, tuple) else str(axis)


def _runs(runs: object, param: str) -> tuple[tuple[int, int], ...]:
    """Run-length ``runs`` as a tuple of (group_size, count) pairs of positive integers."""
    what = f"rule for '{param}': 'runs'"
    if isinstance(runs, (str, bytes, Mapping)) or not isinstance(runs, Iterable):
        raise TypeError(f"{what} must be a list of [group_size, count] pairs, got {runs!r}")
    pairs = []
    for run in runs:
        entries = None if isinstance(run, (str, bytes, Mapping)) or not isinstance(run, Iterable) else list(run)
        if entries is None or len(entries) != 2:
            raise TypeError(f"{what} must be a list of [group_size, count] pairs, got the entry {run!r}")
        pairs.append((_integer(entries[0], f"{what} group size"), _integer(entries[1], f"{what} count")))
    if not pairs or any(s < 1 or c < 1 for s, c in pairs):
        raise ValueError(f"{what} must be non-empty [group_size, count] pairs of positive integers, got "
                         f"{[list(p) for p in pairs]}")
    return tuple(pairs)


def _param_shapes(shapes: object) -> dict[str, tuple[int, ...]]:
    """The ``model.param_shapes`` object of a partition file: parameter name -> list of sizes."""
    if not isinstance(shapes, Mapping):
        raise TypeError(f"'model.param_shapes' must map each parameter name to its shape, e.g. "
                        f"{{\"fc.weight\": [16, 8]}}, got {shapes!r}")
    checked = {}
    for name, shape in shapes.items():
        if isinstance(shape, (str, bytes, Mapping)) or not isinstance(shape, Iterable):
            raise TypeError(f"'model.param_shapes' of '{name}' must be a list of sizes, got {shape!r}")
        sizes = tuple(_integer(s, f"a size in 'model.param_shapes' of '{name}'") for s in shape)
        if any(s < 0 for s in sizes):
            raise ValueError(f"'model.param_shapes' of '{name}' has a negative size: {list(sizes)}")
        checked[name] = sizes
    return checked


def _axis_label(axes: tuple[int, ...], ndim: int) -> str:
    if len(axes) > 1:
        return f"axes{axes[0]}-{axes[-1]}"
    (axis,) = axes
    if ndim >= 2 and axis == 0:
        return "rows"
    if ndim == 2 and axis == 1:
        return "cols"
    return f"axis{axis}"


def _examples(blocks: Sequence[Block]) -> str:
    names = list(dict.fromkeys(b.param for b in blocks))
    return ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
