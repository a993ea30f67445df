"""Cost of deriving a partition: wall time and Hessian-vector products (HVPs), side by side.

Rows: the bundled ``gpt2-nano`` at widths 32 / 64 / 128 (4 layers, 4 heads, vocab 512, context 64,
one batch of 8 sequences), a small Hugging Face Llama config (GQA), and ``--small auto`` on a
TinyLlama-shaped ~1.1B config and on a Pythia-160M-shaped GPT-NeoX config (rows interleaved per head
[q_h, k_h, v_h]; its fused rule is printed), each measured on its smaller instance with the rules
mapped back. Every row uses
the partitioner's defaults (2 probes per slice, up to 8 where a decision is not settled, float32,
axes longer than 32 slices decided on a sample of them).
Printed: the HVPs (the method's cost, machine-independent), wall and CPU seconds (CPU seconds
stay meaningful on a shared machine; run with OMP_NUM_THREADS=1 for one core) and the decisions
still undecided at 8 probes.

    python benchmarks/partition_cost.py                # every row (about 8 minutes on 2 CPU cores)
    python benchmarks/partition_cost.py --quick        # width 32 and the small Llama only
    OMP_NUM_THREADS=1 python benchmarks/partition_cost.py --rows auto-1b
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from hessian_blocks import Partition, build_model, make_batches
from hessian_blocks.partitions.measured import derive_decisions
from hessian_blocks.partitions.transfer import map_rules, small_overrides

MEASURE = {"probes": 2, "max_probes": 8, "dtype": torch.float32}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
PYTHIA_160M = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "vocab_size": 50304, "max_position_embeddings": 2048, "rotary_pct": 0.25}
LLAMA_SMALL = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 64}


def lm_loss(output, targets):
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tokens(vocab: int, context: int = 64, batch: int = 8):
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randint(0, vocab, (batch, context + 1), generator=generator)
    return [(sequence[:, :-1], sequence[:, 1:])]


def hf_model(kind: str, config: dict, device: str | None = None):
    """A Hugging Face causal LM (``kind``: 'Llama', 'GPTNeoX') from config fields, random weights."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(**config, attn_implementation="eager")
    with torch.device(device or "cpu"):   # "meta": shapes only, no parameter memory
        return getattr(transformers, f"{kind}ForCausalLM")(config).eval()


def auto_small(label: str, kind: str, config: dict, show: str | None = None) -> dict:
    """``--small auto``: measure a smaller instance of the ``config`` model and map its rules back."""
    full = hf_model(kind, config, device="meta")
    small = hf_model(kind, {**config, **small_overrides(full.config)})
    return measured(label, small, lm_loss, tokens(small.config.vocab_size), full=full, show=show)


def measured(label: str, model, loss_fn, batches, full=None, show: str | None = None) -> dict:
    """Partition ``model`` with the defaults and print its cost; ``show``: a parameter name whose
    rule (mapped to ``full``) is printed too."""
    start, cpu = time.perf_counter(), time.process_time()
    decisions = derive_decisions(model, loss_fn, batches, **MEASURE)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    rules = [d.rule for d in decisions]
    if full is not None:
        rules = map_rules(model, rules, full)
        Partition.from_rules(full, rules)
    products = sum(d.products for d in decisions)
    row = {"row": label, "parameters": sum(p.numel() for p in (full or model).parameters()),
           "measured_parameters": sum(p.numel() for p in model.parameters()), "tensors": len(decisions),
           "hvps": products, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
           "hvps_per_cpu_second": round(products / cpu_seconds, 1),
           "undecided": sum(not d.settled for d in decisions)}
    if show is not None:
        rule = next(r for r in rules if r.param == show)
        row["rule"] = {key: value for key, value in rule.to_dict().items() if key != "why"}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 32 and the small Llama only")
    parser.add_argument("--rows", nargs="*",
                        help="gpt2-nano-32 gpt2-nano-64 gpt2-nano-128 llama-small auto-1b auto-pythia-160m")
    args = parser.parse_args()
    rows = args.rows or (["gpt2-nano-32", "llama-small"] if args.quick else
                         ["gpt2-nano-32", "gpt2-nano-64", "gpt2-nano-128", "llama-small", "auto-1b",
                          "auto-pythia-160m"])
    for row in rows:
        if row.startswith("gpt2-nano-"):
            spec = build_model("gpt2-nano", n_embd=int(row.rsplit("-", 1)[1]))
            measured(row, spec.model, spec.loss_fn,
                     make_batches(spec, "auto", batch_size=8, n_batches=1, dtype=torch.float32))
        elif row == "llama-small":
            measured(row, hf_model("Llama", LLAMA_SMALL), lm_loss, tokens(LLAMA_SMALL["vocab_size"]))
        elif row == "auto-1b":
            auto_small(row, "Llama", LLAMA_1B)
        elif row == "auto-pythia-160m":
            auto_small(row, "GPTNeoX", PYTHIA_160M, show="gpt_neox.layers.11.attention.query_key_value.weight")
        else:
            parser.error(f"unknown row {row!r}")


if __name__ == "__main__":
    main()
