"""Several processes, one Hessian: data-parallel block Hessian-vector products with torch.distributed.

Every rank holds the same model and a shard of the batches. :class:`DataParallelBlockHessian` is a
:class:`~hessian_blocks.hvp.BlockHessian` over the rank's own batches whose products, loss and
gradient are summed over ranks with ``torch.distributed.all_reduce``. Each batch is weighted by
its share of the samples of the *whole* dataset, ``n_i / N`` with ``N`` the sample count summed
over ranks, so the sum over ranks is exactly the single-process loss

    L(theta) = sum_i n_i * loss_i(theta) / N

whatever the loss function (nothing assumes a per-sample mean). Every rank receives the same
reduced products, so Lanczos, run redundantly on every rank, produces the same coefficients
everywhere; only rank 0 needs to report them.

Launch with ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); :func:`process_group_from_env` joins that group. Rank and world size always come
from ``torch.distributed`` once a group exists, never from the number of visible GPUs.

The same module offers the other split: :func:`split_blocks` gives each rank a share of the
blocks (every rank sees the whole data) and :func:`split_block_spectra` runs SLQ that way and
gathers one :class:`~hessian_blocks.results.SpectrumResult` on rank 0, equal to a single-process
run with the same seed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .blocks import Block, Partition
from .hvp import Batch, BlockHessian, LossFn
from .lanczos import LanczosResult, make_probes
from .results import SpectrumResult
from .slq import block_spectra

__all__ = [
    "DataParallelBlockHessian", "device_for_rank", "get_rank", "get_world_size", "is_main_process",
    "launched_by_torchrun", "process_group_from_env", "shard_batches", "split_block_spectra", "split_blocks",
]

T = TypeVar("T")
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------- process group


def launched_by_torchrun() -> bool:
    """True when the environment variables of ``torchrun`` (or ``torch.distributed.run``) are set."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without an initialised process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (1 without an initialised process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process(group: dist.ProcessGroup | None = None) -> bool:
    """True on rank 0, the rank that prints, shows progress and writes files."""
    return get_rank(group) == 0


def device_for_rank(device: torch.device | str) -> torch.device:
    """The device this rank computes on: ``"cuda"`` becomes ``cuda:LOCAL_RANK`` under torchrun.

    An explicit index (``"cuda:1"``) and the CPU are kept as given.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextmanager
def process_group_from_env(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Join the process group described by torchrun's environment variables, for the ``with`` body.

    Yields True when running distributed (a group exists), False for a plain single process. The
    backend is gloo for CPU tensors, and gloo plus NCCL (``"cpu:gloo,cuda:nccl"``) when ``device``
    is CUDA. A group that already exists is used as is and left alone; a group created here is
    destroyed on exit.
    """
    if dist.is_available() and dist.is_initialized():
        yield True
        return
    if not launched_by_torchrun():
        yield False
        return
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: install a build with distributed support")
    device = device_for_rank(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine; use the CPU (gloo backend)")
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield True
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------- data sharding


def _contiguous_share(n_items: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous share of ``n_items`` items; shares differ in size by at most one."""
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard_batches(batches: Iterable[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's contiguous share of ``batches`` (whole batches; shares differ by at most one).

    ``rank`` and ``world_size`` default to the current process group's. Whole batches are kept
    intact, so the sample-weighted loss over all shards is exactly the single-process loss for
    any loss function. Every rank needs at least one batch.
    """
    return _share(batches, rank, world_size, "batches", "e.g. --batches {world_size}")


def _share(items: Iterable[T], rank: int | None, world_size: int | None, what: str, example: str) -> list[T]:
    items = list(items)
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
    if len(items) < world_size:
        raise ValueError(
            f"{len(items)} {what} cannot be shared by {world_size} processes: every process needs at least one; "
            f"use at least {world_size} {what} ({example.format(world_size=world_size)}) or fewer processes"
        )
    return items[_contiguous_share(len(items), rank, world_size)]


# ----------------------------------------------------------------- data-parallel products


class DataParallelBlockHessian(BlockHessian):
    """A :class:`BlockHessian` over this rank's batches whose results are summed over all ranks.

    Takes the same arguments as :class:`BlockHessian`, with ``batches`` this rank's shard (see
    :func:`shard_batches`) and ``group`` the process group (default: the world). Every rank must
    hold the same model and select the same blocks; this is checked when the object is built.

    ``block_matvec``, ``matvec``, ``loss`` and ``gradient`` are collective: every rank of the group
    must call them, in the same order, with the same vectors. They return the products of the
    whole dataset's loss on every rank. ``n_samples`` and ``n_batches`` count the whole dataset;
    ``local_samples`` and ``batches`` are this rank's.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        blocks: Partition | Sequence[Block] | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        **options,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DataParallelBlockHessian needs an initialised process group: launch with torchrun and call "
                "torch.distributed.init_process_group (or use hessian_blocks.distributed.process_group_from_env)"
            )
        super().__init__(model, loss_fn, batches, blocks, **options)
        self.group = group
        self._check_same_setup_everywhere()
        counts = [int(targets.shape[0]) for _, targets in self.batches]
        totals = self._all_reduce(torch.tensor([sum(counts), len(counts)], dtype=torch.float64, device=self.device))
        self.local_samples = sum(counts)
        self.n_samples = int(totals[0])
        self._total_batches = int(totals[1])
        self.weights = [c / self.n_samples for c in counts]

    @property
    def n_batches(self) -> int:
        """Number of batches over all ranks."""
        return self._total_batches

    def block_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """H_bb v_b of the whole dataset's loss for every block (collective; see the class docstring)."""
        self._check_same_vectors(vectors)
        return self._all_reduce(super().block_matvec(vectors))

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """The whole dataset's Hessian on all selected coordinates times each row (collective)."""
        self._check_same_vectors(vectors)
        return self._all_reduce(super().matvec(vectors))

    def loss(self) -> float:
        """The whole dataset's loss (collective)."""
        return float(self._all_reduce(torch.tensor(super().loss(), dtype=torch.float64, device=self.device)))

    def gradient(self) -> torch.Tensor:
        """[P] gradient of the whole dataset's loss on the selected coordinates (collective)."""
        return self._all_reduce(super().gradient())

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def _check_same_vectors(self, vectors: torch.Tensor) -> None:
        """Raise unless every rank multiplies the same vectors (e.g. probes drawn with the same seed).

        Compares a few sums over ranks with one small ``all_reduce``; a relative 1e-9 absorbs
        rounding differences between devices.
        """
        values = vectors.to(self.device, torch.float64)
        summary = torch.stack([values.sum(), values.square().sum(), values.abs().max()])
        extremes = torch.cat([summary, -summary])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        highest, lowest = extremes[:3], -extremes[3:]
        if ((highest - lowest).abs() > 1e-9 * highest.abs().clamp_min(1e-300)).any():
            raise ValueError(
                "the ranks multiply different vectors: every rank must run the same Lanczos (same seed, probes and "
                "steps); only the batches may differ"
            )

    def _check_same_setup_everywhere(self) -> None:
        """Raise unless every rank has the same selected blocks and the same parameter values."""
        layout = torch.tensor([self.size, len(self.blocks)], dtype=torch.float64)
        values = [torch.stack([p.sum(), p.square().sum()]).cpu().double() for p in self.params.values()]
        fingerprint = torch.cat([layout, *values]).to(self.device)
        count = torch.tensor([fingerprint.numel()], dtype=torch.float64, device=self.device)
        low, high = count.clone(), count.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        if low.item() == high.item():
            low, high = fingerprint.clone(), fingerprint.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(low, high):
            raise ValueError(
                "the ranks hold different models or block selections: build the model with the same seed and "
                "select the same blocks on every rank (only the batches may differ)"
            )


# ----------------------------------------------------------------- splitting blocks over ranks


def split_blocks(blocks: Sequence[Block], rank: int | None = None, world_size: int | None = None) -> list[Block]:
    """This rank's contiguous share of ``blocks`` (shares differ in length by at most one).

    With the per-block loop each (block, probe) product costs one backward pass whatever the
    block's size, so an equal number of blocks per rank balances the work.
    """
    return _share(blocks, rank, world_size, "blocks", "select more blocks")


def split_block_spectra(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    blocks: Partition | Sequence[Block],
    *,
    steps: int = 100,
    probes: int = 10,
    probe_kind: str = "rademacher",
    seed: int = 0,
    reorthogonalize: bool = False,
    progress: Callable[[int], None] | None = None,
    settings: dict | None = None,
    group: dist.ProcessGroup | None = None,
    **options,
) -> SpectrumResult | None:
    """SLQ with the blocks split over ranks; every rank sees all ``batches``. Collective.

    Each rank runs Lanczos on its share of the blocks (:func:`split_blocks`), starting from its
    blocks' coordinates of the probes one process would draw for all blocks with ``seed``, so
    rank 0 returns the same :class:`SpectrumResult` as :func:`~hessian_blocks.slq.block_spectra`
    run by one process on all blocks; the other ranks return None. ``options`` go to
    :class:`BlockHessian`. The full-model spectrum needs every block on one rank and is not
    offered here.
    """
    all_blocks = list(blocks.blocks if isinstance(blocks, Partition) else blocks)
    rank, world_size = get_rank(group), get_world_size(group)
    share = _contiguous_share(len(all_blocks), rank, world_size)
    hessian = BlockHessian(model, loss_fn, batches, split_blocks(all_blocks, rank, world_size), **options)

    first = sum(block.numel for block in all_blocks[: share.start])
    every_probe = make_probes(
        probes, sum(block.numel for block in all_blocks), kind=probe_kind, seed=seed,
        dtype=torch.float64, device=hessian.device,
    )
    local = block_spectra(
        hessian, steps=steps, probes=probes, probe_kind=probe_kind, seed=seed, reorthogonalize=reorthogonalize,
        progress=progress, settings={**(settings or {}), "block_ranks": world_size},
        start=every_probe[:, first : first + hessian.size].contiguous(),
    )
    if world_size == 1:
        return local
    shares: list[LanczosResult] | None = [None] * world_size if rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(local.lanczos, shares, group=group, group_dst=0)
    if shares is None:
        return None
    return SpectrumResult(
        names=[b.name for b in all_blocks],
        params=[b.param for b in all_blocks],
        shapes=[tuple(b.shape) for b in all_blocks],
        sizes=np.array([b.numel for b in all_blocks]),
        lanczos=LanczosResult(
            alpha=np.concatenate([part.alpha for part in shares]),
            beta=np.concatenate([part.beta for part in shares]),
            steps=np.concatenate([part.steps for part in shares]),
        ),
        settings=local.settings,
    )
