"""Hugging Face models through ``build_model("hf:...")``: built from configs (random weights, no network),
keyword batches, the models' own loss, exact float64 Hessians, and every command of the CLI."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch
import torch.nn as nn

from hessian_blocks import BlockHessian, Partition, PrecisionWarning, build_model, make_batches
from hessian_blocks.cli import main
from hessian_blocks.data import call_model
from hessian_blocks.models import ModelSpec, cross_entropy_loss
from hessian_blocks.models.hf import DEFAULT_CONTEXT, spec_from_config

from .oracles import dense_hessian

transformers = pytest.importorskip("transformers")

LLAMA = dict(num_hidden_layers=1, hidden_size=8, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=16, context=5)
# a few hundred parameters: the dense oracle takes one backward per parameter
GPT2 = dict(n_layer=1, n_embd=4, n_head=2, n_inner=6, n_positions=5, vocab_size=8, bos_token_id=0, eos_token_id=0,
            context=4)
BERT = dict(num_hidden_layers=1, hidden_size=4, intermediate_size=6, num_attention_heads=2, vocab_size=8,
            max_position_embeddings=5, type_vocab_size=1, context=4)
LLAMA_CLI = ["--model", "hf:LlamaForCausalLM", "--set", "num_hidden_layers=1", "--set", "hidden_size=16",
             "--set", "intermediate_size=32", "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2",
             "--set", "vocab_size=256", "--set", "context=8", "--batch-size", "2", "--no-progress"]


def float64_factory(width: int = 3) -> ModelSpec:
    """A user factory that builds its model in float64 (a test for build_model's dtype)."""
    model = nn.Sequential(nn.Linear(6, width, dtype=torch.float64), nn.Tanh(), nn.Linear(width, 4, dtype=torch.float64))
    return ModelSpec("float64-mlp", model, cross_entropy_loss, "vector", {"in_features": 6, "num_classes": 4}, None)


def test_built_from_the_config_class_seeded_eval_eager_without_cache():
    spec = build_model("hf:LlamaForCausalLM", seed=1, **LLAMA)
    model = spec.model
    assert isinstance(model, transformers.LlamaForCausalLM) and isinstance(spec.config, transformers.LlamaConfig)
    assert spec.name == "hf:LlamaForCausalLM" and spec.task == "text" and spec.keyword_inputs
    assert not model.training and model.config._attn_implementation == "eager" and model.config.use_cache is False
    assert spec.data_shape == {"vocab_size": 16, "context": 5} and model.config.num_key_value_heads == 1
    assert next(model.parameters()).dtype == torch.float32
    state = torch.random.get_rng_state()
    again = build_model("hf:LlamaForCausalLM", seed=1, **LLAMA).model
    other = build_model("hf:LlamaForCausalLM", seed=2, **LLAMA).model
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded without touching the global generator
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    # GPT-2's own field names and the common aliases both work; the context defaults to the positions' cap
    gpt2 = build_model("hf:GPT2LMHeadModel", num_hidden_layers=1, n_embd=8, n_head=2, vocab_size=16, n_positions=32)
    assert gpt2.config.n_layer == 1 and gpt2.data_shape["context"] == min(32, DEFAULT_CONTEXT)
    assert build_model("hf:BertForMaskedLM", **BERT).task == "masked-text"


def test_config_file_and_config_object(tmp_path):
    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "context"},
                                      architectures=["LlamaForCausalLM"])
    path = tmp_path / "config.json"
    config.to_json_file(path)
    from_file = build_model(f"hf:{path}", seed=0, context=5, num_hidden_layers=2)  # --set still overrides
    assert isinstance(from_file.model, transformers.LlamaForCausalLM) and from_file.config.num_hidden_layers == 2
    from_object = spec_from_config(config, seed=0, context=5)
    assert from_object.model.config.num_hidden_layers == 1 and from_object.task == "text"
    assert all(torch.equal(a, b) for a, b in zip(from_object.model.parameters(),
                                                build_model("hf:LlamaForCausalLM", **LLAMA).model.parameters()))
    full_size = spec_from_config(transformers.LlamaConfig(), transformers.LlamaForCausalLM, device="meta")
    assert full_size.model.lm_head.weight.shape == (32000, 4096) and full_size.model.lm_head.weight.is_meta
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match='names no model class: add "architectures"'):
        build_model(f"hf:{path}")


def test_clear_errors_for_big_defaults_typos_and_other_heads():
    with pytest.raises(ValueError, match=r"6\.74 billion parameters .*--set num_hidden_layers=2 --set hidden_size=64"):
        build_model("hf:LlamaForCausalLM")  # the default config: refused before any weight is allocated
    with pytest.raises(ValueError, match="no field.*num_hiden_layers \\(did you mean num_hidden_layers\\?\\)"):
        build_model("hf:LlamaForCausalLM", num_hiden_layers=1)
    with pytest.raises(ValueError, match="neither a causal nor a masked language model"):
        build_model("hf:LlamaModel", **{k: v for k, v in LLAMA.items() if k != "context"})
    with pytest.raises(ValueError, match="transformers has no model class 'LlamaForCausalLMM'"):
        build_model("hf:LlamaForCausalLMM")
    with pytest.raises(ValueError, match="context 9 exceeds the model's 5 positions"):
        build_model("hf:BertForMaskedLM", **{**BERT, "context": 9})


def test_keyword_batches_and_the_models_own_loss():
    spec = build_model("hf:LlamaForCausalLM", **LLAMA)
    (inputs, targets), = make_batches(spec, "synthetic", batch_size=3, n_batches=1)
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs["attention_mask"].eq(1).all()
    ids = inputs["input_ids"]
    assert torch.equal(targets[:, :-1], ids[:, 1:])  # next-token targets
    # the model's own loss (labels shifted inside the model) scores the first T-1 targets
    own = spec.model(**inputs, labels=ids).loss
    ours = spec.loss_fn(call_model(spec.model, inputs), targets.masked_fill(torch.arange(5) == 4, -100))
    assert ours.item() == pytest.approx(own.item(), rel=1e-6)

    masked = build_model("hf:BertForMaskedLM", **BERT)
    (inputs, targets), = make_batches(masked, "synthetic", batch_size=3, n_batches=1)
    own = masked.model(**inputs, labels=targets).loss
    assert masked.loss_fn(call_model(masked.model, inputs), targets).item() == pytest.approx(own.item(), rel=1e-6)


def test_dict_batches_with_labels_and_the_output_loss_work_in_block_hessian():
    """A user's own batches ({"input_ids", "attention_mask", "labels"}, labels) with loss_fn = output.loss
    (shifted inside the model) give the products of the spec's loss on the same T-1 targets."""
    spec = build_model("hf:LlamaForCausalLM", **LLAMA)
    (inputs, targets), = make_batches(spec, "synthetic", batch_size=3, n_batches=1)
    labelled = {**inputs, "labels": inputs["input_ids"]}
    own = BlockHessian(spec.model, lambda output, labels: output.loss, [(labelled, inputs["input_ids"])],
                       dtype=torch.float32)
    ours = BlockHessian(spec.model, spec.loss_fn, [(inputs, targets.masked_fill(torch.arange(5) == 4, -100))],
                        dtype=torch.float32)
    vectors = torch.randn(2, own.size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(own.block_matvec(vectors), ours.block_matvec(vectors), rtol=1e-4, atol=1e-6)


def test_padding_from_a_data_file_is_masked(tmp_path):
    spec = build_model("hf:LlamaForCausalLM", **LLAMA)
    x = torch.randint(0, 16, (4, 5))
    y = torch.roll(x, -1, dims=1)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0  # right padding of sample 1
    torch.save({"x": x, "y": y, "attention_mask": mask}, tmp_path / "padded.pt")
    (inputs, targets), = make_batches(spec, str(tmp_path / "padded.pt"), batch_size=4, n_batches=1)
    assert torch.equal(inputs["attention_mask"], mask) and (targets[1, 3:] == -100).all()
    assert torch.equal(targets[mask == 1], y[mask == 1])
    padded = x.clone()
    padded[1, 3:] = 7  # whatever stands in the padding changes nothing
    again = spec.loss_fn(spec.model(input_ids=padded, attention_mask=mask), targets)
    assert again.item() == pytest.approx(spec.loss_fn(call_model(spec.model, inputs), targets).item(), rel=1e-6)
    torch.save({"x": x, "y": y, "attention_mask": mask[:, :3]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="attention_mask must hold 0 \\(padding\\) and 1"):
        make_batches(spec, str(tmp_path / "bad.pt"), batch_size=4, n_batches=1)
    with pytest.raises(ValueError, match="takes one tensor of inputs and no mask: drop attention_mask"):
        make_batches(build_model("gpt2-nano", vocab_size=16, context=5), str(tmp_path / "padded.pt"), batch_size=4,
                     n_batches=1)


@pytest.mark.parametrize("name, overrides", [("hf:GPT2LMHeadModel", GPT2), ("hf:BertForMaskedLM", BERT)])
def test_float64_block_hessian_of_keyword_batches_equals_the_dense_hessian(name, overrides):
    spec = build_model(name, dtype=torch.float64, **overrides)
    batches = make_batches(spec, "synthetic", batch_size=3, n_batches=2, last_batch_size=2)
    dense = dense_hessian(spec.model, spec.loss_fn, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # float64 throughout: nothing to warn about
        hessian = BlockHessian(spec.model, spec.loss_fn, batches, Partition.per_tensor(spec.model))
    vectors = torch.randn(2, hessian.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = vectors @ dense.restrict(hessian.blocks, block_diagonal=True).T
    torch.testing.assert_close(hessian.block_matvec(vectors), expected, rtol=1e-10, atol=1e-12)


def test_sdpa_attention_asked_for_is_run_on_its_twice_differentiable_backend():
    """--set attn_implementation=sdpa overrides the eager default; the engine's SDPA guard (math backend)
    still gives the eager model's products (GPT-2: float64 throughout)."""
    eager = build_model("hf:GPT2LMHeadModel", dtype=torch.float64, **GPT2)
    sdpa = build_model("hf:GPT2LMHeadModel", dtype=torch.float64, attn_implementation="sdpa", **GPT2)
    assert sdpa.model.config._attn_implementation == "sdpa"
    batches = make_batches(eager, "synthetic", batch_size=2, n_batches=1)
    hessians = [BlockHessian(spec.model, spec.loss_fn, batches) for spec in (eager, sdpa)]
    vectors = torch.randn(1, hessians[0].size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hessians[1].block_matvec(vectors), hessians[0].block_matvec(vectors),
                               rtol=1e-10, atol=1e-13)


def test_llama_computes_norms_and_softmax_in_float32_and_says_so():
    """Transformers' Llama casts activations to float32 inside RMSNorm and the eager softmax: its float64
    products agree with the dense float64 Hessian to float32 accuracy only, and BlockHessian warns once
    (PrecisionWarning) naming the casts, the modules and the fix."""
    spec = build_model("hf:LlamaForCausalLM", dtype=torch.float64, **{**LLAMA, "vocab_size": 8, "intermediate_size": 4})
    batches = make_batches(spec, "synthetic", batch_size=2, n_batches=1)
    dense = dense_hessian(spec.model, spec.loss_fn, batches)
    with pytest.warns(PrecisionWarning) as caught:
        hessian = BlockHessian(spec.model, spec.loss_fn, batches)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "aten._to_copy (float64 -> float32) in 'model.layers.0.input_layernorm' (LlamaRMSNorm)" in message
    assert "'model.layers.0.self_attn' (LlamaAttention)" in message  # the eager softmax
    assert "only as accurate as float32" in message and "compute in its input's dtype" in message
    vectors = torch.randn(1, hessian.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = vectors @ dense.restrict(hessian.blocks, block_diagonal=True).T
    error = ((hessian.block_matvec(vectors) - expected).abs().max() / expected.abs().max()).item()
    assert 1e-10 < error < 1e-5  # the warning is right: float64 products, float32 accuracy


def test_a_float64_user_model_is_measured_in_float64():
    spec = build_model("tests.test_hf_models:float64_factory", seed=0)
    assert next(spec.model.parameters()).dtype == torch.float64  # no longer cast to float32
    (x, _), = make_batches(spec, "synthetic", batch_size=2, n_batches=1)
    assert x.dtype == torch.float64  # the data follows the model
    weight = spec.model[0].weight
    assert not torch.equal(weight, weight.float().double())  # float64 values, not float32 ones cast up
    assert build_model("tests.test_hf_models:float64_factory",
                       dtype=torch.float32).model[0].weight.dtype == torch.float32


@pytest.mark.slow
def test_cli_spectrum_js_partition_and_compare_on_a_llama_from_config(tmp_path, capsys):
    assert main(["spectrum", *LLAMA_CLI, "--steps", "4", "--probes", "1", "--grid-points", "4000", "--sigma2", "1e-3",
                 "--sample-layers", "1", "--out", str(tmp_path / "spectrum")]) == 0
    assert (tmp_path / "spectrum" / "hf_LlamaForCausalLM" / "density.npz").stat().st_size > 0
    assert main(["js", *LLAMA_CLI, "--steps", "6", "--probes", "2", "--grid-points", "4000", "--sigma2", "1e-3",
                 "--blocks", "model.layers.0.self_attn.*", "--out", str(tmp_path / "js")]) == 0
    table = pd.read_csv(tmp_path / "js" / "hf_LlamaForCausalLM" / "blocks.csv")
    assert list(table["block"]) == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"]
    assert "JS0 = " in capsys.readouterr().out

    out = tmp_path / "partition.json"
    assert main(["partition", *LLAMA_CLI, "--method", "probes", "--probes", "2", "--out", str(out)]) == 0
    model = build_model("hf:LlamaForCausalLM", num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256).model
    partition = Partition.load(out, model)
    assert set(partition.param_shapes) == {n for n, _ in model.named_parameters()}

    assert main(["compare", *LLAMA_CLI[:-3], "--size", "small", "--optimizer", "adam_mini", "--lr", "adam_mini=1e-2",
                 "--steps", "3", "--val-batches", "1", "--batch-size", "2", "--no-progress",
                 "--out", str(tmp_path / "cmp")]) == 0
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert len(runs) == 1 and runs["train_loss"].between(0, 10).all() and not runs["diverged"].any()


def test_cli_refuses_a_full_size_default_with_the_fix(capsys):
    assert main(["js", "--model", "hf:LlamaForCausalLM", "--no-progress"]) == 2
    assert "billion parameters" in capsys.readouterr().err


# 5 layers of width 4096 (512 heads of 8, 2 key/value heads), MLP 11008, vocabulary 32000: 1.11 billion parameters
OVER_THE_GUARD = ["--model", "hf:LlamaForCausalLM", "--set", "num_hidden_layers=5", "--set", "hidden_size=4096",
                  "--set", "intermediate_size=11008", "--set", "num_attention_heads=512",
                  "--set", "num_key_value_heads=2", "--set", "vocab_size=32000", "--set", "context=8"]


def test_partition_with_small_maps_onto_a_model_over_the_size_guard_without_building_it(tmp_path, capsys):
    out = tmp_path / "p.json"
    measure = ["--data", "synthetic", "--batch-size", "2", "--method", "probes", "--probes", "2", "--no-progress",
               "--out", str(out)]
    assert main(["partition", *OVER_THE_GUARD, *measure]) == 2  # measuring the model itself: refused
    err = capsys.readouterr().err
    assert "1.11 billion parameters" in err and "partition --small auto needs only its shapes" in err
    assert main(["partition", *OVER_THE_GUARD, "--small", "auto", "--small", "vocab_size=64", *measure]) == 0
    printed = capsys.readouterr().out
    assert ("(measured on the smaller instance num_hidden_layers=2 num_attention_heads=4 hidden_size=32 "
            "vocab_size=64 intermediate_size=86)") in printed
    overrides = {field: json.loads(value) for field, value in
                 (pair.split("=") for pair in OVER_THE_GUARD[3::2])}
    full = build_model("hf:LlamaForCausalLM", device="meta", **overrides).model
    layer = 2 * 4096 * 4096 + 2 * 16 * 4096 + 3 * 11008 * 4096 + 2 * 4096
    assert sum(p.numel() for p in full.parameters()) == 5 * layer + 2 * 32000 * 4096 + 4096 > 10**9
    assert full.lm_head.weight.is_meta
    partition = Partition.load(out, full)  # every tensor of the full model, shapes checked
    sizes: dict[str, set] = {}
    for block in partition.blocks:
        sizes.setdefault(block.param, set()).add(block.shape)
    for layer in range(5):  # layers 2..4 took the rules of the small instance's last layer
        attention = f"model.layers.{layer}.self_attn"
        assert sizes[f"{attention}.q_proj.weight"] == {(8, 4096)}  # one block per head of 8 rows: 512 heads
        assert sizes[f"{attention}.k_proj.weight"] == {(8, 4096)}  # 2 key heads
        assert sizes[f"{attention}.v_proj.weight"] == {(1, 4096)}
        assert sizes[f"model.layers.{layer}.mlp.down_proj.weight"] == {(1, 11008)}
    assert sizes["model.embed_tokens.weight"] == {(1, 4096)} and sizes["lm_head.weight"] == {(1, 4096)}
    assert sum(1 for block in partition.blocks if block.param == "lm_head.weight") == 32000



def test_a_config_transformers_refuses_exits_2_naming_the_fields_to_set(capsys):
    llama = ["--model", "hf:LlamaForCausalLM", "--set", "num_hidden_layers=1", "--set", "hidden_size=30",
             "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2", "--set", "vocab_size=64"]
    assert main(["js", *llama, "--no-progress"]) == 2  # refused by the config's own validation
    assert capsys.readouterr().err == (
        "hessian-blocks js: error: hf:LlamaForCausalLM: LlamaConfig refuses this config: The hidden size (30) is not a "
        "multiple of the number of attention heads (4). (the fields it names: hidden_size=30, num_attention_heads=4; "
        "change them with --set FIELD=VALUE)\n")
    # refused when the model is built, quoting other names (embed_dim, num_heads): the fields by their values
    with pytest.raises(ValueError, match=r"GPT2Config refuses this config: `embed_dim` must be divisible by "
                                         r"num_heads \(got `embed_dim`: 30 and `num_heads`: 4\)\. \(the fields it "
                                         r"names: n_embd=30, n_head=4; change them with --set FIELD=VALUE\)") as caught:
        build_model("hf:GPT2LMHeadModel", n_layer=1, n_embd=30, n_head=4, vocab_size=64)
    assert isinstance(caught.value.__cause__, ValueError)  # transformers' own error stays chained
    with pytest.raises(ValueError, match=r"not divisible by the number of attention heads! Make sure to update them! "
                                         r"\(the fields it names: hidden_size=30, num_attention_heads=4;"):
        build_model("hf:GPTNeoXForCausalLM", num_hidden_layers=1, hidden_size=30, num_attention_heads=4)


def test_special_token_ids_follow_a_shrunk_vocabulary_unless_set(capfd):
    gpt2 = build_model("hf:GPT2LMHeadModel", n_layer=1, n_embd=8, n_head=2, vocab_size=64).config
    assert (gpt2.bos_token_id, gpt2.eos_token_id, gpt2.pad_token_id) == (63, 63, None)  # the family's 50256
    phi3 = build_model("hf:Phi3ForCausalLM", num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=64)  # pad 32000 failed to build
    assert (phi3.config.bos_token_id, phi3.config.eos_token_id, phi3.config.pad_token_id) == (1, 63, None)
    assert phi3.model.model.embed_tokens.padding_idx is None
    assert "vocabulary" not in capfd.readouterr().err  # transformers warned about every out-of-range id
    kept = build_model("hf:GPT2LMHeadModel", n_layer=1, n_embd=8, n_head=2, vocab_size=64, eos_token_id=5).config
    assert (kept.bos_token_id, kept.eos_token_id) == (63, 5)
    assert build_model("hf:BertForMaskedLM", **BERT).config.pad_token_id == 0  # inside: left alone
    with pytest.raises(ValueError, match=r"hf:GPT2LMHeadModel: eos_token_id=100 is outside the vocabulary of 64 ids "
                                         r"\(vocab_size\): use --set eos_token_id=N with 0 <= N < 64"):
        build_model("hf:GPT2LMHeadModel", n_layer=1, n_embd=8, n_head=2, vocab_size=64, eos_token_id=100)
