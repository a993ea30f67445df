"""Run a function on several gloo processes on this machine and collect what each rank returns."""

from __future__ import annotations

import datetime
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RankFn = Callable[[int, str], dict]


def spawn_ranks(compute: RankFn, folder: Path, world_size: int = 2) -> list[dict]:
    """``compute(rank, folder)`` on ``world_size`` processes joined in one gloo group; [rank 0's dict, ...].

    ``compute`` must be a module-level function (the processes import it).
    """
    mp.spawn(_run_rank, args=(compute, str(folder), world_size), nprocs=world_size, join=True)
    return [pickle.loads((folder / f"rank{rank}.pkl").read_bytes()) for rank in range(world_size)]


def _run_rank(rank: int, compute: RankFn, folder: str, world_size: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        got = compute(rank, folder)
        (Path(folder) / f"rank{rank}.pkl").write_bytes(pickle.dumps(got))
    finally:
        dist.destroy_process_group()
