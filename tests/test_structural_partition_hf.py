"""The structural default partition on real Hugging Face architectures (tiny models from configs).

For each architecture the paper's partition (Adam-mini v1.1: q and k one block per head, k with the
key/value head count; v, attention output and MLP weights one per output neuron; embeddings and
lm_head one per token; norm scales whole; biases per element) is written here by hand from the
model's own parameter layout, by parameter name as the official implementation does, and compared
with the default partition, which reads no names. Independently of both, the head blocks are
checked against the model's forward pass: perturbing the rows of one query (key) block must move
the attention probabilities of exactly one query head (one group of query heads sharing that key
head) and nothing else, and perturbing a value or output row must move none.
"""

import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from hessian_blocks.blocks import Partition, Rule  # noqa: E402
from hessian_blocks.partitions import AttentionLayout, default_rules, register_attention  # noqa: E402
from optim import AdamMini  # noqa: E402
from tests.oracles import hand_written_partition  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, FFN = 32, 4, 2, 12, 48, 40  # HEAD_DIM != HIDDEN / HEADS
BATCH, LENGTH = 2, 6
IMAGE, PATCH, MEL_BINS = 8, 4, 8

ROWS = {"split": "groups", "axis": 0, "size": 1}
COLUMNS = {"split": "groups", "axis": 1, "size": 1}
WHOLE = {"split": "whole"}


def heads(head_dim, axis=0):
    return {"split": "groups", "axis": axis, "size": head_dim}


def runs(pairs, axis=0):
    return {"split": "groups", "axis": axis, "runs": [list(p) for p in pairs]}


def llama_style(head_dim):
    return {
        "embed_tokens.weight": ROWS, "q_proj.weight": heads(head_dim), "k_proj.weight": heads(head_dim),
        "v_proj.weight": ROWS, "o_proj.weight": ROWS, "gate_proj.weight": ROWS, "up_proj.weight": ROWS,
        "down_proj.weight": ROWS, "input_layernorm.weight": WHOLE, "post_attention_layernorm.weight": WHOLE,
        "norm.weight": WHOLE, "lm_head.weight": ROWS,
    }


def decoder_config(**extra):
    return dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS,
                vocab_size=VOCAB, max_position_embeddings=16, **extra)


BERT_TABLE = {
    "word_embeddings.weight": ROWS, "position_embeddings.weight": ROWS, "token_type_embeddings.weight": ROWS,
    "LayerNorm.weight": WHOLE, "layer_norm.weight": WHOLE, "query.weight": heads(HIDDEN // HEADS),
    "key.weight": heads(HIDDEN // HEADS), "value.weight": ROWS, "dense.weight": ROWS,
}

# name -> (config class, model class, config kwargs, hand-written partition by parameter-name suffix, attention types)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", decoder_config(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM),
              llama_style(HEAD_DIM), ("LlamaAttention",)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", decoder_config(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM),
              llama_style(HEAD_DIM) | {"q_norm.weight": WHOLE, "k_norm.weight": WHOLE}, ("Qwen3Attention",)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", decoder_config(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM),
               llama_style(HEAD_DIM) | {"pre_feedforward_layernorm.weight": WHOLE,
                                        "post_feedforward_layernorm.weight": WHOLE},
               ("Gemma2Attention",)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", decoder_config(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM),
              llama_style(HEAD_DIM), ("Qwen2Attention",)),  # q/k/v carry biases
    "mistral": ("MistralConfig", "MistralForCausalLM", decoder_config(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM),
                llama_style(HEAD_DIM), ("MistralAttention",)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", decoder_config(num_key_value_heads=1, head_dim=HEAD_DIM),
              llama_style(HEAD_DIM), ("GemmaAttention",)),  # multi-query attention, lm_head tied to the embedding
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             decoder_config(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, pad_token_id=0),
             {"embed_tokens.weight": ROWS,
              "qkv_proj.weight": runs([(HEAD_DIM, HEADS + KV_HEADS), (1, KV_HEADS * HEAD_DIM)]),
              "o_proj.weight": ROWS, "gate_up_proj.weight": ROWS, "down_proj.weight": ROWS,
              "input_layernorm.weight": WHOLE, "post_attention_layernorm.weight": WHOLE, "norm.weight": WHOLE,
              "lm_head.weight": ROWS},
             ("Phi3Attention",)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", decoder_config(),
                 {"embed_in.weight": ROWS,
                  "query_key_value.weight": runs([(HIDDEN // HEADS, 2), (1, HIDDEN // HEADS)] * HEADS),
                  "dense.weight": ROWS, "dense_h_to_4h.weight": ROWS, "dense_4h_to_h.weight": ROWS,
                  "input_layernorm.weight": WHOLE, "post_attention_layernorm.weight": WHOLE,
                  "final_layer_norm.weight": WHOLE, "lm_head.weight": ROWS},
                 ("GPTNeoXAttention",)),
    "bert": ("BertConfig", "BertForMaskedLM", decoder_config(), BERT_TABLE, ("BertSelfAttention",)),
    "roberta": ("RobertaConfig", "RobertaForCausalLM", decoder_config(is_decoder=True, add_cross_attention=True),
                BERT_TABLE, ("RobertaSelfAttention", "RobertaCrossAttention")),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM",
                   dict(dim=HIDDEN, hidden_dim=FFN, n_layers=1, n_heads=HEADS, vocab_size=VOCAB,
                        max_position_embeddings=16),
                   {"word_embeddings.weight": ROWS, "position_embeddings.weight": ROWS, "LayerNorm.weight": WHOLE,
                    "q_lin.weight": heads(HIDDEN // HEADS), "k_lin.weight": heads(HIDDEN // HEADS),
                    "v_lin.weight": ROWS, "out_lin.weight": ROWS, "lin1.weight": ROWS, "lin2.weight": ROWS,
                    "vocab_transform.weight": ROWS, "sa_layer_norm.weight": WHOLE, "output_layer_norm.weight": WHOLE,
                    "vocab_layer_norm.weight": WHOLE},
                   ("DistilBertSelfAttention",)),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(d_model=HIDDEN, d_ff=FFN, num_layers=1, num_decoder_layers=1, num_heads=HEADS, d_kv=HEAD_DIM,
                vocab_size=VOCAB, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0),
           {"shared.weight": ROWS, "q.weight": heads(HEAD_DIM), "k.weight": heads(HEAD_DIM), "v.weight": ROWS,
            "o.weight": ROWS, "wi.weight": ROWS, "wo.weight": ROWS, "layer_norm.weight": WHOLE,
            "final_layer_norm.weight": WHOLE,
            # the papers are silent on T5's [buckets, heads] bias table: one block per head (see test below)
            "relative_attention_bias.weight": COLUMNS},
           ("T5Attention",)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=HIDDEN, n_layer=1, n_head=HEADS, vocab_size=VOCAB, n_positions=16, add_cross_attention=True),
             {"wte.weight": ROWS, "wpe.weight": ROWS,
              "c_attn.weight": runs([(HIDDEN // HEADS, 2 * HEADS), (1, HIDDEN)], axis=1),
              "crossattention.c_attn.weight": runs([(HIDDEN // HEADS, HEADS), (1, HIDDEN)], axis=1),
              "q_attn.weight": heads(HIDDEN // HEADS, axis=1), "c_proj.weight": COLUMNS, "c_fc.weight": COLUMNS,
              "ln_1.weight": WHOLE, "ln_2.weight": WHOLE, "ln_cross_attn.weight": WHOLE, "ln_f.weight": WHOLE},
             ("GPT2Attention",)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=VOCAB,
                 max_position_embeddings=16, word_embed_proj_dim=HIDDEN),
            {"embed_tokens.weight": ROWS, "embed_positions.weight": ROWS, "q_proj.weight": heads(HIDDEN // HEADS),
             "k_proj.weight": heads(HIDDEN // HEADS), "v_proj.weight": ROWS, "out_proj.weight": ROWS,
             "fc1.weight": ROWS, "fc2.weight": ROWS, "self_attn_layer_norm.weight": WHOLE,
             "final_layer_norm.weight": WHOLE},
            ("OPTAttention",)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(d_model=HIDDEN, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, vocab_size=VOCAB,
                  max_position_embeddings=16),
             {"shared.weight": ROWS, "embed_positions.weight": ROWS, "q_proj.weight": heads(HIDDEN // HEADS),
              "k_proj.weight": heads(HIDDEN // HEADS), "v_proj.weight": ROWS, "out_proj.weight": ROWS,
              "fc1.weight": ROWS, "fc2.weight": ROWS, "self_attn_layer_norm.weight": WHOLE,
              "encoder_attn_layer_norm.weight": WHOLE, "final_layer_norm.weight": WHOLE,
              "layernorm_embedding.weight": WHOLE},
             ("BartAttention",)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(d_model=HIDDEN, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, vocab_size=VOCAB,
                     num_mel_bins=MEL_BINS, max_source_positions=LENGTH, max_target_positions=16, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                {"embed_tokens.weight": ROWS, "embed_positions.weight": ROWS, "conv1.weight": ROWS,
                 "conv2.weight": ROWS, "q_proj.weight": heads(HIDDEN // HEADS), "k_proj.weight": heads(HIDDEN // HEADS),
                 "v_proj.weight": ROWS, "out_proj.weight": ROWS, "fc1.weight": ROWS, "fc2.weight": ROWS,
                 "self_attn_layer_norm.weight": WHOLE, "encoder_attn_layer_norm.weight": WHOLE,
                 "final_layer_norm.weight": WHOLE, "layer_norm.weight": WHOLE},
                ("WhisperAttention",)),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS,
                 image_size=IMAGE, patch_size=PATCH),
            {"cls_token": WHOLE, "position_embeddings": WHOLE, "projection.weight": ROWS,
             "q_proj.weight": heads(HIDDEN // HEADS), "k_proj.weight": heads(HIDDEN // HEADS), "v_proj.weight": ROWS,
             "o_proj.weight": ROWS, "fc1.weight": ROWS, "fc2.weight": ROWS, "layernorm_before.weight": WHOLE,
             "layernorm_after.weight": WHOLE, "layernorm.weight": WHOLE, "classifier.weight": ROWS},
            ("ViTAttention",)),
    "clip": ("CLIPConfig", "CLIPModel",
             dict(text_config=dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                                   num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=16),
                  vision_config=dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                                     num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH),
                  projection_dim=16),
             {"token_embedding.weight": ROWS, "position_embedding.weight": ROWS, "class_embedding": WHOLE,
              "patch_embedding.weight": ROWS, "q_proj.weight": heads(HIDDEN // HEADS),
              "k_proj.weight": heads(HIDDEN // HEADS), "v_proj.weight": ROWS, "out_proj.weight": ROWS,
              "fc1.weight": ROWS, "fc2.weight": ROWS, "layer_norm1.weight": WHOLE, "layer_norm2.weight": WHOLE,
              "final_layer_norm.weight": WHOLE, "pre_layrnorm.weight": WHOLE, "post_layernorm.weight": WHOLE,
              "visual_projection.weight": ROWS, "text_projection.weight": ROWS,
              "logit_scale": WHOLE},
             ("CLIPAttention",)),
    "electra": ("ElectraConfig", "ElectraForMaskedLM", decoder_config(embedding_size=16),
                BERT_TABLE | {"embeddings_project.weight": ROWS, "generator_predictions.dense.weight": ROWS},
                ("ElectraSelfAttention",)),
}


def build(arch, seed=0):
    config_class, model_class, kwargs, _, _ = ARCHITECTURES[arch]
    config = getattr(transformers, config_class)(**kwargs)
    config._attn_implementation = "eager"  # attention probabilities are materialised (and twice differentiable)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).double().eval()


def inputs(arch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=gen)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen, dtype=torch.float64)
    batch = {"input_ids": tokens, "labels": tokens}
    if arch in ("t5", "bart", "whisper"):
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, LENGTH - 2), generator=gen)
        batch["labels"] = batch["decoder_input_ids"]
    if arch == "whisper":  # log-mel features: 2 frames per encoder position
        del batch["input_ids"]
        batch["input_features"] = torch.randn(BATCH, MEL_BINS, 2 * LENGTH, generator=gen, dtype=torch.float64)
    if arch in ("gpt2", "roberta"):
        batch["encoder_hidden_states"] = torch.randn(BATCH, LENGTH + 1, HIDDEN, generator=gen, dtype=torch.float64)
    if arch == "vit":
        batch = {"pixel_values": images, "labels": torch.randint(0, 2, (BATCH,), generator=gen)}
    if arch == "clip":
        batch = {"input_ids": tokens, "pixel_values": images, "return_loss": True}
    return batch


def paper_rules(model, arch):
    """The paper's partition of ``model`` written by hand: biases per element, the rest by name suffix."""
    return hand_written_partition(model, ARCHITECTURES[arch][3])


def without_why(rules):
    return {name: {k: v for k, v in rule.to_dict().items() if k != "why"} for name, rule in rules.items()}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_partition_is_the_papers(arch):
    model = build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known architecture raises no "looks like attention" warning
        rules = default_rules(model)
    assert without_why(rules) == paper_rules(model, arch)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_training_with_the_default_equals_training_with_the_hand_written_partition(arch):
    models = [build(arch), build(arch)]
    # Whisper's encoder positions are fixed
    trainable = {name for name, p in models[1].named_parameters() if p.requires_grad}
    hand = Partition.from_rules(models[1], [Rule.from_dict(r) for name, r in paper_rules(models[1], arch).items()
                                            if name in trainable])
    optimizers = [AdamMini(models[0], lr=1e-2, weight_decay=0.1),
                  AdamMini(models[1], partition=hand, lr=1e-2, weight_decay=0.1)]
    start = [p.detach().clone() for p in models[0].parameters()]
    for step in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            model(**inputs(arch, seed=step)).loss.backward()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
    assert sum(not torch.equal(a, s) for a, s in zip(models[0].parameters(), start)) >= len(start) - 2  # it trained


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_head_blocks_are_the_heads_of_the_forward_pass(arch):
    """Each query block moves exactly one head's attention probabilities, each key block exactly its
    group of query heads, each value/output row none: the blocks sit on the model's true heads."""
    model, batch = build(arch), inputs(arch)
    rules = default_rules(model)
    attention_types = ARCHITECTURES[arch][4]
    probabilities = {}
    for path, module in model.named_modules():
        if type(module).__name__ in attention_types:
            module.register_forward_hook(
                lambda m, args, out, path=path: probabilities.__setitem__(path, out[-1].detach()))
    with torch.no_grad():
        model(**batch)
    base = dict(probabilities)
    assert base, f"no {attention_types} ran"
    gen = torch.Generator().manual_seed(1)
    for path, module in model.named_modules():
        if path not in base:
            continue
        n_heads = base[path].shape[1]
        moved_sets = []
        for local, param in module.named_parameters():
            rule = rules[f"{path}.{local}"]
            if rule.split != "groups":
                continue
            for block in rule.resolve(param.shape):
                original = param.detach().clone()
                with torch.no_grad():
                    view = param.narrow(block.axis, block.start, block.stop - block.start)
                    view.add_(torch.randn(view.shape, generator=gen, dtype=view.dtype))
                    model(**batch)
                    param.copy_(original)
                change = (probabilities[path] - base[path]).abs().amax(dim=(0, 2, 3))
                assert bool(((change < 1e-12) | (change > 1e-6)).all()), f"{block.name}: ambiguous change {change}"
                moved_sets.append(tuple(torch.nonzero(change > 1e-6).flatten().tolist()))
        moved = [s for s in moved_sets if s]
        singles = sorted(s for s in moved if len(s) == 1)
        groups = sorted(s for s in moved if len(s) > 1)
        kv_heads = getattr(model.config, "num_key_value_heads", None) or n_heads
        size = n_heads // kv_heads
        # q, k without GQA, T5's table
        per_head = 1 + (kv_heads == n_heads) + hasattr(module, "relative_attention_bias")
        assert singles == sorted([(h,) for h in range(n_heads)] * per_head), f"{path}: {moved_sets}"
        if kv_heads != n_heads:
            assert groups == [tuple(range(g * size, (g + 1) * size)) for g in range(kv_heads)], f"{path}: {moved_sets}"
        else:
            assert groups == [], f"{path}: {moved_sets}"


def test_t5_relative_bias_table_couples_within_heads():
    """T5's relative position bias [buckets, heads] gets one block per head, not one per bucket
    (row, the embedding rule) or per element (the official implementation: its name holds "bias"):
    in the dense Hessian its entries couple within a head's column far more than within a bucket's row."""
    model, batch = build("t5"), inputs("t5")
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    table = dict(model.named_parameters())[name].detach().clone()
    loss = lambda w: torch.func.functional_call(model, {name: w}, kwargs=batch).loss  # noqa: E731
    hessian = torch.autograd.functional.hessian(loss, table).reshape(table.numel(), table.numel())
    bucket, head = torch.arange(table.numel()) // table.shape[1], torch.arange(table.numel()) % table.shape[1]
    mass = hessian.square()

    def off_block(same):
        return float(1 - mass[same].sum() / mass.sum())

    per_head, per_bucket = off_block(head[:, None] == head[None, :]), off_block(bucket[:, None] == bucket[None, :])
    per_element = off_block(torch.eye(table.numel(), dtype=torch.bool))
    assert per_head < 0.5 * per_bucket and per_head < 0.5 * per_element, (per_head, per_bucket, per_element)
    assert default_rules(model)[name].axis == 1 and default_rules(model)[name].size == 1


def test_user_head_count_splits_gqa_keys_by_the_same_width():
    model = build("llama")
    rules = default_rules(model, n_heads=2)  # q: 48 features in 2 heads of 24; k: 24 features -> 1 head of 24
    assert (rules["model.layers.0.self_attn.q_proj.weight"].size
            == rules["model.layers.0.self_attn.k_proj.weight"].size == 24)
    fused = default_rules(build("phi3"), n_heads=2)["model.layers.0.self_attn.qkv_proj.weight"]
    assert fused.runs == ((24, 3), (1, 24))
    with pytest.raises(ValueError, match="48 projection features do not split into 5 heads"):
        default_rules(model, n_heads=5)


def test_registered_geometry_that_does_not_fit_is_an_error_naming_the_module():
    class FusedAttention(nn.Module):  # q|k|v rows of 4 query and 2 key/value heads of 12: 96 rows
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_key_value_heads, self.head_dim = HEADS, 1, HEAD_DIM  # the layout reads 1
            self.qkv_proj = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)

    register_attention(FusedAttention, AttentionLayout({"qkv_proj": "q|k|v"}, heads="num_heads",
                                                       kv_heads="num_key_value_heads", head_dim="head_dim"))
    with pytest.raises(ValueError,
                       match=r"'layers.0' \(FusedAttention\).*'qkv_proj' has 96 outputs.*needs 72"):
        default_rules(nn.ModuleDict({"layers": nn.ModuleList([FusedAttention()])}))


def test_unregistered_attention_warns_once_naming_module_and_fix():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 2
            self.wq, self.wk, self.wv = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.ModuleDict({"first": Attention(), "second": Attention(),
                           "mlp": nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))})
    with pytest.warns(UserWarning) as caught:
        rules = default_rules(model)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert ("'first' and 1 more (Attention) looks like attention" in message
            and "register_attention(Attention" in message)
    assert rules["first.wq.weight"].size == 1  # the fallback it announces: one block per output row

    register_attention(Attention, AttentionLayout({"wq": "q", "wk": "k", "wv": "v"}, heads="num_heads"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_rules(model)["second.wk.weight"].size == 4


def test_registered_layout_errors_are_clear():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

    register_attention(Attention, AttentionLayout({"qkv": "q|k|v"}, heads="config.num_attention_heads"))
    unreadable = r"'attn' \(Attention\): cannot read its head count from 'config.num_attention_heads'; pass n_heads="
    with pytest.raises(ValueError, match=unreadable):
        default_rules(nn.ModuleDict({"attn": Attention()}))
    assert default_rules(Attention(), n_heads=2)["qkv.weight"].runs == ((4, 4), (1, 8))
    register_attention(Attention, AttentionLayout({"missing": "q|k|v"}, heads="config.num_attention_heads"))
    with pytest.raises(ValueError,
                       match=r"Attention \(the model itself\): its layout's 'missing' is a NoneType, not a Linear"):
        default_rules(Attention(), n_heads=2)
    with pytest.raises(ValueError, match="'q' must appear in exactly one projection"):
        AttentionLayout({"a": "k|v"}, heads="n")
    with pytest.raises(ValueError, match=r"packing 'q\+k' is not understood"):
        AttentionLayout({"a": "q+k"}, heads="n")
