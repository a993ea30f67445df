"""Every guard fires on a model built to trigger it, and the automatic fixes give exact numbers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_blocks.guards import HessianSetupError, check_device
from hessian_blocks.hvp import BlockHessian
from tests.oracles import dense_hessian

STRATEGIES = ["loop", "vmap"]


def batches(n_batches=2, size=4, features=6, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=gen), torch.randint(0, classes, (size,), generator=gen))
            for _ in range(n_batches)]


class FunctionalDropout(nn.Module):
    """Eval mode does not help: dropout is forced on in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.dropout(x, p=0.5, training=True))


class SdpaAttention(nn.Module):
    """Attention through F.scaled_dot_product_attention: its fused CPU kernel has no double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], 1, 3, 6).split(2, dim=-1)  # 1 head, 3 tokens, dim 2
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.reshape(x.shape[0], 6))


class OnceDifferentiableRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class CustomKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(OnceDifferentiableRelu.apply(self.fc1(x)) ** 2)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.spare = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


def test_batchnorm_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(HessianSetupError, match=r"'1' \(BatchNorm1d\) in train mode.*model.eval\(\)"):
        BlockHessian(model, F.cross_entropy, batches())
    model.eval()
    BlockHessian(model, F.cross_entropy, batches())


def test_dropout_module_in_train_mode_is_refused_but_p_zero_is_fine():
    model = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.1), nn.Linear(4, 3))
    with pytest.raises(HessianSetupError, match=r"'1' \(Dropout\) in train mode"):
        BlockHessian(model, F.cross_entropy, batches())
    BlockHessian(nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.0), nn.Linear(4, 3)), F.cross_entropy, batches())


def test_randomness_in_forward_is_detected():
    with pytest.raises(HessianSetupError, match="not deterministic"):
        BlockHessian(FunctionalDropout().eval(), F.cross_entropy, batches())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_attention_runs_on_the_math_backend_with_exact_numbers(strategy):
    torch.manual_seed(0)
    model = SdpaAttention().double()
    data = batches()
    x, _ = data[0]
    with pytest.raises(RuntimeError, match="not implemented"):  # the fused kernel alone cannot do it
        loss = F.cross_entropy(model(x.double()), data[0][1])
        (g,) = torch.autograd.grad(loss, model.qkv.weight, create_graph=True)
        torch.autograd.grad(g.sum(), model.qkv.weight)
    hessian = BlockHessian(model, F.cross_entropy, data, strategy=strategy)
    dense = dense_hessian(model, F.cross_entropy, data)
    vectors = torch.randn(2, hessian.size, dtype=torch.float64)
    torch.testing.assert_close(hessian.block_matvec(vectors), vectors @ dense.restrict(hessian.blocks, True).T,
                               rtol=1e-10, atol=1e-12)


def test_an_operation_without_second_derivative_gets_a_clear_error():
    with pytest.raises(HessianSetupError, match="without a second derivative.*naive attention"):
        BlockHessian(CustomKernel(), F.cross_entropy, batches())


def test_parameter_without_gradient_is_refused_unless_left_out():
    from hessian_blocks.blocks import Partition, select_blocks

    model = Unused()
    with pytest.raises(HessianSetupError, match=r"does not depend on parameter\(s\) \['spare.weight', 'spare.bias'\]"):
        BlockHessian(model, F.cross_entropy, batches())
    blocks = select_blocks(Partition.per_tensor(model).blocks, ["fc.*"])
    assert BlockHessian(model, F.cross_entropy, batches(), blocks).size == 21


def test_non_finite_loss_and_gradients_are_refused():
    data = batches()
    data[0][0][0, 0] = float("nan")
    with pytest.raises(HessianSetupError, match="the loss on the first batch is nan"):
        BlockHessian(nn.Linear(6, 3), F.cross_entropy, data)

    model = nn.Linear(6, 3)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)

    def norm_loss(out, y):  # finite at 0, with an infinite slope there
        return out.pow(2).sum(-1).sqrt().mean()

    with pytest.raises(HessianSetupError, match=r"non-finite gradient for parameter\(s\) \['weight', 'bias'\]"):
        BlockHessian(model, norm_loss, batches())


def test_a_shuffling_loader_is_frozen_to_one_order():
    x = torch.randn(12, 6)
    y = torch.randint(0, 3, (12,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5, shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    hessian = BlockHessian(model, F.cross_entropy, loader)
    vectors = torch.randn(2, hessian.size, dtype=torch.float64)
    first, second = hessian.block_matvec(vectors), hessian.block_matvec(vectors)
    assert torch.equal(first, second)
    assert sorted(int(t.shape[0]) for _, t in hessian.batches) == [2, 5, 5]
    dense = dense_hessian(model, F.cross_entropy, [(x, y)])
    torch.testing.assert_close(first, vectors @ dense.restrict(hessian.blocks, True).T, rtol=1e-10, atol=1e-12)


def test_check_device_accepts_cpu_and_names_the_accepted_forms_otherwise():
    assert check_device("cpu") == torch.device("cpu")
    for device in ("tpu", "", "cuda:x", "mps", "meta"):
        with pytest.raises(ValueError, match=r"use cpu, cuda or cuda:N"):
            check_device(device)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=f"this machine has {torch.cuda.device_count()} CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="CUDA is not available on this machine; use device 'cpu'"):
            check_device("cuda:0")


class KeywordModel(nn.Module):
    """Takes a dict batch as keyword arguments, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, features, mask):
        return self.fc(features * mask)


def test_check_batches_names_the_batch_the_field_and_the_sample_of_a_data_fault():
    from hessian_blocks.guards import DataFaultError, check_batches

    model = KeywordModel()
    good = [({"features": torch.randn(4, 6), "mask": torch.ones(4, 6)}, torch.tensor([0, 1, 2, 0]))]
    check_batches(model, F.cross_entropy, good)  # fits: no error
    bad = good + [({"features": torch.randn(4, 6), "mask": torch.ones(4, 6)}, torch.tensor([0, 1, 2, 0]))]
    bad[1][0]["mask"][3, 5] = float("inf")
    with pytest.raises(DataFaultError, match=r"training batch 2 of 2, inputs 'mask', sample 3 \(and 0 more"):
        check_batches(model, F.cross_entropy, bad, "training batch")
    labels = good + [({"features": torch.randn(4, 6), "mask": torch.ones(4, 6)}, torch.tensor([0, 3, 2, 0]))]
    with pytest.raises(ValueError, match=r"fails on batch 2 of 2 \(inputs \{features: \(4, 6\) torch.float32, mask: "
                                         r"\(4, 6\) torch.float32\}, targets \(4,\) torch.int64\): "
                                         r"Target 3 is out of bounds"):
        check_batches(model, F.cross_entropy, labels)
    dropout = nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.5)).train()
    batch = (torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    state = torch.random.get_rng_state()
    check_batches(dropout, F.cross_entropy, [batch])
    assert dropout.training and torch.equal(torch.random.get_rng_state(), state)  # eval mode inside, mode restored


def test_check_batches_checks_later_targets_without_running_the_model():
    from hessian_blocks.guards import check_batches

    calls = []
    model = nn.Linear(6, 3)
    model.register_forward_hook(lambda *_: calls.append(1))
    batches = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 0])) for _ in range(5)]
    check_batches(model, F.cross_entropy, batches, forward_batches=1)
    assert len(calls) == 1
    batches[3] = (torch.randn(2, 6), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"fails on batch 4 of 5 .*Target -1 is out of bounds"):
        check_batches(model, F.cross_entropy, batches, forward_batches=1)
    batches[3] = (torch.randn(2, 6), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"fails on batch 4 of 5 .*labels fit its output"):
        check_batches(model, F.cross_entropy, batches, forward_batches=1)


def test_full_float32_precision_turns_tf32_off_for_the_products_and_restores_the_settings():
    from hessian_blocks.guards import full_float32_precision

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with full_float32_precision():
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
