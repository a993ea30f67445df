"""Adam-mini on 2 gloo processes (DDP, and FSDP2 fully_shard on CPU) equals one process after 10 steps.

One spawn of two CPU processes runs every scenario and saves the full parameters each rank ends
with; the tests compare them with single-process Adam-mini on the whole batch. The model's blocks
are cut by the shards in every way the sharded layout handles: token rows split 4/3, a head of 4
rows straddling the shard boundary (3 heads of 4 rows over 2 ranks), column groups, whole-tensor
blocks, per-element biases with uneven shards, and a one-row tensor whose second shard is empty.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessian_blocks.blocks import Partition, Rule
from optim import AdamMini
from optim.distributed import ShardedBlockLayout, load_checkpoint, save_checkpoint

from .spawn import spawn_ranks

WORLD = 2
STEPS = 10
HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


class Net(nn.Module):
    """Tokens -> embedding -> 3 heads of 4 rows -> column groups -> LayerNorm -> two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.q = nn.Linear(6, 12)
        self.mix = nn.Linear(12, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)
        self.gate = nn.Linear(5, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q(self.emb(tokens).mean(dim=1)))
        h = self.norm(torch.tanh(self.mix(h)))
        return self.out(h) + self.gate(h)


RULES = [
    Rule("emb.weight", "groups", axis=0, size=1),            # 7 token rows: shards of 4 and 3
    Rule("q.weight", "groups", axis=0, size=4),              # head 1 (rows 4-7) straddles rows 0-5 | 6-11
    Rule("q.bias", "groups", axis=0, size=4),                # the same heads on a 1-D tensor
    Rule("mix.weight", "groups", axis=1, runs=((4, 2), (1, 4))),  # column groups: every rank holds part of each
    Rule("mix.bias", "whole"),
    Rule("norm.weight", "whole"),
    Rule("norm.bias", "elements"),                           # 5 elements: shards of 3 and 2
    Rule("out.weight", "whole"),
    Rule("out.bias", "elements"),
    Rule("gate.weight", "groups", axis=1, size=1),           # one row: the second shard is empty
    Rule("gate.bias", "elements"),
]


def make_model() -> tuple[Net, Partition]:
    torch.manual_seed(0)
    model = Net().double()
    return model, Partition.from_rules(model, RULES)


def batch(rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of 8 samples, or rank's half of it."""
    gen = torch.Generator().manual_seed(1)
    tokens, targets = torch.randint(0, 7, (8, 3), generator=gen), torch.randint(0, 3, (8,), generator=gen)
    if rank is None:
        return tokens, targets
    return tokens[rank * 4 : rank * 4 + 4], targets[rank * 4 : rank * 4 + 4]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int) -> None:
    tokens, targets = data
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), targets).backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def _compute(rank: int, out_dir: str) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    got = {}
    model, partition = make_model()
    ddp = DistributedDataParallel(model)
    train(ddp, AdamMini(model, partition, **HYPER), batch(rank), STEPS)
    got["ddp"] = full_parameters(model)

    for resumed in (False, True):  # DDP: 5 steps, save; fresh model and optimizer, load, 5 steps
        model, partition = make_model()
        ddp, optimizer = DistributedDataParallel(model), AdamMini(model, partition, **HYPER)
        if resumed:
            load_checkpoint(f"{out_dir}/ddp_checkpoint", ddp, optimizer)
        train(ddp, optimizer, batch(rank), STEPS // 2)
        if not resumed:
            save_checkpoint(f"{out_dir}/ddp_checkpoint", ddp, optimizer)
    got["ddp_resumed"] = full_parameters(model)

    for foreach in (True, False):
        model, partition = make_model()
        fully_shard(model)
        optimizer = AdamMini(model, partition, **HYPER, foreach=foreach)
        train(model, optimizer, batch(rank), STEPS)
        got[f"fsdp_foreach={foreach}"] = full_parameters(model)
    q_weight = optimizer._layouts[model.q.weight]

    model, _ = make_model()
    fully_shard(model)
    train(model, AdamMini(model, "default", **HYPER), batch(rank), STEPS)
    got["fsdp_default_partition"] = full_parameters(model)

    got["q_pieces"] = [(s.first_block, s.groups, None if s.piece is None else s.piece.size) for s in q_weight.segments]
    got["sharded"] = all(isinstance(layout, ShardedBlockLayout) for layout in optimizer._layouts.values())

    # save after 5 steps, resume in a fresh sharded model and optimizer, 5 more steps
    model, partition = make_model()
    fully_shard(model)
    optimizer = AdamMini(model, partition, **HYPER)
    train(model, optimizer, batch(rank), STEPS // 2)
    save_checkpoint(f"{out_dir}/checkpoint", model, optimizer)
    model, partition = make_model()
    fully_shard(model)
    optimizer = AdamMini(model, partition, **HYPER)
    load_checkpoint(f"{out_dir}/checkpoint", model, optimizer)
    train(model, optimizer, batch(rank), STEPS - STEPS // 2)
    got["fsdp_resumed"] = full_parameters(model)
    return got


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """(what each rank ended with, the checkpoint folder)."""
    folder = tmp_path_factory.mktemp("distributed_optim")
    return spawn_ranks(_compute, folder, WORLD), folder / "checkpoint"


@pytest.fixture(scope="module")
def one_process():
    """Parameters after STEPS single-process Adam-mini steps on the whole batch."""
    model, partition = make_model()
    train(model, AdamMini(model, partition, **HYPER), batch(), STEPS)
    return full_parameters(model)


def test_fsdp_with_the_default_partition_equals_one_process(spawned):
    model, _ = make_model()
    train(model, AdamMini(model, "default", **HYPER), batch(), STEPS)
    for got in spawned[0]:
        assert_same_parameters(got["fsdp_default_partition"], full_parameters(model))


def assert_same_parameters(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("scenario", ["ddp", "ddp_resumed", "fsdp_foreach=True", "fsdp_foreach=False", "fsdp_resumed"])
def test_two_ranks_equal_one_process_after_10_steps(spawned, one_process, scenario):
    ranks, _ = spawned
    for got in ranks:
        assert_same_parameters(got[scenario], one_process)
    start, _ = make_model()
    moved = max((one_process[n] - p.detach()).abs().max().item() for n, p in start.named_parameters())
    assert moved > 0.1  # the steps change the parameters a lot, so the comparison means something


def test_fsdp_shards_cut_a_head_and_every_parameter_is_sharded(spawned):
    ranks, _ = spawned
    assert all(got["sharded"] for got in ranks)
    # rank 0 holds rows 0-5 of q.weight: head 0 whole, 2 rows of head 1; rank 1 the other 2 rows and head 2
    assert ranks[0]["q_pieces"] == [(0, 1, 4), (1, 1, 2), (2, 1, None)]
    assert ranks[1]["q_pieces"] == [(0, 1, None), (1, 1, 2), (2, 1, 4)]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_sharded_checkpoint_resumes_in_one_process(spawned, one_process):
    """The 2-rank FSDP2 checkpoint loads into a plain model in this process: same 10-step result."""
    _, checkpoint = spawned
    model, partition = make_model()
    optimizer = AdamMini(model, partition, **HYPER)
    load_checkpoint(checkpoint, model, optimizer)
    assert optimizer.state[model.q.weight]["step"].item() == STEPS // 2
    train(model, optimizer, batch(), STEPS - STEPS // 2)
    assert_same_parameters(full_parameters(model), one_process)
