"""The default partition where no layout is registered: attention heads read from the traced forward.

Each Hugging Face family below is registered nowhere; it is built from its config (1 layer, hidden
32, 4 heads, 2 key/value heads where the family has grouped-query attention) and its paper
partition (Adam-mini v1.1: q and k one block per head, k with the key/value head count; v,
attention output, MLP weights one per output row; embeddings and lm_head one per token; norms
whole; biases per element) is written here by hand, from the packing read in the installed
transformers source, and compared rule by rule with the default partition. Independently of both,
the head blocks are checked against the model's forward: perturbing one query (key) block moves
the attention probabilities of exactly one query head (of the query heads sharing that key head),
and a value or output row moves none. Two attentions written here from scratch: one with its heads
packed in an unusual order (which the trace places), one with einsum over packed 3-D weights
(which it cannot place, and says so).
"""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

transformers = pytest.importorskip("transformers")

from hessian_blocks.partitions import default_rules  # noqa: E402
from hessian_blocks.partitions.trace import trace_attention  # noqa: E402
from tests.oracles import hand_written_partition  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, FFN = 32, 4, 2, 8, 48, 40
BATCH, LENGTH = 2, 6

ROWS = {"split": "groups", "axis": 0, "size": 1}
WHOLE = {"split": "whole"}
ELEMENTS = {"split": "elements"}


def heads(head_dim=HEAD_DIM):
    return {"split": "groups", "axis": 0, "size": head_dim}


def runs(pairs, axis=0):
    """Run-length groups as a partition file writes them: neighbouring runs of one size merged."""
    merged = []
    for size, count in pairs:
        if merged and merged[-1][0] == size:
            merged[-1][1] += count
        else:
            merged.append([size, count])
    return {"split": "groups", "axis": axis, "runs": merged}


def decoder(**extra):
    return dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS,
                vocab_size=VOCAB, max_position_embeddings=16, **extra)


def separate(q="q_proj", k="k_proj", v="v_proj", o="o_proj", head_dim=HEAD_DIM):
    return {q + ".weight": heads(head_dim), k + ".weight": heads(head_dim), v + ".weight": ROWS, o + ".weight": ROWS}


LLAMA_MLP = {"gate_proj.weight": ROWS, "up_proj.weight": ROWS, "down_proj.weight": ROWS}
TOKENS = {"embed_tokens.weight": ROWS, "lm_head.weight": ROWS}
NORMS = {name + ".weight": WHOLE for name in (
    "input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm", "norm",
    "q_norm", "k_norm", "q_layernorm", "k_layernorm", "ln_1", "ln_2", "ln_f", "ln_attn", "ln_mlp", "norm_1", "norm_2",
    "norm_f", "final_layernorm", "word_embeddings_layernorm")}
INTERLEAVED = runs([(HEAD_DIM, 2), (1, HEAD_DIM)] * HEADS)  # [q_h | k_h | v_h] per head

# name -> (config class, model class, config kwargs, hand-written partition by name suffix, key/value heads)
FAMILIES = {
    # separate q / k / v projections
    "olmo": ("OlmoConfig", "OlmoForCausalLM", decoder(num_key_value_heads=KV_HEADS, clip_qkv=8.0),
             TOKENS | separate() | LLAMA_MLP, KV_HEADS),  # its LayerNorms have no parameters
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", decoder(num_key_value_heads=KV_HEADS),  # q/k norms: whole projection
              TOKENS | separate() | LLAMA_MLP | NORMS, KV_HEADS),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",  # q/k/v biases, one LayerNorm per head
                 decoder(num_key_value_heads=KV_HEADS, use_qkv_bias=True, qk_layernorm=True,
                         partial_rotary_factor=0.5),
                 TOKENS | separate() | LLAMA_MLP | NORMS | {f"norms.{h}.weight": WHOLE for h in range(HEADS)},
                 KV_HEADS),
    "cohere": ("CohereConfig", "CohereForCausalLM",  # q/k norms with a [heads, head_dim] weight; tied lm_head
               decoder(num_key_value_heads=KV_HEADS, use_qk_norm=True), TOKENS | separate() | LLAMA_MLP | NORMS,
               KV_HEADS),
    "granite": ("GraniteConfig", "GraniteForCausalLM", decoder(num_key_value_heads=KV_HEADS),
                TOKENS | separate() | LLAMA_MLP | NORMS, KV_HEADS),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", decoder(num_key_value_heads=KV_HEADS),  # biases
                   TOKENS | separate() | {"c_fc.weight": ROWS, "c_proj.weight": ROWS} | NORMS, KV_HEADS),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # per-head q/k norms, head_dim != hidden / heads
               decoder(num_key_value_heads=KV_HEADS, head_dim=12), TOKENS | separate(head_dim=12) | LLAMA_MLP | NORMS,
               KV_HEADS),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=HIDDEN, n_layer=1, n_head=HEADS, vocab_size=VOCAB, n_positions=16, rotary_dim=4, n_inner=FFN),
             {"wte.weight": ROWS, "lm_head.weight": ROWS, "fc_in.weight": ROWS, "fc_out.weight": ROWS}
             | separate(o="out_proj") | NORMS, HEADS),
    "phi": ("PhiConfig", "PhiForCausalLM", decoder(num_key_value_heads=KV_HEADS, qk_layernorm=True),
            TOKENS | separate(o="dense") | {"fc1.weight": ROWS, "fc2.weight": ROWS} | NORMS, KV_HEADS),
    # fused projections
    "falcon_grouped": ("FalconConfig", "FalconForCausalLM",  # per key/value head: [its q heads | k | v]
                       dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=VOCAB,
                            new_decoder_architecture=True, num_kv_heads=KV_HEADS, ffn_hidden_size=FFN),
                       {"word_embeddings.weight": ROWS,
                        "query_key_value.weight": runs([(HEAD_DIM, HEADS // KV_HEADS + 1), (1, HEAD_DIM)] * KV_HEADS),
                        "dense.weight": ROWS, "dense_h_to_4h.weight": ROWS, "dense_4h_to_h.weight": ROWS} | NORMS,
                       KV_HEADS),
    "falcon_multi_query": ("FalconConfig", "FalconForCausalLM",  # [all q heads | one k | one v]
                           dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=VOCAB,
                                new_decoder_architecture=False, multi_query=True, ffn_hidden_size=FFN),
                           {"word_embeddings.weight": ROWS, "query_key_value.weight": runs([(HEAD_DIM, HEADS + 1),
                                                                                            (1, HEAD_DIM)]),
                            "dense.weight": ROWS, "dense_h_to_4h.weight": ROWS, "dense_4h_to_h.weight": ROWS} | NORMS,
                           1),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=HIDDEN, n_layer=1, n_head=HEADS, vocab_size=VOCAB),
              {"word_embeddings.weight": ROWS, "query_key_value.weight": INTERLEAVED, "dense.weight": ROWS,
               "dense_h_to_4h.weight": ROWS, "dense_4h_to_h.weight": ROWS} | NORMS, HEADS),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",  # multi-query: [all q heads | k | v]
                    dict(n_embd=HIDDEN, n_layer=1, n_head=HEADS, vocab_size=VOCAB, n_positions=16, n_inner=FFN,
                         multi_query=True),
                    {"wte.weight": ROWS, "wpe.weight": ROWS,
                     "c_attn.weight": runs([(HEAD_DIM, HEADS + 1), (1, HEAD_DIM)]), "c_proj.weight": ROWS,
                     "c_fc.weight": ROWS} | NORMS, 1),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",  # 4 "mp" chunks, each [q | v | k] of its heads
                dict(n_embd=HIDDEN, n_layer=1, n_head=HEADS, vocab_size=VOCAB, n_positions=16, rotary_dim=4,
                     n_inner=FFN),
                {"wte.weight": ROWS, "lm_head.weight": ROWS,
                 "qkv_proj.weight": runs([(HEAD_DIM, 1), (1, HEAD_DIM), (HEAD_DIM, 1)] * HEADS),
                 "out_proj.weight": ROWS, "fc_in.weight": ROWS, "fc_out.weight": ROWS} | NORMS, HEADS),
    "mpt": ("MptConfig", "MptForCausalLM",  # contiguous [q | k | v]
            dict(d_model=HIDDEN, n_layers=1, n_heads=HEADS, vocab_size=VOCAB, max_seq_len=16, expansion_ratio=1),
            {"wte.weight": ROWS, "Wqkv.weight": runs([(HEAD_DIM, 2 * HEADS), (1, HIDDEN)]), "out_proj.weight": ROWS,
             "up_proj.weight": ROWS, "down_proj.weight": ROWS} | NORMS, HEADS),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", decoder(qk_layernorm=True),  # per-head norms
                  TOKENS | {"query_key_value.weight": INTERLEAVED, "dense.weight": ROWS, "dense_h_to_4h.weight": ROWS,
                            "dense_4h_to_h.weight": ROWS} | NORMS, HEADS),
}


def build(family, seed=0):
    config_class, model_class, kwargs, _, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**kwargs)
    config._attn_implementation = "eager"  # the attention probabilities go through a softmax we can watch
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).double().eval()


def without_why(rules):
    return {name: {k: v for k, v in rule.to_dict().items() if k != "why"} for name, rule in rules.items()}


class AttentionProbabilities(TorchFunctionMode):
    """Records every softmax output of four dimensions: attention probabilities [batch, heads, queries, keys]."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (F.softmax, torch.softmax, torch.Tensor.softmax) and out.ndim == 4:
            self.seen.append(out.detach())
        return out


def moved_heads(model, forward, attention_params):
    """For every block of the grouped parameters given: the query heads whose attention probabilities it moves."""
    with torch.no_grad(), AttentionProbabilities() as base:
        forward(model)
    assert len(base.seen) == 1, f"{len(base.seen)} attention softmaxes, expected one"
    gen = torch.Generator().manual_seed(1)
    moved = []
    for param, rule in attention_params:
        for block in rule.resolve(param.shape):
            original = param.detach().clone()
            with torch.no_grad(), AttentionProbabilities() as perturbed:
                view = param.narrow(block.axis, block.start, block.stop - block.start)
                view.add_(torch.randn(view.shape, generator=gen, dtype=view.dtype))
                forward(model)
                param.copy_(original)
            change = (perturbed.seen[0] - base.seen[0]).abs().amax(dim=(0, 2, 3))
            assert bool(((change < 1e-12) | (change > 1e-6)).all()), f"{block.name}: ambiguous change {change}"
            moved.append(tuple(torch.nonzero(change > 1e-6).flatten().tolist()))
    return moved


def assert_blocks_are_heads(moved, n_heads, kv_heads):
    """q blocks: one head each; k blocks: the query heads sharing the key head; everything else: none."""
    singles = sorted(s for s in moved if len(s) == 1)
    groups = sorted(s for s in moved if len(s) > 1)
    size = n_heads // kv_heads
    per_head = 1 + (kv_heads == n_heads)  # q, and k without grouped-query attention
    assert singles == sorted([(h,) for h in range(n_heads)] * per_head), moved
    expected_groups = [] if size == 1 else [tuple(range(g * size, (g + 1) * size)) for g in range(kv_heads)]
    assert groups == expected_groups, moved


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_traced_partition_is_the_papers(family):
    model = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unplaced
        rules = default_rules(model)
    assert without_why(rules) == hand_written_partition(model, FAMILIES[family][3])
    assert any("traced attention" in (rule.why or "") for rule in rules.values())


# Olmo2 normalises the whole q (k) projection before splitting heads: any head's rows move every head's
# probabilities through the norm's statistic, so the forward cannot single a head out there.
WHOLE_PROJECTION_NORMS = {"olmo2"}


@pytest.mark.parametrize("family", sorted(FAMILIES.keys() - WHOLE_PROJECTION_NORMS))
def test_traced_head_blocks_are_the_heads_of_the_forward_pass(family):
    model = build(family)
    rules = default_rules(model)
    attention = next(p.attention.module for p in trace_attention(model).projections.values())
    params = [(p, rules[name]) for name, p in model.named_parameters()
              if name.startswith(attention + ".") and rules[name].split == "groups"]
    tokens = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    moved = moved_heads(model, lambda m: m(input_ids=tokens), params)
    assert_blocks_are_heads(moved, HEADS, FAMILIES[family][4])


def test_keys_are_placed_when_the_queries_come_from_no_projection_the_trace_follows():
    """JetMoE's queries come from 3-D expert tensors (mixture of attention heads): its key heads are still
    read from the score product (the experts get their rule with the 3-D expert format)."""
    config = transformers.JetMoeConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_key_value_heads=KV_HEADS,
                                       kv_channels=HEAD_DIM, vocab_size=VOCAB, intermediate_size=FFN,
                                       num_local_experts=4, num_experts_per_tok=2)
    rules = default_rules(transformers.JetMoeForCausalLM(config))
    kv = rules["model.layers.0.self_attention.kv_proj.weight"]
    assert kv.runs == ((HEAD_DIM, KV_HEADS), (1, KV_HEADS * HEAD_DIM))  # [k heads | v rows]
    assert "query heads not traced, 2 key/value heads" in kv.why


def test_user_head_count_on_a_traced_fused_projection():
    model = build("mpt")
    rules = default_rules(model, n_heads=2)  # 32 query rows in 2 heads of 16; keys split by the same width
    assert rules["transformer.blocks.0.attn.Wqkv.weight"].runs == ((16, 4), (1, HIDDEN))
    with pytest.raises(ValueError, match="32 projection features do not split into 3 heads"):
        default_rules(model, n_heads=3)


# ----------------------------------------------------------------------------- attention written from scratch


class PackedAttention(nn.Module):
    """Grouped-query attention with one fused weight stored [in, out] (a raw parameter, used as x @ w):
    for each key/value head g its columns are [q_(2g) | v_g | k_g | q_(2g+1)]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM) / math.sqrt(HIDDEN))
        self.b = nn.Parameter(torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM) * 0.1)
        self.out = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x):
        B, T, _ = x.shape
        y = (x @ self.w + self.b).view(B, T, KV_HEADS, 4, HEAD_DIM)
        q = torch.stack([y[:, :, :, 0], y[:, :, :, 3]], dim=3).flatten(2, 3).transpose(1, 2)
        v, k = y[:, :, :, 1].transpose(1, 2), y[:, :, :, 2].transpose(1, 2)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        probabilities = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).softmax(-1)
        return self.out((probabilities @ v).transpose(1, 2).reshape(B, T, -1))


class EinsumAttention(nn.Module):
    """Heads packed into 3-D weights [heads, in, head_dim], contracted with einsum."""

    def __init__(self):
        super().__init__()
        self.num_heads = HEADS
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(HEADS, HIDDEN, HEAD_DIM) * 0.1) for _ in range(3))
        self.wo = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, x):
        q, k, v = (torch.einsum("btc,hcd->bhtd", x, w) for w in (self.wq, self.wk, self.wv))
        probabilities = torch.einsum("bhtd,bhsd->bhts", q, k).softmax(-1)
        return self.wo(torch.einsum("bhts,bhsd->bthd", probabilities, v).flatten(2))


class TinyModel(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.attn = attention
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens):
        return self.head(self.attn(self.embed(tokens)))


def test_heads_packed_in_an_unusual_order_are_placed():
    torch.manual_seed(0)
    model = TinyModel(PackedAttention()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rules = without_why(default_rules(model))
    per_group = [(HEAD_DIM, 1), (1, HEAD_DIM), (HEAD_DIM, 2)]  # q | v rows | k, q
    assert rules["attn.w"] == {"param": "attn.w", **runs(per_group * KV_HEADS, axis=1)}
    assert rules["attn.b"] == {"param": "attn.b", **ELEMENTS}  # added to the projection: a bias
    assert rules["attn.out.weight"] == {"param": "attn.out.weight", **ROWS}
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    full = default_rules(model)
    moved = moved_heads(model, lambda m: m(tokens), [(model.attn.w, full["attn.w"])])
    assert_blocks_are_heads(moved, HEADS, KV_HEADS)


def test_einsum_over_packed_heads_warns_naming_the_module_and_what():
    model = TinyModel(EinsumAttention())
    with pytest.warns(UserWarning) as caught:
        rules = default_rules(model)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert ("'attn' (EinsumAttention): the traced forward reached its attention but cannot place its heads: "
            "'wq' (shape [4, 32, 8]) enters its product through aten._unsafe_view, which mixes its axes") in messages[0]
    assert "register_attention(EinsumAttention" in messages[0]
    assert rules["attn.wq"].split == "whole"  # the fallback it announces


def test_scores_masked_with_a_tensor_value_are_followed():
    """CPM-Ant fills its masked scores with a 0-dim tensor between q . k^T and the softmax (ATen does not
    tag aten.masked_fill.Tensor pointwise): the trace still reaches the softmax and places the heads."""
    config = transformers.CpmAntConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                       dim_head=HEAD_DIM, dim_ff=FFN, num_hidden_layers=1, prompt_types=2,
                                       prompt_length=2, segment_types=2)
    model = transformers.CpmAntForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unplaced
        rules = default_rules(model)
    attention = "cpmant.encoder.layers.0.self_att.self_attention."
    assert [rules[attention + f"project_{p}.weight"].size for p in "qkv"] == [HEAD_DIM, HEAD_DIM, 1]
    assert "traced attention" in rules[attention + "project_q.weight"].why


def test_attention_the_forward_does_not_use_warns_so():
    """BART's decoder run alone (BartForCausalLM, no encoder states) never enters its cross-attention:
    the warning says its weights were not used and how to reach them; its self-attention is placed."""
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, decoder_layers=1, encoder_layers=1,
                                     decoder_attention_heads=HEADS, encoder_attention_heads=HEADS,
                                     decoder_ffn_dim=FFN, encoder_ffn_dim=FFN, max_position_embeddings=16)
    model = transformers.BartForCausalLM(config)
    with pytest.warns(UserWarning) as caught:
        rules = default_rules(model)
    messages = [str(w.message) for w in caught if "looks like attention" in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("'model.decoder.layers.0.encoder_attn' (BartAttention) looks like attention")
    assert "the traced forward did not use its weights" in messages[0] and "inputs=" in messages[0]
    assert rules["model.decoder.layers.0.encoder_attn.q_proj.weight"].size == 1   # the fallback it announces
    assert rules["model.decoder.layers.0.self_attn.q_proj.weight"].size == HEAD_DIM


def test_a_head_count_without_a_query_key_product_warns_saying_so():
    """A mixer with a head count and two projections that the forward uses, but with no query-key
    product (a state-space or gated mixer): the warning says the projections reached none."""
    class GatedMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = HEADS
            self.in_proj, self.out_proj = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            value, gate = self.in_proj(x).chunk(2, dim=-1)
            return self.out_proj(value * torch.sigmoid(gate))

    with pytest.warns(UserWarning, match=r"'attn' \(GatedMixer\) looks like attention .* saw none of its "
                                         r"projections reach a query-key product .*state-space mixer"):
        default_rules(TinyModel(GatedMixer()))


def test_a_forward_that_needs_values_is_traced_on_the_model_itself():
    class Gated(PackedAttention):
        def forward(self, x):
            if x.abs().sum().item() == 0:  # a data-dependent branch: no meta tensor has a value
                return x
            return super().forward(x)

    trace = trace_attention(TinyModel(Gated()))
    assert trace.failure is None and trace.projections["attn.w"].axis == 1


def test_example_inputs_when_none_can_be_made_up():
    class Patches(nn.Module):  # a convolution first: no input can be made up for it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, HIDDEN, 4, stride=4)
            self.attn = PackedAttention()

        def forward(self, images):
            return self.attn(self.conv(images).flatten(2).transpose(1, 2))

    model = Patches()
    assert "pass inputs=" in trace_attention(model).failure
    rules = default_rules(model, inputs=torch.zeros(1, 3, 8, 8))
    assert rules["attn.w"].runs == ((8, 1), (1, 8), (8, 3), (1, 8), (8, 2))


def test_importing_the_optimizer_does_not_import_the_model_zoo():
    code = ("import sys, optim; optim.AdamMini; import hessian_blocks.partitions.structural; "
            "print(sorted(m for m in sys.modules if m.startswith('hessian_blocks.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_benchmark_quick_mode_runs():
    """benchmarks/default_partition.py --quick: the trace of a 2-layer Llama places its 4 head weights."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "default_partition.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1].startswith("| Llama, 2 layers |") and out.splitlines()[-1].endswith("| 4 |")
