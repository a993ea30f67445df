"""The Adam-mini update as hand-written Triton kernels: what ``fused=True`` means on CUDA, and the CUDA default.

The update (:mod:`optim.update`) needs, per block, the mean of ``g**2`` over the block before any
coordinate of the block can move. A :class:`WorkTable`, built once per list of parameter layouts
(:class:`~optim.layout.BlockLayout`), cuts every parameter of the list into *items*, rows of int64
numbers that say where a program's blocks lie:

* blocks of at most :data:`MAX_BLOCK` coordinates: a *tile* of ``R`` blocks of ``N`` coordinates
  (``N`` the block size rounded up to a power of two, ``R * N = max(N, TILE)``) per program. The
  program loads the gradient once, reduces each block's ``g**2``, updates its second moments and then
  the coordinates: every element is read and written once. One launch per tile size ``N``.
* larger blocks (a head of ``64 x 768`` rows, a whole big tensor): *chunks* of :data:`CHUNK`
  coordinates. A first launch writes each chunk's sum of ``g**2`` (and, for chunk 0, the block's
  old second moment) to a scratch buffer; a second launch sums a block's partial sums in a fixed
  order in every program of the block (the same number everywhere, deterministic), updates the
  coordinates, and chunk 0 stores the block's new second moment.

A block of a :class:`~optim.layout.Segment` is ``outer`` runs of ``size * inner`` contiguous
coordinates, ``length * inner`` apart: every layout kind of the partition format (whole, elements,
rows, columns, heads, run lists, interleaved runs) is such a set of segments, so one addressing
rule serves them all.

Tensor addresses live in a device table of int64 pointers per parameter (parameter, gradient,
first moment, per-block second moments, step count) and the hyperparameters of each param group
(lr, betas, eps, weight decay, the sign of ``maximize``) in a float64 device table. Both are copied
to the device (from pinned memory, asynchronously) only when they change, the step counts are
device tensors incremented on the device, and the bias corrections are computed in the kernels from
them: no host synchronisation, no recompilation when a scheduler changes the learning rate, and a
step whose tables did not change launches only kernels (it can be captured in a CUDA graph).

Arithmetic is float32 for float32, bfloat16 and float16 parameters (the first moment is stored in
its own dtype, e.g. bfloat16 with ``state_dtype=torch.bfloat16``); the bias corrections are
float64. Tests run these kernels on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .layout import BlockLayout

__all__ = ["CHUNK", "MAX_BLOCK", "TILE", "KERNEL_DTYPES", "ParamTables", "WorkTable", "interpreted", "kernel_update",
           "unavailable_reason", "work_table"]

# powers of two (Triton's block shapes): a tile holds R blocks of N coordinates, R * N = max(N, TILE)
TILE = 4096       # coordinates one program of the tile kernel covers
MAX_BLOCK = 8192  # blocks up to this many coordinates are updated in one pass by one program
CHUNK = 4096      # coordinates per program for larger blocks (two launches)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # parameter / gradient / first-moment dtypes
MAX_WORK_TABLES = 64  # work tables (and parameter lists' tables) kept per process (least recently used dropped)

# columns of the tables (int64 rows)
_SLOT_COLUMNS = 6   # parameter, gradient, first moment, second moments, step (addresses); param group
_HYPER_COLUMNS = 6  # lr, beta1, beta2, eps, weight decay, sign (-1 to maximize)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(params: Sequence[torch.Tensor]) -> str:
    """Why the kernels cannot update ``params`` ("" when they can)."""
    if not _has_triton():
        return "Triton is not installed (pip install triton)"
    devices = {p.device for p in params}
    if len(devices) != 1:
        return f"the parameters are on several devices ({', '.join(sorted(map(str, devices)))})"
    device = next(iter(devices))
    if device.type == "cpu" and not interpreted():
        return "the Triton kernels run on CUDA (on the CPU only in Triton's interpreter, TRITON_INTERPRET=1)"
    if device.type not in ("cuda", "cpu"):
        return f"the Triton kernels run on CUDA, not on {device.type}"
    wrong = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype not in KERNEL_DTYPES})
    if wrong:
        return ("the kernels compute in float32 and take float32, bfloat16 and float16 parameters, "
                f"not {', '.join(wrong)}")
    return ""


# -- the kernels ------------------------------------------------------------------------------------


def _kernels():
    """The jitted kernels (:mod:`optim._triton`), imported on first use: importing optim needs no
    Triton, and Triton decides when they are defined whether they run in its interpreter."""
    from . import _triton

    return _triton.tiles, _triton.chunk_sums, _triton.chunk_updates


# -- the work table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileClass:
    """The tiles of one kernel specialisation: blocks of at most ``n`` coordinates, ``r`` per program;
    ``aligned``: every item's first coordinate and block size are multiples of 8 (16-byte accesses)."""

    n: int
    r: int
    contiguous: bool
    aligned: bool
    items: np.ndarray  # [programs, 7] int64


@dataclass(frozen=True)
class ChunkClass:
    """The chunks of large blocks of one addressing kind (contiguous or strided, aligned or not)."""

    contiguous: bool
    aligned: bool
    items: np.ndarray  # [programs, 9] int64


class WorkTable:
    """Where every program of the kernels works, for one list of layouts (module docstring).

    Built on the host once per list (:func:`work_table`); its device copies are made once per device.
    """

    def __init__(self, layouts: Sequence[BlockLayout]):
        self.layouts = tuple(layouts)
        tiles: dict[tuple[int, bool, bool], list[np.ndarray]] = {}
        chunks: dict[tuple[bool, bool], list[np.ndarray]] = {}
        partials = 0
        for slot, layout in enumerate(self.layouts):
            for segment in layout.segments:
                size, run = segment.block_numel, segment.size * segment.inner
                stride, contiguous = segment.length * segment.inner, segment.outer == 1
                first = segment.start * segment.inner
                aligned = contiguous and first % 8 == 0 and size % 8 == 0
                blocks = np.arange(segment.groups, dtype=np.int64)
                if size <= MAX_BLOCK:
                    n = 1 << (size - 1).bit_length()
                    r = max(1, TILE // n)
                    starts = blocks[::r]
                    rows = np.stack([np.full_like(starts, slot), first + starts * run, segment.first_block + starts,
                                     np.minimum(r, segment.groups - starts), np.full_like(starts, size),
                                     np.full_like(starts, run), np.full_like(starts, stride)], axis=1)
                    tiles.setdefault((n, contiguous, aligned), []).append(rows)
                    continue
                n_chunks = -(-size // CHUNK)
                block = np.repeat(blocks, n_chunks)
                chunk = np.tile(np.arange(n_chunks, dtype=np.int64), segment.groups)
                rows = np.stack([np.full_like(block, slot), first + block * run, segment.first_block + block,
                                 np.full_like(block, size), np.full_like(block, run), np.full_like(block, stride),
                                 chunk, partials + block * (n_chunks + 1), np.full_like(block, n_chunks)], axis=1)
                chunks.setdefault((contiguous, aligned), []).append(rows)
                partials += segment.groups * (n_chunks + 1)
        self.tiles = tuple(TileClass(n, max(1, TILE // n), contiguous, aligned, np.concatenate(rows))
                           for (n, contiguous, aligned), rows in sorted(tiles.items()))
        self.chunks = tuple(ChunkClass(contiguous, aligned, np.concatenate(rows))
                            for (contiguous, aligned), rows in sorted(chunks.items()))
        self.n_partials = partials
        self._items: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def launches(self) -> int:
        """Kernel launches per step (besides the step-count increment)."""
        return len(self.tiles) + 2 * len(self.chunks)

    def items_on(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The device copies of the tile and chunk items (made once per device)."""
        if device not in self._items:
            self._items[device] = ([torch.from_numpy(c.items.reshape(-1)).to(device) for c in self.tiles],
                                   [torch.from_numpy(c.items.reshape(-1)).to(device) for c in self.chunks])
        return self._items[device]


@dataclass(eq=False)
class ParamTables:
    """The device tables of one list of parameters: their addresses, their param groups'
    hyperparameters, and the scratch of the chunked launches. Each list of parameters has its own
    (a step captured in a CUDA graph keeps reading these buffers), refilled only when they change."""

    work: WorkTable                        # kept alive: its id is part of this table's key
    partials: torch.Tensor                 # the chunks' partial sums and old second moments
    slots: torch.Tensor | None = None      # [slots, 6] int64: 5 addresses and the param group's row of hyper
    slot_key: tuple | None = None
    aligned: bool = False                  # every address of ``slots`` (but the step's) is a multiple of 16
    hyper: torch.Tensor | None = None      # [groups, 6] float64
    hyper_key: tuple | None = None


def work_table(layouts: Sequence[BlockLayout]) -> WorkTable:
    """The work table of ``layouts``, built once per process and list (:data:`MAX_WORK_TABLES` kept)."""
    return _cached(_TABLES, tuple(layouts), lambda: WorkTable(layouts))


def _cached(cache: OrderedDict, key: tuple, make):
    """``cache[key]``, made when missing; the :data:`MAX_WORK_TABLES` most recently used are kept."""
    value = cache.pop(key, None) or make()
    cache[key] = value  # now the most recently used
    while len(cache) > MAX_WORK_TABLES:
        cache.popitem(last=False)
    return value


_TABLES: OrderedDict[tuple[BlockLayout, ...], WorkTable] = OrderedDict()
_PARAM_TABLES: OrderedDict[tuple, ParamTables] = OrderedDict()


# -- one step -------------------------------------------------------------------------------------------


def kernel_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    block_avgs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    layouts: Sequence[BlockLayout],
    groups: Sequence[int],
    hyper: Sequence[tuple[float, float, float, float, float, float]],
) -> None:
    """One Adam-mini step of ``params``, in place, by the kernels (see :func:`unavailable_reason`).

    ``steps`` are float32 0-d tensors on the parameters' device, incremented here (on the device);
    ``groups[i]`` is parameter i's row of ``hyper``, whose rows are
    ``(lr, beta1, beta2, eps, weight_decay, sign)`` with sign -1 to maximize. Gradients and first
    moments are contiguous, shaped like the parameters; second moments float32, one per block.
    """
    if not params:
        return
    device = params[0].device
    owner = work_table(layouts)
    tile_items, chunk_items = owner.items_on(device)
    tables = _cached(_PARAM_TABLES, (device, id(owner), *(p.data_ptr() for p in params)),
                     lambda: ParamTables(owner, torch.empty(max(1, owner.n_partials), dtype=torch.float32,
                                                            device=device)))
    _upload_slots(tables, params, grads, exp_avgs, block_avgs, steps, groups, device)
    _upload_hyper(tables, hyper, device)
    torch._foreach_add_(list(steps), 1.0)
    tiles, chunk_sums, chunk_updates = _kernels()
    types = dict(P_TYPE=_triton_type(params[0].dtype), G_TYPE=_triton_type(grads[0].dtype),
                 M_TYPE=_triton_type(exp_avgs[0].dtype))
    for cls, items in zip(owner.tiles, tile_items):
        tiles[(len(cls.items),)](items, tables.slots, tables.hyper, N=cls.n, R=cls.r, CONTIGUOUS=cls.contiguous,
                                 ALIGNED=cls.aligned and tables.aligned, num_warps=8 if cls.r * cls.n > TILE else 4,
                                 **types)
    for cls, items in zip(owner.chunks, chunk_items):
        chunk_sums[(len(cls.items),)](items, tables.slots, tables.partials, CHUNK=CHUNK, CONTIGUOUS=cls.contiguous,
                                      ALIGNED=cls.aligned and tables.aligned, G_TYPE=types["G_TYPE"], num_warps=4)
    for cls, items in zip(owner.chunks, chunk_items):
        chunk_updates[(len(cls.items),)](items, tables.slots, tables.hyper, tables.partials, CHUNK=CHUNK,
                                         CONTIGUOUS=cls.contiguous, ALIGNED=cls.aligned and tables.aligned,
                                         num_warps=4, **types)


def _upload_slots(table: ParamTables, params, grads, exp_avgs, block_avgs, steps, groups, device) -> None:
    """Copy the tensors' addresses to the device when they changed since the last step."""
    key = tuple(t.data_ptr() for tensors in (params, grads, exp_avgs, block_avgs, steps) for t in tensors)
    key += tuple(groups)
    if key == table.slot_key:
        return
    n = len(params)
    rows = np.array(key, dtype=np.int64).reshape(_SLOT_COLUMNS, n).T.copy()
    table.slots = _to_device(torch.from_numpy(rows), device, table.slots)
    table.slot_key = key
    table.aligned = bool((rows[:, :3] % 16 == 0).all())


def _upload_hyper(table: ParamTables, hyper: Sequence[tuple], device: torch.device) -> None:
    key = tuple(float(x) for row in hyper for x in row)
    if key == table.hyper_key:
        return
    values = torch.tensor(key, dtype=torch.float64).view(len(hyper), _HYPER_COLUMNS)
    table.hyper = _to_device(values, device, table.hyper)
    table.hyper_key = key


def _to_device(values: torch.Tensor, device: torch.device, previous: torch.Tensor | None) -> torch.Tensor:
    """``values`` on ``device``: asynchronously from pinned memory into the previous buffer when it fits."""
    if device.type == "cpu":
        return values
    source = values.pin_memory()
    if previous is None or previous.shape != values.shape:
        previous = torch.empty_like(values, device=device)
    previous.copy_(source, non_blocking=True)
    return previous


def _triton_type(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
