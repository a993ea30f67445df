"""GaLoreMini against AdamMini (full rank, identity and orthogonal projectors: the same trajectory),
a from-scratch rank-r oracle, its own refresh schedule, checkpoint resume and closed-form state bytes."""

import io

import pytest
import torch
import torch.nn as nn

import optim.galore_mini as galore
from analysis.experiments.training import run_steps
from hessian_blocks import build_model
from hessian_blocks.blocks import Partition, Rule
from optim import AdamMini, GaLoreMini, make, param_groups_no_decay, state_memory

# Every rule kind on 2-D weights whose projected side has length 4, plus parameters never projected (not 2-D,
# or groups along merged axes).
SHAPES_AND_RULES = {
    "rows": ((6, 4), dict(split="groups", axis=0, size=2)),  # right: rows kept
    "cols": ((4, 10), dict(split="groups", axis=1, size=5)),  # left: columns kept
    "runs": ((9, 4), dict(split="groups", axis=0, runs=((2, 3), (1, 3)))),
    "tall": ((8, 4), dict(split="whole")),  # shape rule: right
    "wide": ((4, 7), dict(split="whole")),  # shape rule: left
    "cube": ((2, 3, 4), dict(split="whole")),  # not 2-D: Adam-mini
    "merged": ((4, 6), dict(split="groups", axis=[0, 1], size=3)),  # half rows: no projection keeps them
    "bias": ((5,), dict(split="elements")),
}
EXPECTED_SIDES = {"rows": "right", "cols": "left", "runs": "right", "tall": "right", "wide": "left"}
GROUP_HYPER = [
    dict(names=("rows", "cols", "cube", "merged"), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
    dict(names=("runs", "tall", "wide", "bias"), lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0),
]


class Tensors(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        for name, (shape, _) in SHAPES_AND_RULES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)))


def partition_of(model):
    return Partition.from_rules(model, [Rule(name, **spec) for name, (_, spec) in SHAPES_AND_RULES.items()])


def groups_of(model):
    named = dict(model.named_parameters())
    return [{"params": [(n, named[n]) for n in h["names"]],
             **{k: v for k, v in h.items() if k != "names"}} for h in GROUP_HYPER]


def run(optimizer, model, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()


def identity_basis(matrix, rank):
    return torch.eye(matrix.shape[0], rank, dtype=matrix.dtype)


@pytest.mark.parametrize("flags", [dict(foreach=False), dict(foreach=True)])
def test_full_rank_identity_projector_is_adam_mini(monkeypatch, flags):
    monkeypatch.setattr(galore, "svd_basis", identity_basis)
    ours_model, mini_model = Tensors(), Tensors()
    ours = GaLoreMini(groups_of(ours_model), partition_of(ours_model), rank=4, scale=1.0, update_proj_gap=2, **flags)
    mini = AdamMini(groups_of(mini_model), partition_of(mini_model), **flags)
    assert {n: ours.projection(p).side for n,
            p in ours_model.named_parameters() if ours.projection(p)} == EXPECTED_SIDES
    run(ours, ours_model, steps=6)
    run(mini, mini_model, steps=6)
    for (name, a), b in zip(ours_model.named_parameters(), mini_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-13), name
        v_ours, v_mini = ours.state[a]["block_exp_avg_sq"], mini.state[b]["block_exp_avg_sq"]
        assert torch.allclose(v_ours, v_mini, rtol=1e-13, atol=0), name


def test_full_rank_svd_projector_is_adam_mini_until_the_first_refresh():
    """An orthogonal P keeps the norm of every kept row / column and of the whole matrix, so with
    rank = full the block second moments, and the update U P^T = m / sqrt(v) P P^T, are Adam-mini's."""
    ours_model, mini_model = Tensors(), Tensors()
    ours = GaLoreMini(groups_of(ours_model), partition_of(ours_model), rank=4, scale=1.0, update_proj_gap=100)
    mini = AdamMini(groups_of(mini_model), partition_of(mini_model))
    run(ours, ours_model, steps=5)
    run(mini, mini_model, steps=5)
    projector = ours.state[ours_model.rows]["projector"]
    assert not torch.allclose(projector, torch.eye(4, dtype=torch.float64), atol=0.1)  # a real rotation
    assert torch.allclose(projector.T @ projector, torch.eye(4, dtype=torch.float64), atol=1e-12)
    for (name, a), b in zip(ours_model.named_parameters(), mini_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-11), name


def test_low_rank_steps_match_a_from_scratch_oracle():
    """Rank 2 of a [6, 4] weight with row blocks of 2: P from a float64 SVD of the gradient
    at steps 1 and 4, moments in the [6, 2] space, weight decay on the full weight, scale on the update."""
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    w0 = model.w.detach().clone()
    partition = Partition.from_rules(model, [Rule("w", "groups", axis=0, size=2)])
    lr, beta1, beta2, eps, wd, scale = 1e-2, 0.9, 0.99, 1e-8, 0.1, 0.5
    ours = GaLoreMini(model, partition, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, rank=2, scale=scale,
                      update_proj_gap=3)
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 4, generator=generator, dtype=torch.float64) for _ in range(5)]
    w, m, v = w0.clone(), torch.zeros(6, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        if t in (1, 4):
            # top-2 right singular vectors; signs as the SVD of g^T gives them (moments carry over a
            # refresh, so the sign convention matters from the second refresh on)
            p = torch.linalg.svd(g.T, full_matrices=False).U[:, :2]
        r = g @ p
        m = beta1 * m + (1 - beta1) * r
        v = beta2 * v + (1 - beta2) * (r.reshape(3, 2 * 2) ** 2).mean(dim=1)
        u = -(lr / (1 - beta1**t)) * m / ((v / (1 - beta2**t)).sqrt() + eps).repeat_interleave(2)[:, None]
        w = w * (1 - lr * wd) + scale * u @ p.T
        model.w.grad = g
        ours.step()
        assert torch.allclose(model.w.detach(), w, rtol=0, atol=1e-13), t
    assert torch.allclose(ours.state[model.w]["block_exp_avg_sq"], v, rtol=1e-13, atol=0)


def test_projectors_refresh_on_schedule(monkeypatch):
    calls = []

    def counting_svd(matrix, rank):
        calls.append(matrix.shape)
        return torch.linalg.svd(matrix, full_matrices=False).U[:, :rank]

    monkeypatch.setattr(galore, "svd_basis", counting_svd)
    model = Tensors()
    optimizer = GaLoreMini(groups_of(model), partition_of(model), rank=2, update_proj_gap=3)
    history = []
    for _ in range(7):
        run(optimizer, model, steps=1, seed=len(history))
        history.append({n: optimizer.state[p]["projector"].clone() for n,
                        p in model.named_parameters() if optimizer.projection(p)})
    assert len(calls) == 3 * len(EXPECTED_SIDES)  # steps 1, 4 and 7
    changed = [step for step in range(1, 7) if not torch.equal(history[step]["rows"], history[step - 1]["rows"])]
    assert changed == [3, 6]  # 0-based: the 4th and 7th steps
    assert history[0]["cols"].shape == (4, 2) and history[0]["rows"].shape == (4, 2)


def tiny_gpt(dtype=torch.float32):
    spec = build_model("gpt2-nano", n_layer=1, n_embd=32, n_head=4, vocab_size=64, context=8, seed=0, dtype=dtype)
    spec.model.blocks[0].attn.k_proj.bias.requires_grad_(False)  # true gradient zero: see test_adam_mini
    return spec


def train(spec, optimizer, steps, scheduler=None, start=0):
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (4, 9), generator=generator) for _ in range(start + steps)][start:]
    run_steps(spec.model, spec.loss_fn, optimizer, [(t[:, :-1], t[:, 1:]) for t in batches], steps,
              on_step=None if scheduler is None else lambda _: scheduler.step())


def checkpoint(*objects) -> list:
    buffer = io.BytesIO()
    torch.save([o.state_dict() for o in objects], buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("projector", ["svd", "randomized"])
def test_resume_from_checkpoint_is_bit_identical(projector):
    def build():
        spec = tiny_gpt()
        optimizer = GaLoreMini(param_groups_no_decay(spec.model, 0.1), model=spec.model, lr=1e-2, rank=4,
                               update_proj_gap=3, projector=projector, projector_seed=7)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return spec, optimizer, scheduler

    spec, optimizer, scheduler = build()
    train(spec, optimizer, steps=9, scheduler=scheduler)
    uninterrupted = [p.detach().clone() for p in spec.model.parameters()]

    spec, optimizer, scheduler = build()
    train(spec, optimizer, steps=5, scheduler=scheduler)  # next refresh at step 7, after the resume
    saved = checkpoint(spec.model, optimizer, scheduler)
    spec, optimizer, scheduler = build()
    for obj, state in zip((spec.model, optimizer, scheduler), saved):
        obj.load_state_dict(state)
    assert optimizer.state[spec.model.lm_head.weight]["projector"].shape == (32, 4)
    train(spec, optimizer, steps=4, scheduler=scheduler, start=5)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, spec.model.parameters()))


def test_randomized_projector_spans_the_top_singular_directions():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=generator))
    singular = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), 0.01 * torch.ones(26)])
    matrix = u[:, :30] * singular @ v.T
    basis = galore.randomized_basis(matrix, 4, torch.Generator().manual_seed(3))
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    overlap = torch.linalg.svdvals(basis.T @ u[:, :4])  # cosines of the principal angles
    assert overlap.min() > 0.9999


def test_checkpoint_of_another_rank_is_refused():
    spec = tiny_gpt()
    optimizer = GaLoreMini(spec.model, lr=1e-2, rank=4)
    train(spec, optimizer, steps=1)
    other = GaLoreMini(spec.model, lr=1e-2, rank=8)
    with pytest.raises(ValueError, match=r"the checkpoint's projections entry for parameter 'wte.weight' is "
                                         r"\['right', 4\] but this optimizer's is \['right', 8\]"):
        other.load_state_dict(optimizer.state_dict())
    assert not other.state


def test_state_bytes_match_the_closed_form_and_a_quarter_of_adamw():
    """gpt2-nano, width 64, rank = width / 4: per projected [m, n] weight (m + n) * r floats of moment
    and projector, one float per block, a step; AdamW 2 m n + 1."""
    spec = build_model("gpt2-nano", n_layer=1, n_embd=64, n_head=4, vocab_size=256, context=16, seed=0)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    spec.loss_fn(spec.model(tokens[:, :-1]), tokens[:, 1:]).backward()
    ours, adamw = GaLoreMini(spec.model, rank=16), torch.optim.AdamW(spec.model.parameters())
    ours.step()
    adamw.step()
    projected = [p for p in spec.model.parameters() if ours.projection(p)]
    assert len(projected) == 9  # wte, wpe, q, k, v, o, fc, proj, lm_head
    expected = sum(4 * ((p.shape[0] + p.shape[1]) * 16 + ours.state[p]["block_exp_avg_sq"].numel() + 1)
                   for p in projected)
    mine, theirs = state_memory(ours, projected), state_memory(adamw, projected)
    assert mine.total_bytes == expected
    assert mine.by_key["projector"] == 4 * sum(p.shape[1] * 16 for p in projected)  # all right: rows kept
    assert mine.total_bytes / theirs.total_bytes <= 0.25
    whole = state_memory(ours).total_bytes / state_memory(adamw).total_bytes
    assert 0.15 < whole <= 0.25  # plus the 1-D parameters at Adam-mini's cost


def test_options_and_factory():
    spec = tiny_gpt()
    optimizer = make("galore_mini", spec.model, lr=1e-3, weight_decay=0.1, rank=4, update_proj_gap=10)
    assert isinstance(optimizer, GaLoreMini) and optimizer.param_groups[0]["update_proj_gap"] == 10
    assert optimizer.projection(spec.model.lm_head.weight).rank == 4
    assert optimizer.projection(spec.model.ln_f.weight) is None
    no_embeddings = GaLoreMini(spec.model, rank=4, project_embeddings=False)
    assert no_embeddings.projection(spec.model.wte.weight) is None
    assert no_embeddings.projection(spec.model.lm_head.weight)
    named = [(n, p) for n, p in spec.model.named_parameters() if p.requires_grad]
    opted_out = GaLoreMini([{"params": named[:1], "rank": None}, {"params": named[1:]}], model=spec.model, rank=4)
    assert opted_out.projection(spec.model.wte.weight) is None and opted_out.param_groups[0]["projections"] == [None]
    assert GaLoreMini(spec.model, rank=64).projection(spec.model.lm_head.weight) is None  # 64 > 32 columns
    with pytest.raises(ValueError, match=r"invalid GaLoreMini option\(s\) \['rank', 'projector'\]"):
        GaLoreMini(spec.model, rank=1.5, projector="qr")
    with pytest.raises(ValueError, match="project_embeddings=False .* needs the model"):
        GaLoreMini(spec.model.named_parameters(), Partition.per_tensor(spec.model), project_embeddings=False)


def test_comparison_experiment_builds_galore_mini_with_its_partition():
    from analysis.experiments.training import OPTIMIZERS, make_optimizer

    spec = tiny_gpt()
    per_tensor = Partition.per_tensor(spec.model)
    optimizer = make_optimizer("galore_mini", spec.model, lr=1e-2, partition=per_tensor)
    assert "galore_mini" in OPTIMIZERS and isinstance(optimizer, GaLoreMini)
    train(spec, optimizer, steps=1)
    assert optimizer.state[spec.model.lm_head.weight]["block_exp_avg_sq"].shape == (1,)  # whole: one block of R


@pytest.mark.parametrize("model_name", ["mlp", "vit-tiny"])
def test_int_rank_above_a_matrix_side_leaves_that_matrix_to_adam_mini(model_name):
    """make("galore_mini", model, rank=32) on the bundled 10-class models: the [10, 64] head (rows
    grouped, so right projection, 64 >= 32 columns, but only 10 rows) once crashed its first step.
    Now it is not projected: its trajectory is plain Adam-mini's, the 64-wide matrices' rank is 32."""
    spec, plain = build_model(model_name, seed=0), build_model(model_name, seed=0)
    ours = make("galore_mini", spec.model, lr=1e-2, weight_decay=0.1, rank=32)
    reference = make("adam_mini", plain.model, lr=1e-2, weight_decay=0.1)
    head, plain_head = spec.model.get_parameter(HEADS[model_name]), plain.model.get_parameter(HEADS[model_name])
    assert head.shape == (10, 64) and ours.projection(head) is None
    projected = [p for p in spec.model.parameters() if ours.projection(p)]
    assert projected and all(ours.projection(p).rank == 32 for p in projected)
    run(ours, spec.model, steps=3)
    run(reference, plain.model, steps=3)
    assert (torch.equal(head, plain_head)
            and not torch.equal(head, build_model(model_name, seed=0).model.get_parameter(HEADS[model_name])))


HEADS = {"mlp": "out.weight", "vit-tiny": "head.weight"}
