"""Adam-mini on 2 gloo processes (DDP, and FSDP2 fully_shard on CPU) equals one process after 10 steps;
under fully_shard its 8-bit first moment and stochastic rounding resume bit-identically.

One spawn of two CPU processes runs every scenario and saves the full parameters each rank ends
with; the tests compare them with single-process Adam-mini on the whole batch. The model's blocks
are cut by the shards in every way the sharded layout handles: token rows split 4/3, a head of 4
rows straddling the shard boundary (3 heads of 4 rows over 2 ranks), column groups, whole-tensor
blocks, per-element biases with uneven shards, a one-row tensor whose second shard is empty, and
3 experts [experts, rows, columns] with one block per (expert, row) (merged axes [0, 1]: 2 experts
on rank 0, 1 on rank 1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessian_blocks.blocks import Partition, Rule
from optim import AdamMini
from optim.distributed import ShardedBlockLayout, load_checkpoint, save_checkpoint
from optim.low_precision import dequantize_blockwise, quantize_blockwise

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
        self.experts = nn.Parameter(torch.randn(3, 2, 5) / 2)   # [experts, rows, columns]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q(self.emb(tokens).mean(dim=1)))
        h = self.norm(torch.tanh(self.mix(h)))
        experts = torch.einsum("erc,bc->ber", self.experts, h).tanh().sum(-1)   # [batch, 3]: one class per expert
        return self.out(h) + self.gate(h) + experts


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
    Rule("experts", "groups", axis=[0, 1], size=1),          # 6 blocks of (expert, row): rows 0-1 | 2 of dim 0
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

    # 8-bit first moment and stochastic rounding under fully_shard: 10 steps, and 5 + save + load + 5
    for scenario, dtype, options in LOW_PRECISION:
        got[scenario] = sharded_run(rank, dtype, options, STEPS)
        sharded_run(rank, dtype, options, STEPS // 2, save=f"{out_dir}/{scenario}")
        got[f"{scenario}_resumed"] = sharded_run(rank, dtype, options, STEPS - STEPS // 2, load=f"{out_dir}/{scenario}")
    got["bf16_nearest"] = sharded_run(rank, torch.bfloat16, {}, STEPS)
    model = make_wide()
    fully_shard(model)
    optimizer = AdamMini(model, "default", **HYPER, state_dtype=torch.int8)
    train(model, optimizer, wide_batch(rank), STEPS)
    got["wide_int8"] = full_parameters(model)
    got["wide_scales"] = optimizer.state[model[0].weight]["exp_avg_scale"].full_tensor()
    model, partition = make_model()
    fully_shard(model)
    optimizer = AdamMini(model, partition, **HYPER, state_dtype=torch.int8)
    train(model, optimizer, batch(rank), 1)
    got["int8_scales"] = (type(optimizer.state[model.q.weight]["exp_avg_scale"]).__name__,
                          tuple(optimizer.state[model.q.weight]["exp_avg_scale"].shape),
                          tuple(optimizer.state[model.q.weight]["exp_avg"].to_local().shape))
    return got


LOW_PRECISION = [
    ("int8", torch.float64, dict(state_dtype=torch.int8)),
    ("sr", torch.bfloat16, dict(stochastic_rounding=True, rounding_seed=3)),
    ("int8_sr", torch.bfloat16, dict(state_dtype=torch.int8, stochastic_rounding=True, rounding_seed=3)),
]


def sharded_run(rank: int, dtype: torch.dtype, options: dict, steps: int, save: str | None = None,
                load: str | None = None) -> dict[str, torch.Tensor]:
    """``steps`` steps of a fresh fully_shard model in ``dtype`` (loading ``load`` first, saving to ``save`` after)."""
    from torch.distributed.fsdp import fully_shard

    model, partition = make_model()
    model.to(dtype)
    fully_shard(model)
    optimizer = AdamMini(model, partition, **HYPER, **options)
    if load:
        load_checkpoint(load, model, optimizer)
    tokens, targets = batch(rank)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens).double(), targets).backward()
        optimizer.step()
    if save:
        save_checkpoint(save, model, optimizer)
    return full_parameters(model)


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


# ----------------------------------------------------- 8-bit first moment and stochastic rounding


def make_wide() -> nn.Module:
    """An embedding of 103 rows of 5: shards of 52 and 51 rows, 260 and 255 coordinates, so rank 0
    quantizes 2 runs of 256 (the second of 4) and rank 1 one run (its second scale is padding)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(103, 5), nn.Flatten(), nn.Linear(65, 3)).double()


def wide_batch(rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8 samples of 13 tokens that use every row of make_wide's embedding (or rank's half of them)."""
    gen = torch.Generator().manual_seed(2)
    tokens = (torch.arange(104) % 103)[torch.randperm(104, generator=gen)].view(8, 13)
    targets = torch.randint(0, 3, (8,), generator=gen)
    if rank is None:
        return tokens, targets
    return tokens[rank * 4 : rank * 4 + 4], targets[rank * 4 : rank * 4 + 4]


def one_process_int8_on_the_shards_grid(model: nn.Module, partition, data) -> dict[str, torch.Tensor]:
    """Single-process Adam-mini with a float32 first moment that, after every step, is quantized and
    dequantized per run of 256 coordinates of each of the WORLD row ranges fully_shard gives the
    ranks (torch.chunk on dim 0): the 8-bit state of the sharded run, computed without sharding."""
    optimizer = AdamMini(model, partition, **HYPER, state_dtype=torch.float32)
    tokens, targets = data
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), targets).backward()
        optimizer.step()
        for param in model.parameters():
            for rows in optimizer.state[param]["exp_avg"].chunk(WORLD, dim=0):
                if rows.numel():
                    rows.view(-1).copy_(dequantize_blockwise(*quantize_blockwise(rows.view(-1))))
    return full_parameters(model)


def test_fsdp_int8_first_moment_equals_one_process_on_the_same_grid(spawned):
    """Under fully_shard each rank quantizes its own rows (per 256-coordinate run of its shard): the
    result is single-process Adam-mini with that quantization, up to float64 gradient rounding (the
    halves of the batch are reduced over ranks) seen through the float32 working first moment."""
    ranks, _ = spawned
    expected = one_process_int8_on_the_shards_grid(*make_model(), batch())
    for got in ranks:
        assert_same_parameters(got["int8"], expected)
    wide = one_process_int8_on_the_shards_grid(make_wide(), "default", wide_batch())
    for got in ranks:
        assert_same_parameters(got["wide_int8"], wide)
        scales = got["wide_scales"]
        assert scales.shape == (WORLD, 2) and scales[0].gt(0).all() and scales[1, 0] > 0 and scales[1, 1] == 0
    # the scales: a DTensor with one row per rank, the codes the local rows of q.weight (6 of 12)
    assert ranks[0]["int8_scales"] == ranks[1]["int8_scales"] == ("DTensor", (WORLD, 1), (6, 6))


def test_fsdp_int8_first_moment_is_near_one_process_int8(spawned, one_process):
    """Against single-process 8-bit Adam-mini (one grid over the whole flattened tensor) the sharded
    grid puts other coordinates under a common scale, so the parameters differ by quantization noise:
    of the size by which 8-bit Adam-mini differs from float32 Adam-mini (about 3.5e-3 here after 10
    steps that move the parameters by 0.56). Allowed: three times that distance."""
    ranks, _ = spawned
    model, partition = make_model()
    train(model, AdamMini(model, partition, **HYPER, state_dtype=torch.int8), batch(), STEPS)
    int8 = full_parameters(model)
    noise = max((int8[name] - one_process[name]).abs().max().item() for name in int8)
    assert 0 < noise < 1e-2
    for got in ranks:
        gap = max((got["int8"][name] - int8[name]).abs().max().item() for name in int8)
        assert gap < 3 * noise


@pytest.mark.parametrize("scenario", [name for name, _, _ in LOW_PRECISION])
def test_fsdp_low_precision_resumes_bit_identically(spawned, scenario):
    """5 steps, save_checkpoint, a fresh sharded model and optimizer, load_checkpoint, 5 steps: the
    same bits as 10 uninterrupted steps (same world size), on both ranks."""
    ranks, _ = spawned
    for got in ranks:
        for name, expected in got[scenario].items():
            assert torch.equal(got[f"{scenario}_resumed"][name], expected), name
    assert all(torch.equal(ranks[0][scenario][name], ranks[1][scenario][name]) for name in ranks[0][scenario])


def test_fsdp_stochastic_rounding_changes_the_bfloat16_result(spawned):
    ranks, _ = spawned
    got = ranks[0]
    assert all(p.dtype == torch.bfloat16 for p in got["sr"].values())
    assert any(not torch.equal(got["sr"][name], got["bf16_nearest"][name]) for name in got["sr"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_fsdp_int8_checkpoint_refuses_another_world_size(spawned):
    """The 8-bit scales follow each rank's shard: a 2-rank checkpoint does not load into one process."""
    _, checkpoint = spawned
    model, partition = make_model()
    optimizer = AdamMini(model, partition, **HYPER, state_dtype=torch.int8)
    with pytest.raises(ValueError, match="world size it was saved with"):
        load_checkpoint(checkpoint.parent / "int8", model, optimizer)
