"""Block and full Hessian-vector products against dense torch.func.hessian (float64)."""

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hessian_blocks.blocks import Partition, Rule, select_blocks
from hessian_blocks.hvp import BlockHessian
from hessian_blocks.models import build_model
from tests.oracles import dense_hessian

STRATEGIES = ["loop", "vmap"]


def tiny_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (7, 3, 5)]
    return model, nn.functional.cross_entropy, batches


def tiny_gpt():
    spec = build_model("gpt2-nano", seed=1, n_layer=1, n_embd=4, n_head=2, vocab_size=7, context=5)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for n in (3, 1):
        tokens = torch.randint(0, 7, (n, 6), generator=gen)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return spec.model, spec.loss_fn, batches


def tiny_cnn():
    spec = build_model("resnet18", seed=2, width=2, layers=(1,), channels=1, image_size=6, num_classes=3)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (4, 2)]
    return spec.model, spec.loss_fn, batches


MODELS = {"mlp": tiny_mlp, "gpt": tiny_gpt, "cnn": tiny_cnn}


@functools.cache
def cached_dense_hessian(which):
    return dense_hessian(*MODELS[which]())


def mixed_partition(model):
    """Rows, columns, run-length groups, elements and whole tensors in one partition."""
    rules = []
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dim() >= 2 and i % 3 == 0:
            rules.append(Rule(name, "groups", axis=0, size=1))
        elif p.dim() >= 2 and i % 3 == 1 and p.shape[1] >= 3:
            rules.append(Rule(name, "groups", axis=1, runs=((1, 2), (p.shape[1] - 2, 1))))
        elif p.dim() == 1 and i % 2 == 0 and p.numel() <= 8:
            rules.append(Rule(name, "elements"))
        else:
            rules.append(Rule(name, "whole"))
    return Partition.from_rules(model, rules)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("which", list(MODELS))
def test_block_and_full_products_equal_the_dense_hessian(which, strategy):
    model, loss_fn, batches = MODELS[which]()
    dense = cached_dense_hessian(which)
    gen = torch.Generator().manual_seed(3)
    for partition in (Partition.per_tensor(model), mixed_partition(model)):
        hessian = BlockHessian(model, loss_fn, batches, partition, strategy=strategy, chunk_size=5)
        vectors = torch.randn(3, hessian.size, generator=gen, dtype=torch.float64)
        block = dense.restrict(hessian.blocks, block_diagonal=True)
        full = dense.restrict(hessian.blocks, block_diagonal=False)
        torch.testing.assert_close(hessian.block_matvec(vectors), vectors @ block.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hessian.matvec(vectors), vectors @ full.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_selection_of_blocks_gives_the_principal_submatrix(strategy):
    model, loss_fn, batches = tiny_gpt()
    dense = cached_dense_hessian("gpt")
    blocks = select_blocks(Partition.per_tensor(model).blocks, ["*.q_proj.weight", "*.fc.*", "lm_head.weight"])
    hessian = BlockHessian(model, loss_fn, batches, blocks, strategy=strategy)
    vectors = torch.randn(2, hessian.size, dtype=torch.float64)
    torch.testing.assert_close(hessian.block_matvec(vectors), vectors @ dense.restrict(blocks, True).T, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(hessian.matvec(vectors), vectors @ dense.restrict(blocks, False).T, rtol=1e-10,
                               atol=1e-12)


def test_unequal_batches_are_weighted_by_samples_not_by_batches():
    model, loss_fn, batches = tiny_mlp()
    merged = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    split = BlockHessian(model, loss_fn, batches)
    whole = BlockHessian(model, loss_fn, merged)
    vectors = torch.randn(2, split.size, dtype=torch.float64)
    assert split.n_samples == whole.n_samples == 15
    torch.testing.assert_close(split.matvec(vectors), whole.matvec(vectors), rtol=1e-12, atol=1e-14)
    assert split.loss() == pytest.approx(whole.loss(), rel=1e-14)


def test_gradient_and_loss_match_autograd_on_the_merged_batch():
    model, loss_fn, batches = tiny_mlp()
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    hessian = BlockHessian(model, loss_fn, batches)
    torch.testing.assert_close(hessian.gradient(), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=1e-14)
    assert hessian.loss() == pytest.approx(loss.item(), rel=1e-13)


def test_float32_products_are_close_to_float64():
    model, loss_fn, batches = tiny_gpt()
    exact = BlockHessian(model, loss_fn, batches)
    single = BlockHessian(model, loss_fn, batches, dtype=torch.float32)
    vectors = torch.randn(2, exact.size, dtype=torch.float64)
    approx = single.block_matvec(vectors.float())
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx.double(), exact.block_matvec(vectors), rtol=1e-3, atol=1e-5)


def test_model_is_left_untouched():
    model, loss_fn, batches = tiny_gpt()
    before = {n: p.clone() for n, p in model.named_parameters()}
    hessian = BlockHessian(model, loss_fn, batches)
    hessian.block_matvec(torch.ones(hessian.size, dtype=torch.float64))
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_scipy_linear_operator_is_the_full_hessian_by_default_and_block_diagonal_on_request():
    from scipy.linalg import block_diag
    from scipy.sparse.linalg import eigsh

    model, loss_fn, batches = tiny_mlp()
    dense = cached_dense_hessian("mlp")
    hessian = BlockHessian(model, loss_fn, batches)
    full = dense.restrict(hessian.blocks, False).numpy()
    for operator in (hessian.linear_operator(), hessian.linear_operator("full")):
        top = eigsh(operator, k=2, which="LA", return_eigenvectors=False)
        np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(full)[-2:], rtol=1e-8)
    blocks = [full[np.ix_(r, r)]
              for r in np.split(np.arange(hessian.size), np.cumsum([b.numel for b in hessian.blocks])[:-1])]
    top_blocks = eigsh(hessian.linear_operator("block_diagonal"), k=1, which="LA", return_eigenvectors=False)[0]
    assert top_blocks == pytest.approx(np.linalg.eigvalsh(block_diag(*blocks)).max(), rel=1e-8)
    assert abs(top_blocks - np.linalg.eigvalsh(full).max()) > 1e-3  # the two operators really differ here
    with pytest.raises(ValueError, match="kind must be 'full' .* got 'diagonal'"):
        hessian.linear_operator("diagonal")


def test_bad_vectors_and_arguments_raise():
    model, loss_fn, batches = tiny_mlp()
    hessian = BlockHessian(model, loss_fn, batches)
    with pytest.raises(ValueError, match="must have 57 columns"):
        hessian.block_matvec(torch.ones(2, 5))
    with pytest.raises(ValueError, match="strategy must be one of"):
        BlockHessian(model, loss_fn, batches, strategy="fast")
    with pytest.raises(ValueError, match="no batches"):
        BlockHessian(model, loss_fn, [])
    with pytest.raises(ValueError, match="must be an \\(inputs, targets\\) pair"):
        BlockHessian(model, loss_fn, [torch.ones(3)])
    with pytest.raises(ValueError, match="overlaps a block selected before it"):
        blocks = Partition.per_tensor(model).blocks
        BlockHessian(model, loss_fn, batches, [blocks[0], blocks[0]])


class ScaledLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 1.5]))
        self.norm = nn.LayerNorm(4, bias=False)

    def forward(self, x):
        return torch.tanh(self.norm(x * self.scale))


def test_layer_norm_cross_terms_match_finite_differences():
    """torch.func.hessian gets these cross terms wrong (non-symmetric) in torch 2.13; we must not."""
    torch.manual_seed(0)
    model = ScaledLayerNorm().double()
    with torch.no_grad():
        model.norm.weight.copy_(torch.tensor([1.0, -0.3, 0.7, 2.0]))
    batches = [(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))]

    def loss_fn(out, y):
        return ((out - y) ** 2).sum(-1).mean()

    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def gradient(point):
        state = dict(zip(names, point.split(4)))
        point_loss = loss_fn(torch.func.functional_call(model, state, (batches[0][0],)), batches[0][1])
        return torch.autograd.grad(point_loss, point)[0]

    eps = 1e-6
    columns = [(gradient((flat + eps * e).requires_grad_()) - gradient((flat - eps * e).requires_grad_())) / (2 * eps)
               for e in torch.eye(8, dtype=torch.float64)]
    finite_differences = torch.stack(columns, 1)
    for strategy in STRATEGIES:
        hessian = BlockHessian(model, loss_fn, batches, strategy=strategy)
        ours = hessian.matvec(torch.eye(8, dtype=torch.float64))
        torch.testing.assert_close(ours, finite_differences, rtol=1e-6, atol=1e-8)
    func_hessian = torch.func.hessian(lambda p: gradient_free_loss(model, names, p, batches, loss_fn))(flat)
    assert (func_hessian - finite_differences).abs().max() > 1e-3, \
        "torch.func.hessian was fixed: the oracle may use it again"


def gradient_free_loss(model, names, point, batches, loss_fn):
    state = dict(zip(names, point.split(4)))
    return loss_fn(torch.func.functional_call(model, state, (batches[0][0],)), batches[0][1])


class OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without setup_context (like Hugging Face Bloom's GeLU): vmap refuses it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * OneMinusSquare.apply(y)


class OneMinusSquare(torch.autograd.Function):
    """1 - y^2, whose own backward reads a Python number out of its gradient: vmap cannot batch that."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return 1 - y * y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        assert grad.abs().sum().item() >= 0  # a host read, as custom kernels' wrappers do
        return -2 * y * grad


class OldStyleTanh2(OldStyleTanh):
    """Like OldStyleTanh, with a plain double backward (what Bloom's GeLU is)."""

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OldStyleActivation(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function.apply(x)


def old_style_mlp(function=OldStyleTanh):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), OldStyleActivation(function), nn.Linear(6, 3)).double()
    reference = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    reference.load_state_dict(model.state_dict())
    batches = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (7, 3)]
    return model, reference, nn.functional.cross_entropy, batches


def test_auto_falls_back_once_naming_the_module_when_vmap_cannot_run_the_model(monkeypatch):
    """auto on CUDA may pick vmap: forced here on CPU. The old-style Function stops vmap (forward mode) and
    the batched loop (a host read in its double backward): both fall back, once each, naming the module."""
    from hessian_blocks import hvp

    model, reference, loss_fn, batches = old_style_mlp()
    dense = dense_hessian(reference, loss_fn, batches)
    monkeypatch.setitem(hvp.AUTO_STRATEGY, "cpu", "vmap")
    with pytest.warns(hvp.VectorizationWarning) as caught:
        hessian = BlockHessian(model, loss_fn, batches)  # the guards' first product, one vector: not batched
        vectors = torch.randn(3, hessian.size, dtype=torch.float64)
        got = hessian.block_matvec(vectors)
    messages = [str(w.message) for w in caught if w.category is hvp.VectorizationWarning]
    assert len(messages) == 2 and all("in '1' (OldStyleActivation)" in m for m in messages)
    assert "setup_context" in messages[0] and "loop strategy instead" in messages[0]
    assert "one (block, vector) product at a time" in messages[1]
    assert hessian.strategy == "loop"
    expected = vectors @ dense.restrict(hessian.blocks, block_diagonal=True).T
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hvp.VectorizationWarning)  # once: no warning again
        torch.testing.assert_close(hessian.block_matvec(vectors), expected, rtol=1e-10, atol=1e-12)


def test_vmap_asked_for_names_the_module_it_cannot_run_and_the_batched_loop_runs_old_style_functions():
    from hessian_blocks.guards import HessianSetupError

    model, reference, loss_fn, batches = old_style_mlp()
    with pytest.raises(HessianSetupError, match=r"strategy 'vmap' cannot run this model: vmap fails in '1' "
                                                r"\(OldStyleActivation\) .*setup_context.*strategy='loop'"):
        BlockHessian(model, loss_fn, batches, strategy="vmap")
    model, reference, loss_fn, batches = old_style_mlp(OldStyleTanh2)  # the loop, vectorized over pairs, runs it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian = BlockHessian(model, loss_fn, batches, strategy="loop")
        vectors = torch.randn(4, hessian.size, dtype=torch.float64)
        torch.testing.assert_close(hessian.block_matvec(vectors),
                                   vectors @ dense_hessian(reference, loss_fn, batches).restrict(hessian.blocks,
                                                                                                  True).T,
                                   rtol=1e-10, atol=1e-12)
