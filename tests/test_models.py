"""The model zoo: registry, shapes, seeding, GPT causality, and exact second derivatives."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, jvp, vmap

from hessian_blocks.data import make_batches
from hessian_blocks.models import MODEL_NAMES, ModelSpec, build_model, cross_entropy_loss
from hessian_blocks.models.gpt import LayerNorm
from hessian_blocks.models.mlp import MLP, MLPConfig

# Overrides that shrink every zoo model to a few hundred/thousand parameters (for exact HVP checks).
TINY = {
    "gpt2-nano": dict(n_layer=2, n_embd=8, n_head=2, vocab_size=11, context=5),
    "bert-mini": dict(n_layer=2, n_embd=8, n_head=2, vocab_size=11, context=5),
    "vit-tiny": dict(image_size=8, patch_size=4, channels=2, n_layer=1, n_embd=8, n_head=2),
    "resnet18": dict(width=2, layers=(1, 2), channels=2, image_size=8),
    "vgg16": dict(widths=(2, 2, 3, 3, 3), fc_width=4, channels=1, num_classes=3),
    "mlp": dict(in_features=5, hidden_sizes=(4, 3), num_classes=3, activation="tanh"),
    "mlp-mixer": dict(image_size=8, patch_size=4, channels=2, n_layer=2, n_embd=4, token_hidden=3, channel_hidden=5),
}


# ---- user factories, imported by build_model("tests.test_models:...")


def tiny_factory(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))


def spec_factory(hidden: int = 4) -> ModelSpec:
    config = MLPConfig(in_features=6, hidden_sizes=(hidden,), num_classes=4)
    return ModelSpec("my-mlp", MLP(config), cross_entropy_loss, "vector", {"in_features": 6, "num_classes": 4}, config)


def not_a_model() -> int:
    return 3


NOT_CALLABLE = 5


# ---- helpers


def params_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def expected_output_shape(spec, x):
    if spec.task in ("text", "masked-text"):
        return (*x.shape, spec.data_shape["vocab_size"])
    return (x.shape[0], spec.data_shape["num_classes"])


# ---- every registry model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_runs_on_its_auto_data(name, dtype):
    spec = build_model(name, dtype=dtype)
    assert spec.name == name and not spec.model.training
    assert all(p.dtype == dtype for p in spec.model.parameters())
    (x, y), = make_batches(spec, batch_size=3, n_batches=1, dtype=dtype)
    out = spec.model(x)
    assert out.dtype == dtype and tuple(out.shape) == expected_output_shape(spec, x)
    loss = spec.loss_fn(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # at initialisation the loss is near that of a uniform guess over the classes
    n_classes = spec.data_shape.get("num_classes", spec.data_shape.get("vocab_size"))
    assert abs(loss.item() - math.log(n_classes)) < 1.0
    assert torch.equal(spec.model(x), out)  # deterministic in eval mode


def test_float64_model_matches_float32_model():
    f32, f64 = build_model("vit-tiny"), build_model("vit-tiny", dtype=torch.float64)
    for (n32, p32), (n64, p64) in zip(f32.model.named_parameters(), f64.model.named_parameters()):
        assert n32 == n64 and torch.equal(p32.double(), p64)


def test_gpt2_nano_parameters():
    spec = build_model("gpt2-nano")
    shapes = {name: tuple(p.shape) for name, p in spec.model.named_parameters()}
    assert len(shapes) == 69 == 2 + 16 * 4 + 3
    names = list(shapes)
    assert names[:2] == ["wte.weight", "wpe.weight"]
    layer0 = [
        "ln1.weight", "ln1.bias",
        "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
        "attn.v_proj.weight", "attn.v_proj.bias", "attn.o_proj.weight", "attn.o_proj.bias",
        "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias",
    ]  # fmt: skip
    for i in range(4):
        assert names[2 + 16 * i : 2 + 16 * (i + 1)] == [f"blocks.{i}.{n}" for n in layer0]
    assert names[-3:] == ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    assert shapes["wte.weight"] == (512, 128) and shapes["wpe.weight"] == (64, 128)
    for proj in "qkvo":
        assert shapes[f"blocks.3.attn.{proj}_proj.weight"] == (128, 128)
        assert shapes[f"blocks.3.attn.{proj}_proj.bias"] == (128,)
    assert shapes["blocks.0.mlp.fc.weight"] == (512, 128) and shapes["blocks.0.mlp.fc.bias"] == (512,)
    assert shapes["blocks.0.mlp.proj.weight"] == (128, 512) and shapes["blocks.0.mlp.proj.bias"] == (128,)
    assert shapes["lm_head.weight"] == (512, 128)
    assert spec.task == "text" and spec.data_shape == {"vocab_size": 512, "context": 64}


def test_gpt2_initialisation():
    p = dict(build_model("gpt2-nano", dtype=torch.float64).model.named_parameters())
    assert p["wte.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert p["lm_head.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert p["blocks.0.attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 4)
    assert p["blocks.1.attn.o_proj.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert p["blocks.1.mlp.proj.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert not p["blocks.2.mlp.fc.bias"].any() and not p["blocks.2.attn.v_proj.bias"].any()
    assert torch.equal(p["ln_f.weight"], torch.ones(128, dtype=torch.float64))


def test_vgg_classifier_keeps_vgg16s_gain_at_any_width():
    # VGG16 (torchvision): std 0.01 on fan-ins 25088, 4096, 4096 -> gains std * sqrt(fan_in) 1.58, 0.64, 0.64
    model = build_model("vgg16", dtype=torch.float64).model  # fan-ins 64, 64, 64
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    gains = [m.weight.std().item() * math.sqrt(m.in_features) for m in linears]
    assert gains == pytest.approx([0.01 * math.sqrt(25088), 0.01 * 64, 0.01 * 64], rel=0.05)
    assert all(not m.bias.any() for m in linears)
    wider = build_model("vgg16", widths=(8, 16, 32, 64, 512), fc_width=4096, dtype=torch.float64).model
    assert wider.classifier[2].weight.std().item() == pytest.approx(0.01, rel=0.01)  # VGG16's own 4096 -> 4096
    # the logits at init keep a usable scale (a fixed std 0.01 at fan-in 64 gave about 2e-5)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert 0.005 < model(images).std().item() < 0.5


def test_parameter_counts_of_other_models():
    counts = {name: len(list(build_model(name).model.parameters())) for name in MODEL_NAMES}
    assert counts["bert-mini"] == 2 + 2 + 16 * 4 + 6  # embeddings, embedding LN, layers, MLM head
    assert counts["vgg16"] == 2 * (13 + 3)
    assert counts["resnet18"] == 3 + 8 * 6 + 3 * 3 + 2  # stem, 8 blocks, 3 shortcuts, fc
    assert counts["mlp"] == 6


def test_seeding():
    a, b, c = (params_of(build_model("mlp-mixer", seed=s).model) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)  # not the constant LN/bias inits


def test_build_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_model("resnet18", seed=7)
    assert torch.equal(torch.get_rng_state(), state)


def test_overrides():
    spec = build_model("gpt2-nano", n_layer=2, vocab_size=300)
    assert spec.config.n_layer == 2
    assert len(list(spec.model.parameters())) == 2 + 16 * 2 + 3
    assert spec.data_shape == {"vocab_size": 300, "context": 64}
    assert spec.model.wte.weight.shape == (300, 128)
    mlp = build_model("mlp", hidden_sizes=[7, 5], in_features=3)  # lists stand for tuples
    assert mlp.config.hidden_sizes == (7, 5)
    assert [tuple(p.shape) for p in mlp.model.parameters()] == [(7, 3), (7,), (5, 7), (5,), (10, 5), (10,)]
    assert build_model("vgg16", image_size=64).model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_bad_names_and_overrides():
    with pytest.raises(ValueError, match="gpt2-nano.*mlp-mixer"):
        build_model("gpt3")
    with pytest.raises(ValueError, match="n_layr.*valid fields: n_layer, n_embd"):
        build_model("gpt2-nano", n_layr=2)
    with pytest.raises(ValueError, match="multiple of n_head"):
        build_model("bert-mini", n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("vit-tiny", image_size=30)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("vgg16", image_size=16)
    with pytest.raises(ValueError, match="activation"):
        build_model("mlp", activation="swish2")
    with pytest.raises(ValueError, match="exceeds the context"):
        build_model("gpt2-nano", context=4).model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_size_field_must_be_positive(name):
    """Every integer field of every bundled config, and every entry of its tuple fields, is a size:
    zero is refused with a message naming the config field (instead of a ZeroDivisionError or an empty model)."""
    config = build_model(name, **TINY[name]).config
    sizes = [f.name for f in dataclasses.fields(config) if type(getattr(config, f.name)) in (int, tuple)]
    assert sizes
    for field in sizes:
        value = getattr(config, field)
        if isinstance(value, tuple):
            bad, kind = (*value[:-1], 0), "a tuple of positive integers"
        else:
            bad, kind = 0, "a positive integer"
        with pytest.raises(ValueError, match=rf"{type(config).__name__}\.{field} must be {kind}, got "):
            build_model(name, **{**TINY[name], field: bad})


def test_size_fields_must_be_integers():
    for value in ("two", True, 2.0, -1):
        with pytest.raises(ValueError, match=f"GPTConfig.n_layer must be a positive integer, got {value!r}"):
            build_model("gpt2-nano", n_layer=value)
    with pytest.raises(ValueError, match="MLPConfig.hidden_sizes must be a tuple of positive integers, got 64"):
        build_model("mlp", hidden_sizes=64)
    assert build_model("mlp", hidden_sizes=[]).model(torch.zeros(2, 64)).shape == (2, 10)  # no hidden layer: linear


# ---- user models


def test_user_factory_returning_a_module():
    spec = build_model("tests.test_models:tiny_factory", seed=3, dtype=torch.float64, width=6)
    assert spec.task == "custom" and spec.data_shape == {} and spec.config is None
    assert spec.name == "tests.test_models:tiny_factory" and not spec.model.training
    assert spec.model[0].weight.shape == (6, 3) and spec.model[0].weight.dtype == torch.float64
    again = build_model("tests.test_models:tiny_factory", seed=3, dtype=torch.float64, width=6)
    assert torch.equal(spec.model[0].weight, again.model[0].weight)  # the factory runs seeded
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    expected = torch.nn.functional.cross_entropy(spec.model(x), y)
    assert spec.loss_fn(spec.model(x), y).item() == pytest.approx(expected.item(), rel=1e-14)


def test_user_factory_returning_a_spec():
    spec = build_model("tests.test_models:spec_factory", dtype=torch.float64, hidden=9)
    assert spec.name == "my-mlp" and spec.task == "vector" and spec.config.hidden_sizes == (9,)
    assert spec.model.hidden[0].weight.dtype == torch.float64 and not spec.model.training
    (x, y), = make_batches(spec, batch_size=2, n_batches=1, dtype=torch.float64)
    assert torch.isfinite(spec.loss_fn(spec.model(x), y))


def test_user_factory_errors():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg_hb.models'"):
        build_model("no_such_pkg_hb.models:factory")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_model("tests.test_models:missing")
    with pytest.raises(TypeError, match="not callable"):
        build_model("tests.test_models:NOT_CALLABLE")
    with pytest.raises(TypeError, match="returned int; expected a ModelSpec or an nn.Module"):
        build_model("tests.test_models:not_a_model")
    with pytest.raises(ValueError, match="package.module:factory"):
        build_model("tests.test_models:")


# ---- attention structure


def test_gpt_is_causal():
    model = build_model("gpt2-nano", dtype=torch.float64).model
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    t = 9
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 512
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-6  # every later position sees it


def test_bert_is_bidirectional():
    model = build_model("bert-mini", dtype=torch.float64).model
    idx = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 512
    assert (model(changed) - model(idx)).abs().amax(dim=-1).min() > 1e-6  # earlier positions too


# ---- exact second derivatives


def test_layer_norm_matches_torch():
    ours = LayerNorm(6).double()
    theirs = nn.LayerNorm(6).double()
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    assert [n for n, _ in LayerNorm(6, bias=False).named_parameters()] == ["weight"]


def tiny_spec(name, **more):
    return build_model(name, dtype=torch.float64, **dict(TINY[name], **more))


def loss_of_params(spec, batch):
    x, y = batch

    def loss(params):
        return spec.loss_fn(functional_call(spec.model, params, (x,)), y)

    return loss


def double_backward_hvp(spec, batch, v):
    """H v by reverse-over-reverse with plain torch.autograd: grad with create_graph, then grad of g . v."""
    params = dict(spec.model.named_parameters())
    loss = spec.loss_fn(spec.model(batch[0]), batch[1])
    g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    gv = sum((gi * v[k]).sum() for gi, k in zip(g, params))
    return dict(zip(params, torch.autograd.grad(gv, list(params.values()))))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_double_backward_hvp_equals_forward_over_reverse(name):
    spec = tiny_spec(name)
    batch = make_batches(spec, "synthetic", batch_size=3, n_batches=1, dtype=torch.float64)[0]
    params = {k: p.detach() for k, p in spec.model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    expected = double_backward_hvp(spec, batch, v)

    # forward-over-reverse with torch.func, and the same batched over two probes with vmap
    f = loss_of_params(spec, batch)
    _, hv = jvp(grad(f), (params,), (v,))
    v2 = {k: torch.stack([t, -2 * t]) for k, t in v.items()}
    hv2 = vmap(lambda u: jvp(grad(f), (params,), (u,))[1])(v2)

    scale = max(t.abs().max().item() for t in expected.values())
    assert scale > 1e-8  # a real curvature, not an identically zero product
    for k in params:
        torch.testing.assert_close(hv[k], expected[k], rtol=1e-10, atol=1e-13 * scale)
        torch.testing.assert_close(hv2[k][0], expected[k], rtol=1e-10, atol=1e-13 * scale)
        torch.testing.assert_close(hv2[k][1], -2 * expected[k], rtol=1e-10, atol=1e-13 * scale)


# still smaller instances (100-400 parameters) for dense Hessians
DENSE = {
    "gpt2-nano": dict(n_layer=1, n_embd=4),
    "bert-mini": dict(n_layer=1, n_embd=4),
    "vit-tiny": dict(n_embd=4, channels=1),
    "resnet18": dict(width=1, layers=(1, 1), channels=1),
    "vgg16": dict(widths=(1, 1, 2, 2, 2), fc_width=3),
    "mlp": {},
    "mlp-mixer": dict(n_layer=1, channels=1),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dense_hessian_matches_double_backward_and_finite_differences(name):
    """torch.func.hessian (vmap over forward-over-reverse of vjp) on the flat parameter vector, against
    plain double backward and central differences of the gradient. nn.LayerNorm fails the first
    comparison in torch 2.13 (its vmapped backward), which is why the zoo has its own LayerNorm."""
    spec = tiny_spec(name, **DENSE[name])
    # Move off the initialisation: with zero biases some ReLU inputs are exactly 0 there, a kink where
    # the gradient jumps and finite differences mean nothing.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in spec.model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = make_batches(spec, "synthetic", batch_size=2, n_batches=1, dtype=torch.float64)[0]
    params = {k: p.detach() for k, p in spec.model.named_parameters()}
    shapes, sizes = {k: p.shape for k, p in params.items()}, [p.numel() for p in params.values()]
    f = loss_of_params(spec, batch)

    def unflatten(theta):
        return {k: t.reshape(shapes[k]) for k, t in zip(params, theta.split(sizes))}

    def flat_loss(theta):
        return f(unflatten(theta))

    theta = torch.cat([p.reshape(-1) for p in params.values()])
    assert 50 <= theta.numel() <= 400
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    H = torch.func.hessian(flat_loss)(theta)
    hv = torch.cat([t.reshape(-1) for t in double_backward_hvp(spec, batch, unflatten(v)).values()])
    scale = hv.abs().max().item()
    assert scale > 1e-8
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-13 * H.abs().max().item())
    torch.testing.assert_close(H @ v, hv, rtol=1e-10, atol=1e-13 * scale)

    # central differences: H v = (g(theta + h v) - g(theta - h v)) / 2h + O(h^2)
    h, flat_grad = 1e-6, grad(flat_loss)
    fd = (flat_grad(theta + h * v) - flat_grad(theta - h * v)) / (2 * h)
    torch.testing.assert_close(fd, hv, rtol=0, atol=1e-6 * scale)
