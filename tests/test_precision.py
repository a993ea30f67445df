"""PrecisionWarning: a forward that computes parameter-dependent values in a lower precision than the dtype
asked for (a norm casting float64 activations to float32) warns once, naming the operation, the module and
the fix; a lower-precision constant that never meets the parameters, and the bundled models, do not."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_blocks import BlockHessian, PrecisionWarning, build_model, make_batches
from hessian_blocks.guards import lower_precision_operations


def batches(features=6, classes=3):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(4, features, generator=gen), torch.randint(0, classes, (4,), generator=gen))]


class Cast(nn.Module):
    """A hand-made model whose hidden layer runs in ``low`` whatever the dtype of the parameters."""

    def __init__(self, low: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.low = nn.Linear(6, 5), Squash(low), nn.Linear(5, 3), low

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Squash(nn.Module):
    def __init__(self, low: torch.dtype) -> None:
        super().__init__()
        self.low = low

    def forward(self, h):
        return torch.tanh(h.to(self.low)).to(h.dtype)  # x.float() inside a float64 run


class ConstantTable(nn.Module):
    """A float32 table that never touches a parameter-dependent value: the function is still computed in
    float64 (the table is one fixed input), so nothing warns."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        table = torch.sin(torch.arange(6, dtype=torch.float32) / 10.0)  # float32, parameter-free
        return self.fc(x + table) * torch.tensor(0.5)


def test_a_float_cast_inside_a_float64_run_warns_once_naming_the_cast_module_and_fix():
    model = Cast().eval()
    with pytest.warns(PrecisionWarning) as caught:
        hessian = BlockHessian(model, F.cross_entropy, batches())
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "dtype=torch.float64 was asked for" in message
    assert "aten._to_copy (float64 -> float32) in 'act' (Squash)" in message
    assert "tanh" in message and "about 1e-07 relative" in message
    assert "compute in its input's dtype" in message and "dtype=torch.float32 (--dtype float32)" in message
    assert caught[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        hessian.check()  # once per BlockHessian
        BlockHessian(model, F.cross_entropy, batches(), dtype=torch.float32)  # consistent in float32


def test_bfloat16_inside_a_float32_run_warns_and_a_cast_in_the_loss_is_named():
    with pytest.warns(PrecisionWarning, match=r"float32 was asked for.*\(float32 -> bfloat16\) in 'act' \(Squash\)"
                                              r".*about 8e-03 relative.*dtype=torch\.bfloat16, where"):
        BlockHessian(Cast(torch.bfloat16).eval(), F.cross_entropy, batches(), dtype=torch.float32)
    plain = nn.Sequential(nn.Linear(6, 3))
    with pytest.warns(PrecisionWarning, match=r"\(float64 -> float32\) in the loss function"):
        BlockHessian(plain, lambda out, y: F.cross_entropy(out.float(), y), batches())


def test_parameter_free_lower_precision_constants_and_unselected_parameters_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        BlockHessian(ConstantTable().eval(), F.cross_entropy, batches())
        # only fc2 is differentiated: the float32 part before it is a fixed input of fc2's Hessian
        model = Cast().eval()
        fc2 = [b for b in BlockHessian(model, F.cross_entropy, batches(), check=False).blocks
               if b.param.startswith("fc2")]
        BlockHessian(model, F.cross_entropy, batches(), fc2)
    with lower_precision_operations(model, torch.float64) as found:  # the recorder alone, on a graph of fc1
        leaves = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
        torch.func.functional_call(model, leaves, (batches()[0][0].double(),))
    assert found.count == 3 and list(found.casts) == [("_to_copy", torch.float64, torch.float32)]


@pytest.mark.parametrize("name", ["gpt2-nano", "bert-mini", "vit-tiny", "resnet18", "vgg16", "mlp", "mlp-mixer"])
def test_bundled_models_do_not_warn_in_float64(name):
    spec = build_model(name)
    data = make_batches(spec, "synthetic", batch_size=2, n_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        BlockHessian(spec.model, spec.loss_fn, data)


@pytest.mark.parametrize("name, overrides", [
    ("hf:GPT2LMHeadModel", dict(n_layer=1, n_embd=4, n_head=2, n_inner=6, n_positions=5, vocab_size=8,
                                bos_token_id=0, eos_token_id=0, context=4)),
    ("hf:BertForMaskedLM", dict(num_hidden_layers=1, hidden_size=4, intermediate_size=6, num_attention_heads=2,
                                vocab_size=8, max_position_embeddings=5, type_vocab_size=1, context=4)),
])
def test_hugging_face_gpt2_and_bert_do_not_warn_in_float64(name, overrides):
    pytest.importorskip("transformers")
    spec = build_model(name, dtype=torch.float64, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        BlockHessian(spec.model, spec.loss_fn, make_batches(spec, "synthetic", batch_size=2, n_batches=1))
