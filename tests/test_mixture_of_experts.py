"""Mixtures of experts: the default partition of 3-D expert tensors read from the traced forward, norms
found by structure, and a Mixtral-style model end to end (AdamMini on every path, checkpoints, the
partition file, the spectra's block products against a dense float64 Hessian).

Each Hugging Face family below is built from its config (1 layer, hidden 32, 4 heads, 2 key/value
heads, 2 experts) and nothing registers it; its paper partition (Adam-mini v1.1, with experts: one
block per (expert, output row), routers one per row, norms whole) is written here by hand from the
layouts read in the installed transformers source, and compared rule by rule with the default.
"""

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hessian_blocks import BlockHessian, Partition, PrecisionWarning, Rule, build_model, make_batches
from hessian_blocks.cli import main
from hessian_blocks.data import call_model
from hessian_blocks.partitions import default_rules
from hessian_blocks.partitions.structural import is_norm, no_decay_parameters
from optim import AdamMini, param_groups_no_decay
from tests.oracles import dense_hessian, hand_written_partition
from tests.test_adam_mini import checkpoint

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, FFN, EXPERTS = 32, 4, 2, 8, 48, 40, 2

ROWS = {"split": "groups", "axis": 0, "size": 1}
WHOLE = {"split": "whole"}
EXPERT_ROWS = {"split": "groups", "axis": [0, 1], "size": 1}   # one block per (expert, output row)
PER_EXPERT = {"split": "groups", "axis": 0, "size": 1}          # [experts, in, out]: what the format can say
HEADS_OF = {"split": "groups", "axis": 0, "size": HEAD_DIM}
ATTENTION = {"q_proj.weight": HEADS_OF, "k_proj.weight": HEADS_OF, "v_proj.weight": ROWS, "o_proj.weight": ROWS}
TOKENS = {"embed_tokens.weight": ROWS, "lm_head.weight": ROWS}
NORMS = {name + ".weight": WHOLE for name in ("input_layernorm", "post_attention_layernorm", "norm", "q_norm",
                                              "k_norm", "q_a_layernorm", "kv_a_layernorm")}
EXPERTS_TABLE = {"experts.gate_up_proj": EXPERT_ROWS, "experts.down_proj": EXPERT_ROWS}
SHARED = {f"{name}.{p}_proj.weight": ROWS for name in ("shared_expert", "shared_experts")
          for p in ("gate", "up", "down")}
BASE = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
            eos_token_id=1)

# name -> (config class, model class, config kwargs, hand-written partition by name suffix, whether it warns)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=EXPERTS, num_experts_per_tok=1),
                TOKENS | ATTENTION | EXPERTS_TABLE | {"mlp.gate.weight": ROWS} | NORMS, False),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",  # q/k/v biases, a shared expert and its gate
                  dict(num_experts=EXPERTS, num_experts_per_tok=1, moe_intermediate_size=24,
                       shared_expert_intermediate_size=FFN),
                  TOKENS | ATTENTION | EXPERTS_TABLE | SHARED | {"mlp.gate.weight": ROWS,
                                                                  "shared_expert_gate.weight": ROWS} | NORMS, False),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",  # per-head q/k norms
                  dict(num_experts=EXPERTS, num_experts_per_tok=1, moe_intermediate_size=24, head_dim=HEAD_DIM),
                  TOKENS | ATTENTION | EXPERTS_TABLE | {"mlp.gate.weight": ROWS} | NORMS, False),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",  # q/k norms over the whole projection
              dict(num_experts=EXPERTS, num_experts_per_tok=1),
              TOKENS | ATTENTION | EXPERTS_TABLE | {"mlp.gate.weight": ROWS} | NORMS, False),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=EXPERTS, num_experts_per_tok=1),
                   TOKENS | ATTENTION | EXPERTS_TABLE | {"router.weight": ROWS} | NORMS, False),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",  # LayerNorms with biases
               dict(num_local_experts=EXPERTS, num_experts_per_tok=1),
               TOKENS | ATTENTION | EXPERTS_TABLE | {"router.weight": ROWS} | NORMS, False),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",  # experts stored [experts, in, out], with biases per expert
                dict(num_local_experts=EXPERTS, num_experts_per_tok=1, head_dim=HEAD_DIM),
                TOKENS | ATTENTION | {"experts.gate_up_proj": PER_EXPERT, "experts.down_proj": PER_EXPERT,
                                      "router.weight": ROWS, "sinks": WHOLE} | NORMS, True),
}
# the mixture-of-experts parts only (their attention has layouts of its own)
MOE_PARTS = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=EXPERTS, num_experts_per_tok=1, moe_intermediate_size=24,
                         first_k_dense_replace=0, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                         kv_lora_rank=16, q_lora_rank=16, n_group=1, topk_group=1, head_dim=4),
                    EXPERTS_TABLE | SHARED | {"mlp.gate.weight": ROWS}),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",  # [experts, in, out] through a batched product
               dict(num_local_experts=EXPERTS, num_experts_per_tok=1, head_dim=HEAD_DIM, intermediate_size_mlp=FFN),
               {"experts.gate_up_proj": PER_EXPERT, "experts.down_proj": PER_EXPERT, "router.weight": ROWS} | SHARED),
}


def build(family, table=FAMILIES, implementation=None, seed=0):
    config_class, model_class, kwargs, *_ = table[family]
    config = getattr(transformers, config_class)(**BASE, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    if implementation:
        model.set_experts_implementation(implementation)
    return model


def without_why(rules):
    return {name: {k: v for k, v in rule.to_dict().items() if k != "why"} for name, rule in rules.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_default_partition_is_the_papers_written_by_hand(family):
    model = build(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rules = without_why(default_rules(model))
    assert rules == hand_written_partition(model, FAMILIES[family][3])
    messages = [str(w.message) for w in caught if "experts" in str(w.message)]
    if FAMILIES[family][4]:   # [experts, in, out]: one block per expert, and it says why
        assert len(messages) == 1 and "its products keep axes [0, 2]" in messages[0]
        assert "store the experts [experts, out, in], or write 'elements'" in messages[0]
    else:
        assert not [str(w.message) for w in caught], family


@pytest.mark.parametrize("family", list(MOE_PARTS))
def test_the_experts_of_other_families(family):
    model = build(family, MOE_PARTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rules = without_why(default_rules(model))
    expected = {name: {"param": name, **rule} for suffix, rule in MOE_PARTS[family][3].items()
                for name, _ in model.named_parameters() if name.endswith("." + suffix)}
    assert len(expected) >= 3 and {name: rules[name] for name in expected} == expected


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_gives_one_block_per_expert_and_row(implementation):
    """transformers runs the experts one at a time (eager: a data-dependent loop, traced on the model's own
    parameters), all at once (batched_mm: each token's expert picked by an index) or grouped by expert
    (grouped_mm, the default, whose meta kernel the trace stands in for)."""
    rules = default_rules(build("mixtral", implementation=implementation))
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert (rules[name].axis, rules[name].size) == ((0, 1), 1)
        assert "one matrix per expert, contracted along axis 2" in rules[name].why


def test_expert_blocks_are_what_one_expert_row_computes():
    """Independently of the trace: perturbing the rows of one (expert, row) block of gate_up_proj moves one
    feature of that expert's intermediate activations and nothing of the other expert's."""
    model = build("mixtral", implementation="eager").double().eval()
    experts = model.model.layers[0].mlp.experts
    seen = []
    original = F.linear

    def recording(x, weight, bias=None):   # each expert's gate|up features, by the expert whose weight it is
        out = original(x, weight, bias)
        for expert in range(EXPERTS):
            if weight.data_ptr() == experts.gate_up_proj[expert].data_ptr():
                seen.append((expert, out.detach().clone()))
        return out

    tokens = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    rule = default_rules(model)["model.layers.0.mlp.experts.gate_up_proj"]
    blocks = rule.resolve(tuple(experts.gate_up_proj.shape))
    rows = experts.gate_up_proj.shape[1]
    for index in (0, 5, rows + 3, 2 * rows - 1):
        runs = []
        for perturb in (False, True):
            seen.clear()
            with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
                patch.setattr(F, "linear", recording)
                if perturb:
                    experts.gate_up_proj.view(-1)[blocks[index].flat_indices()] += 1.0
                model(input_ids=tokens)
                if perturb:
                    experts.gate_up_proj.view(-1)[blocks[index].flat_indices()] -= 1.0
            runs.append(dict(seen))
        assert set(runs[0]) == set(range(EXPERTS))   # the tokens were routed to both experts
        moved = {(expert, feature) for expert in runs[0] for feature in range(rows)
                 if not torch.equal(runs[0][expert][:, feature], runs[1][expert][:, feature])}
        assert moved <= {(index // rows, index % rows)} and moved, (index, moved)


# ----------------------------------------------------------------------------- norms by structure


class HandNorms(nn.Module):
    """Norms written from scratch, of no registered class: an RMSNorm, a LayerNorm with a bias, a norm
    per head with a [heads, head_dim] scale, F.normalize with a gain; and what is no norm: a softmax written
    by hand times a parameter, a weight divided by its own norm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.p = nn.ParameterDict({
            "rms": torch.ones(HIDDEN), "ln_weight": torch.ones(HIDDEN), "ln_bias": torch.zeros(HIDDEN),
            "head_scale": torch.ones(HEADS, HIDDEN // HEADS), "gain": torch.ones(HIDDEN),
            "temperature": torch.ones(HIDDEN), "direction": torch.randn(HIDDEN, HIDDEN)})
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens):
        p = self.p
        x = self.embed(tokens)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * p["rms"]
        centred = x - x.mean(-1, keepdim=True)
        x = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * p["ln_weight"] + p["ln_bias"]
        heads = x.unflatten(-1, (HEADS, -1))
        x = (heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * p["head_scale"]).flatten(-2)
        x = F.normalize(x, dim=-1) * p["gain"]
        x = x.exp() / x.exp().sum(-1, keepdim=True) * p["temperature"]
        return self.out(x @ (p["direction"] / p["direction"].norm(dim=0, keepdim=True)))


def test_norms_of_no_registered_class_are_found_by_structure():
    model = HandNorms()
    assert not any(is_norm(module) for module in model.modules())
    rules = {name.removeprefix("p."): rule for name, rule in default_rules(model).items()}
    for name in ("rms", "ln_weight", "head_scale", "gain"):
        assert rules[name].split == "whole" and "scale of a normalisation (traced" in rules[name].why, name
    assert rules["ln_bias"].split == "elements" and "bias of a normalisation (traced)" in rules["ln_bias"].why
    assert "normalisation" not in rules["temperature"].why and "normalisation" not in rules["direction"].why
    no_decay = {name.removeprefix("p.") for group in param_groups_no_decay(model, 0.1) if group["weight_decay"] == 0
                for name, _ in group["params"]}
    assert "head_scale" in no_decay and "direction" not in no_decay   # a 2-D norm scale: by structure, not by ndim
    assert {"rms", "ln_weight", "ln_bias", "gain", "temperature", "out.bias"} <= no_decay   # 1-D: by ndim


@pytest.mark.filterwarnings("ignore:experts stored with their contracted axis")   # GPT-OSS: tested above
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "phimoe", "gpt_oss"])
def test_norms_and_expert_biases_of_unregistered_families_get_no_weight_decay(family):
    model = build(family)
    exempt = no_decay_parameters(model)
    norms = {name for name, _ in model.named_parameters() if "norm" in name}
    assert norms and norms <= exempt
    if family != "phimoe":   # (its norms are nn.LayerNorm) nothing registers these RMSNorms: the trace finds them
        assert not any(is_norm(module) for module in model.modules())
    decayed = {name for group in param_groups_no_decay(model, 0.1) if group["weight_decay"] > 0
               for name, _ in group["params"]}
    assert not decayed & exempt and all(model.get_parameter(n).ndim >= 2 for n in decayed)
    if family == "gpt_oss":   # [experts, out] biases picked by the routing: per element, no decay
        for name in ("model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.experts.down_proj_bias"):
            assert name in exempt and name not in decayed and default_rules(model)[name].split == "elements"


# ----------------------------------------------------------------------------- experts written from scratch


class Experts(nn.Module):
    """Two experts of a soft mixture, stored as ``layout`` and multiplied by ``multiply``."""

    def __init__(self, layout, multiply):
        super().__init__()
        shape = {"out_in": (EXPERTS, FFN, HIDDEN), "in_out": (EXPERTS, HIDDEN, FFN)}[layout]
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.w = nn.Parameter(torch.randn(shape) / math.sqrt(HIDDEN))
        self.out = nn.Linear(FFN, VOCAB)
        self.multiply = multiply

    def forward(self, tokens):
        x = self.embed(tokens)
        gates = self.router(x).softmax(-1)
        return self.out(torch.relu(sum(gates[..., e, None] * self.multiply(x, self.w, e) for e in range(EXPERTS))))


def test_experts_multiplied_in_a_way_the_trace_cannot_read_warn_and_keep_one_block():
    model = Experts("out_in", lambda x, w, e: x @ w.reshape(HIDDEN, -1)[:, e * FFN:(e + 1) * FFN])  # mixes axes
    with pytest.warns(UserWarning, match=r"cannot tell the output axis of 'w' \[2, 40, 32\] \(Experts\).*strides the "
                                         r"trace cannot read: one block for the whole tensor.*\"axis\": \[0, 1\]"):
        rules = default_rules(model)
    assert rules["w"].split == "whole"


@pytest.mark.parametrize("layout, multiply, expected", [
    ("out_in", lambda x, w, e: F.linear(x, w[e]), ((0, 1), 1)),
    ("out_in", lambda x, w, e: torch.einsum("btc,ofc->btof", x, w)[..., e, :], ((0, 1), 1)),
    ("in_out", lambda x, w, e: x @ w[e], (0, 1)),
])
def test_experts_written_from_scratch(layout, multiply, expected):
    model = Experts(layout, multiply)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rules = default_rules(model)
    assert (rules["w"].axis, rules["w"].size) == expected and rules["router.weight"].axis == 0
    assert bool(caught) == (layout == "in_out")


def test_an_untraceable_forward_warns_about_its_experts():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = EXPERTS
            self.w = nn.Parameter(torch.randn(EXPERTS, FFN, HIDDEN))

        def forward(self, tokens):
            raise RuntimeError("no forward")

    with pytest.warns(UserWarning, match=r"could not be traced .* the experts 'w' \[2, 40, 32\] \(Untraceable\) "
                                         r"keep one block"):
        default_rules(Untraceable(), inputs=torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- a Mixtral-style model end to end


MIXTRAL = dict(num_hidden_layers=1, hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS,
               num_key_value_heads=KV_HEADS, num_local_experts=EXPERTS, num_experts_per_tok=2, vocab_size=VOCAB,
               context=8)   # top-2 of 2: the router gets a gradient (top-1 weights are normalised to 1)
PATHS = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "kernel": dict(fused=True)}


def mixtral(dtype=torch.float32):
    return build_model("hf:MixtralForCausalLM", seed=0, dtype=dtype, **MIXTRAL)


def train_mixtral(spec, optimizer, steps, start=0):
    batches = make_batches(spec, "synthetic", batch_size=2, n_batches=start + steps, seed=3)[start:]
    for inputs, targets in batches:
        optimizer.zero_grad()
        spec.loss_fn(call_model(spec.model, inputs), targets).backward()
        optimizer.step()


def test_mixtral_trains_with_adam_mini_alike_on_the_plain_foreach_and_kernel_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # the Triton kernels on CPU tensors (tests/test_kernels.py)
    results = {}
    for path, flags in PATHS.items():
        spec = mixtral()
        optimizer = AdamMini(param_groups_no_decay(spec.model, 0.1), model=spec.model, lr=1e-2, **flags)
        start = {n: p.detach().clone() for n, p in spec.model.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # no fallback from the path asked for, no partition warning
            train_mixtral(spec, optimizer, steps=4)
        results[path] = {n: p.detach().clone() for n, p in spec.model.named_parameters()}
        experts = optimizer.state[spec.model.model.layers[0].mlp.experts.gate_up_proj]["block_exp_avg_sq"]
        assert experts.shape == (EXPERTS * 2 * FFN,)   # one second moment per (expert, row)
    for name, plain in results["plain"].items():
        assert (plain - start[name]).abs().max() > 1e-3, name   # every tensor moved, the router too
        for path in ("foreach", "kernel"):
            torch.testing.assert_close(results[path][name], plain, rtol=1e-5, atol=1e-6, msg=f"{path}: {name}")


def test_mixtral_state_dict_and_partition_file_round_trip(tmp_path):
    spec = mixtral()
    optimizer = AdamMini(param_groups_no_decay(spec.model, 0.1), model=spec.model, lr=1e-2)
    partition_file = optimizer.partition.save(tmp_path / "mixtral.json")
    data = json.loads(partition_file.read_text())
    by_param = {rule["param"]: rule for rule in data["rules"]}
    assert data["version"] == 2 and by_param["model.layers.0.mlp.experts.down_proj"]["axis"] == [0, 1]
    train_mixtral(spec, optimizer, steps=2)
    saved_model, saved_optimizer = checkpoint(spec.model, optimizer)
    train_mixtral(spec, optimizer, steps=2, start=2)
    uninterrupted = {n: p.detach().clone() for n, p in spec.model.named_parameters()}

    resumed = mixtral()
    resumed.model.load_state_dict(saved_model)
    again = AdamMini(param_groups_no_decay(resumed.model, 0.1), partition=Partition.load(partition_file, resumed.model),
                     lr=1e-2)
    again.load_state_dict(saved_optimizer)
    train_mixtral(resumed, again, steps=2, start=2)
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, uninterrupted[name]), name


def test_spectrum_with_a_partition_file_of_merged_axes(tmp_path, capsys):
    spec = mixtral()
    partition = Partition.from_rules(spec.model, default_rules(spec.model).values())
    partition.save(tmp_path / "p.json")
    cli = ["--model", "hf:MixtralForCausalLM", *[a for k, v in MIXTRAL.items() for a in ("--set", f"{k}={v}")],
           "--batch-size", "2", "--no-progress"]
    assert main(["spectrum", *cli, "--partition", str(tmp_path / "p.json"), "--steps", "3", "--probes", "1",
                 "--grid-points", "2000", "--sigma2", "1e-3", "--blocks", "*experts.down_proj[axes0-1 3*",
                 "--out", str(tmp_path / "spectrum")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.experts.down_proj[axes0-1 3:4]" in out   # expert 0, row 3
    assert "model.layers.0.mlp.experts.down_proj[axes0-1 35:36]" in out   # expert 1, row 3


def test_merged_axis_block_products_equal_the_dense_hessians_diagonal_blocks():
    """float64: the block Hessian-vector products of blocks along merged axes (one per (expert, row), two
    rows and one in every expert, rows of a 2-D weight) are the dense Hessian's diagonal blocks on those
    coordinates, on a soft mixture of experts written here."""
    torch.manual_seed(0)
    model = SoftExperts().double()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                         generator=generator))
               for n in (4, 3)]
    partition = Partition.from_rules(model, [
        Rule("router.weight", "groups", axis=0, size=1), Rule("router.bias", "elements"),
        Rule("up", "groups", axis=[0, 1], size=1), Rule("down", "groups", axis=[0, 1], runs=((2, 1), (1, 1)) * 3),
        Rule("head.weight", "groups", axis=[0, 1], size=3), Rule("head.bias", "whole")])
    assert partition.version == 2 and len(partition.blocks) == 3 + 3 + 12 + 6 + 3 + 1
    dense = dense_hessian(model, F.cross_entropy, batches)
    for strategy in ("loop", "vmap"):
        hessian = BlockHessian(model, F.cross_entropy, batches, partition, strategy=strategy, chunk_size=7)
        vectors = torch.randn(3, hessian.size, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(hessian.block_matvec(vectors), vectors @ dense.restrict(hessian.blocks, True).T,
                                   rtol=1e-10, atol=1e-12)


class SoftExperts(nn.Module):
    """Every token through 3 experts ([3, 4, 5] up: [experts, out, in]; [3, 3, 4] down), weighted by a router."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(5, 3)
        self.up = nn.Parameter(torch.randn(3, 4, 5) / 2)
        self.down = nn.Parameter(torch.randn(3, 3, 4) / 2)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        gates = self.router(x).softmax(-1)                                    # [batch, experts]
        hidden = torch.tanh(torch.einsum("eoi,bi->beo", self.up, x))
        return self.head(torch.einsum("be,eoh,beh->bo", gates, self.down, hidden))


def test_mixtral_block_products_match_the_dense_hessian_to_its_routers_float32():
    """The same on a tiny Mixtral; its router computes the softmax in float32 (the engine says so), so the
    products agree to float32 accuracy only: a wrong block would differ by its whole size."""
    spec = build_model("hf:MixtralForCausalLM", seed=0, dtype=torch.float64, num_hidden_layers=1, hidden_size=8,
                       intermediate_size=6, num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                       num_experts_per_tok=2, vocab_size=16, context=5)
    batches = make_batches(spec, "synthetic", batch_size=3, n_batches=2, seed=1)
    partition = Partition.from_rules(spec.model, default_rules(spec.model).values())
    blocks = [b for b in partition.blocks if "mlp" in b.param]
    assert {b.axis for b in blocks if "experts" in b.param} == {(0, 1)} and len(blocks) == 2 * (12 + 8) + 2
    dense = dense_hessian(spec.model, spec.loss_fn, batches)
    with pytest.warns(PrecisionWarning, match="MixtralTopKRouter"):
        hessian = BlockHessian(spec.model, spec.loss_fn, batches, blocks)
    vectors = torch.randn(3, hessian.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = vectors @ dense.restrict(blocks, True).T
    torch.testing.assert_close(hessian.block_matvec(vectors), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_partition_command_writes_one_block_per_expert_and_row_on_a_mixtral(tmp_path, capsys):
    """The measured partitioner on a Mixtral-style model (2 experts, every token through both): the rows of
    gate_up_proj decouple across experts (axis 0 splits) and inside each expert (its gate|up rows pair up as
    stacked parts), so the merged axes [0, 1] give the rule, and the file is version 2. (down_proj's rows
    of the two experts feed the same output neuron of every token: they couple, and its rule is per row
    of both experts, axis 1, as the Hessian says.)"""
    cli = ["--model", "hf:MixtralForCausalLM", "--set", "num_hidden_layers=1", "--set", "hidden_size=16",
           "--set", "intermediate_size=8", "--set", "num_attention_heads=2", "--set", "num_key_value_heads=1",
           "--set", "num_local_experts=2", "--set", "num_experts_per_tok=2", "--set", "vocab_size=32",
           "--set", "context=8", "--batch-size", "4", "--no-progress"]
    out = tmp_path / "partition.json"
    assert main(["partition", *cli, "--method", "probes", "--probes", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rules = {rule["param"]: rule for rule in data["rules"]}
    gate_up = rules["model.layers.0.mlp.experts.gate_up_proj"]
    assert data["version"] == 2 and (gate_up["split"], gate_up["axis"], gate_up["size"]) == ("groups", [0, 1], 1)
    assert gate_up["why"].startswith("groups along axis [0, 1]: axis 0: 2 x 1")
    assert "axis [0, 1]: 32 x 1" in capsys.readouterr().out   # the table: 2 experts x 16 gate|up rows
    down = rules["model.layers.0.mlp.experts.down_proj"]
    assert (down["axis"], down["size"]) == (1, 1) and "axis 0: one group" in down["why"]
