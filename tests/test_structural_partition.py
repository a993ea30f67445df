"""The structural default partition: blocks from module types and shapes, never from names."""

import pytest
import torch
import torch.nn as nn

from hessian_blocks import build_model
from hessian_blocks.models.gpt import SelfAttention
from hessian_blocks.partitions.structural import AttentionLayout
from optim import AdamMini, default_partition, default_rules, register_attention


def rules_by_name(model, **kwargs):
    return {r.param: r.to_dict() | {"why": None} for r in default_partition(model, **kwargs).rules}


def rows():
    return {"split": "groups", "axis": 0, "size": 1, "why": None}


def test_bundled_gpt_follows_the_paper_partition():
    model = build_model("gpt2-nano", n_layer=1, n_embd=32, n_head=4, vocab_size=64, context=8).model
    rules = rules_by_name(model)
    heads = {"split": "groups", "axis": 0, "size": 8, "why": None}
    expected = {
        "wte.weight": rows(), "wpe.weight": rows(), "lm_head.weight": rows(),
        "blocks.0.attn.q_proj.weight": heads, "blocks.0.attn.k_proj.weight": heads,
        "blocks.0.attn.v_proj.weight": rows(), "blocks.0.attn.o_proj.weight": rows(),
        "blocks.0.mlp.fc.weight": rows(), "blocks.0.mlp.proj.weight": rows(),
        "blocks.0.ln1.weight": {"split": "whole", "why": None}, "blocks.0.ln2.weight": {"split": "whole", "why": None},
        "ln_f.weight": {"split": "whole", "why": None},
    }
    for name, rule in expected.items():
        assert rules[name] == {"param": name, **rule}, name
    biases = [n for n, p in model.named_parameters() if p.ndim == 1 and n not in expected]
    assert len(biases) == 6 + 2 + 1 and all(rules[n]["split"] == "elements" for n in biases)
    optimizer = AdamMini(model)
    n_blocks = sum(layout.n_blocks for layout in optimizer._layouts.values())
    tokens, heads, neurons, norm_scales = 64 + 8 + 64, 2 * 4, 2 * 32 + 128 + 32, 3
    bias_entries = 4 * 32 + 128 + 32 + 3 * 32
    assert n_blocks == len(default_partition(model).blocks) == tokens + heads + neurons + norm_scales + bias_entries


def test_names_play_no_part():
    """The same modules under misleading attribute names get the same blocks."""
    torch.manual_seed(0)
    plain = nn.ModuleDict({"a": SelfAttention(16, 2), "b": nn.Embedding(5, 16), "c": nn.Linear(16, 3)})
    misleading = nn.ModuleDict({"lm_head_bias": SelfAttention(16, 2), "q_proj": nn.Embedding(5, 16), "norm_wte": nn.Linear(16, 3)})
    strip = lambda rules: [(r["split"], r.get("axis"), r.get("size"), r.get("runs")) for r in rules.values()]  # noqa: E731
    assert strip(rules_by_name(plain)) == strip(rules_by_name(misleading))


def test_user_head_count_overrides():
    model = build_model("gpt2-nano", n_layer=1, n_embd=32, n_head=4, vocab_size=64, context=8).model
    assert rules_by_name(model, n_heads=2)["blocks.0.attn.k_proj.weight"]["size"] == 16
    with pytest.raises(ValueError, match="32 projection features do not split into 3 heads"):
        default_partition(model, n_heads=3)


def test_torch_multihead_attention():
    fused = nn.MultiheadAttention(12, 3)
    rules = rules_by_name(fused)
    assert rules["in_proj_weight"]["runs"] == [[4, 6], [1, 12]]  # q, k: 3 heads of 4 rows each; v: rows
    assert rules["in_proj_bias"]["split"] == "elements" and rules["out_proj.weight"] == {"param": "out_proj.weight", **rows()}
    separate = rules_by_name(nn.MultiheadAttention(12, 3, kdim=5, vdim=7))
    assert separate["q_proj_weight"]["size"] == separate["k_proj_weight"]["size"] == 4
    assert separate["v_proj_weight"] == {"param": "v_proj_weight", **rows()}


def test_cnn_layers_norms_and_unknown_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.ConvTranspose2d(8, 4, 2))
    model.register_parameter("token", nn.Parameter(torch.zeros(1, 1, 8)))
    rules = rules_by_name(model)
    assert rules["0.weight"] == {"param": "0.weight", **rows()}  # one block per output channel
    assert [rules[n]["split"] for n in ("0.bias", "1.weight", "1.bias", "2.weight", "3.weight", "3.bias", "token")] == [
        "elements", "whole", "elements", "whole", "whole", "elements", "whole"]  # transposed conv weight: whole


def test_registered_attention_type():
    class FusedQK(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = 2
            self.qk = nn.Linear(8, 16)  # [q; k], 2 heads of 4 each
            self.v = nn.Linear(8, 8)

    register_attention(FusedQK, AttentionLayout({"qk": "q|k", "v": "v"}, heads="heads"))
    assert rules_by_name(FusedQK())["qk.weight"]["size"] == 4
    assert default_rules(nn.Linear(8, 16))["weight"].size == 1


def test_hf_gpt2_conv1d_layout():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=8, bos_token_id=0, eos_token_id=0)
    rules = rules_by_name(transformers.GPT2Model(config))
    assert rules["h.0.attn.c_attn.weight"]["axis"] == 1 and rules["h.0.attn.c_attn.weight"]["runs"] == [[8, 8], [1, 32]]
    assert rules["h.0.mlp.c_fc.weight"] == {"param": "h.0.mlp.c_fc.weight", "split": "groups", "axis": 1, "size": 1, "why": None}
    assert rules["h.0.attn.c_attn.bias"]["split"] == "elements"
