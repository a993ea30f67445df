"""AdamMini against the official package (adam-mini 1.1.1) on a GPT-2-style model it recognises.

How the official optimizer treats the bundled GPT's parameters (it decides by name substrings,
read from its source; lower-cased names):
- names containing "bias": plain Adam (per-coordinate v)                  -> rule "elements";
- "q_proj" / "k_proj": one block per head of dim*dim/n_heads entries       -> groups of head_dim rows;
- "wte", "lm_head", "v_proj", "o_proj", "mlp": one block per row          -> groups of 1 row;
- anything else ("wpe.weight", the LayerNorm scales): one block per tensor -> "whole".
  The position embedding matches none of its embedding names, so it gets a single block, unlike
  the paper's "embedding: one block per token" (our structural default gives wpe one per row);
- no weight decay for names containing "norm", "ln" or "bias": here exactly the 1-D parameters,
  which is what param_groups_no_decay picks by type/ndim (checked below).
Its arithmetic is the paper's (eps added after the bias-corrected sqrt, decoupled weight decay);
it keeps v in the parameter dtype (we keep float32), which does not matter in float32.

The key biases are frozen for the comparison: their true gradient is exactly zero (softmax is
invariant to a shift of all scores), so their float gradient is rounding noise, which plain Adam's
per-coordinate normalisation turns into lr-sized steps that depend on summation order (up to 7e-5
apart after 20 steps, while every other parameter agrees to 1.2e-7).
"""

import pytest
import torch

pytest.importorskip("adam_mini")
from adam_mini import Adam_mini  # noqa: E402

from analysis.experiments.training import run_steps
from hessian_blocks import build_model  # noqa: E402
from hessian_blocks.blocks import Partition, Rule  # noqa: E402
from optim import AdamMini, param_groups_no_decay  # noqa: E402

N_EMBD, N_HEAD, VOCAB, CONTEXT = 64, 4, 128, 16
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 20


def gpt():
    spec = build_model("gpt2-nano", n_layer=2, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB, context=CONTEXT, seed=0)
    for block in spec.model.blocks:
        block.attn.k_proj.bias.requires_grad_(False)
    return spec


def official_equivalent_partition(model) -> Partition:
    """The official package's blocks for this model, written as rules (see the module docstring)."""
    head_dim = N_EMBD // N_HEAD
    rules = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "bias" in name:
            rules.append(Rule(name, "elements"))
        elif "q_proj" in name or "k_proj" in name:
            rules.append(Rule(name, "groups", axis=0, size=head_dim))
        elif any(key in name for key in ("wte", "lm_head", "v_proj", "o_proj", "mlp")):
            rules.append(Rule(name, "groups", axis=0, size=1))
        else:
            rules.append(Rule(name, "whole"))
    return Partition.from_rules(model, rules)


def train(spec, optimizer, steps=STEPS):
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (4, CONTEXT + 1), generator=generator) for _ in range(steps)]
    run_steps(spec.model, spec.loss_fn, optimizer, [(t[:, :-1], t[:, 1:]) for t in batches], steps)
    return {name: p.detach().clone() for name, p in spec.model.named_parameters()}


@pytest.fixture(scope="module")
def official_result():
    spec = gpt()
    official = Adam_mini(spec.model.named_parameters(), dim=N_EMBD, n_heads=N_HEAD, verbose=False, **HYPER)
    return train(spec, official)


def test_official_no_decay_set_is_ours():
    spec = gpt()
    official = Adam_mini(spec.model.named_parameters(), dim=N_EMBD, n_heads=N_HEAD, verbose=False, **HYPER)
    official_no_decay = {g["name"] for g in official.param_groups if g["weight_decay"] == 0.0}
    ours = {name for g in param_groups_no_decay(spec.model, 0.1) if g["weight_decay"] == 0.0 for name, _ in g["params"]}
    # per layer: 2 LN x (w, b), 5 trainable biases; ln_f w, b
    assert ours == official_no_decay and len(ours) == 2 * (4 + 5) + 2


@pytest.mark.parametrize("path", ["reference", "foreach"])
def test_matches_official_adam_mini(official_result, path):
    """(The compiled path equals these two: tests/test_compiled.py; compiling this model's update
    on CPU takes about two minutes.)"""
    spec = gpt()
    initial = {name: p.detach().clone() for name, p in spec.model.named_parameters()}
    flags = {"reference": dict(foreach=False), "foreach": dict(foreach=True)}[path]
    ours = AdamMini(
        param_groups_no_decay(spec.model, HYPER["weight_decay"]),
        official_equivalent_partition(spec.model),
        **HYPER,
        **flags,
    )
    result = train(spec, ours)
    moved = max((result[n] - initial[n]).abs().max().item() for n in result)
    diff = max((result[n] - official_result[n]).abs().max().item() for n in result)
    assert moved > 1e-2  # the parameters really trained
    assert diff <= 1e-6, f"max abs difference to the official adam-mini: {diff:.3g}"


def test_official_differs_from_adamw_and_per_tensor_blocks(official_result):
    """The comparison above can fail: other update rules land measurably elsewhere."""
    for make in (
        lambda m: torch.optim.AdamW(param_groups_no_decay(m, HYPER["weight_decay"]), **HYPER),
        lambda m: AdamMini(param_groups_no_decay(m, HYPER["weight_decay"]), Partition.per_tensor(m), **HYPER),
    ):
        spec = gpt()
        result = train(spec, make(spec.model))
        diff = max((result[n] - official_result[n]).abs().max().item() for n in result)
        assert diff > 1e-4
