"""Cost of the default partition: the traced forward that places the attention heads, side by side
with the same forward on the meta device without the trace, and with the whole default_rules call.

Rows: a TinyLlama-1.1B-shaped Llama config (22 layers, hidden 2048, 32 query / 4 key-value heads,
vocabulary 32000) built on the meta device (what the trace runs on anyway: the timing does not
depend on where the weights live) and, with ``--real``, built with real float32 weights (4.4 GB);
a Pythia-160M-shaped GPT-NeoX (per-head interleaved [q_h, k_h, v_h]); a Mixtral-8x7B-shaped
mixture of experts (46.7B parameters, 3-D expert tensors through transformers' grouped_mm);
``--quick``: a 2-layer Llama.
Target: the trace <= 2 s for a 1B-parameter model.

    python benchmarks/default_partition.py             # the 1.1B and 160M shapes on the meta device
    python benchmarks/default_partition.py --real      # also the 1.1B shape with real weights
    python benchmarks/default_partition.py --quick     # a 2-layer Llama (checks the script runs)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from partition_cost import LLAMA_1B, LLAMA_SMALL, PYTHIA_160M  # the shapes the partitioner's costs use
from torch.utils._python_dispatch import TorchDispatchMode

from hessian_blocks.partitions import default_rules
from hessian_blocks.partitions.follow import _meta_grouped_mm
from hessian_blocks.partitions.trace import _example, _to_meta, _without_hooks, trace_attention

MIXTRAL_8X7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2,
                "max_position_embeddings": 4096}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class GroupedOnMeta(TorchDispatchMode):
    """Only what the trace adds to run at all: the meta kernel of ``_grouped_mm`` takes bfloat16 only."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except RuntimeError:
            out = _meta_grouped_mm(func, args, kwargs)
            if out is None:
                raise
            return out


def plain_meta_forward(model: torch.nn.Module) -> None:
    """The forward the trace runs, without following it."""
    args, kwargs = _example(model, "meta")
    tensors = {name: _to_meta(t) for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    with torch.no_grad(), _without_hooks(model), GroupedOnMeta():
        torch.func.functional_call(model, tensors, args, kwargs, strict=False)


def row(label: str, config_class: str, model_class: str, shape: dict, meta: bool, repeats: int) -> None:
    config = getattr(transformers, config_class)(**shape)
    start = time.perf_counter()
    with torch.device("meta" if meta else "cpu"):
        model = getattr(transformers, model_class)(config).eval()
    built = time.perf_counter() - start
    size = sum(p.numel() for p in model.parameters())
    trace = trace_attention(model)  # warm-up (imports, first dispatch)
    assert trace.failure is None and not trace.problems, trace
    plain = median_seconds(lambda: plain_meta_forward(model), repeats)
    traced = median_seconds(lambda: trace_attention(model), repeats)
    rules = median_seconds(lambda: default_rules(model), repeats)
    placed = sum(any(s.role in ("q", "k") for s in p.spans) for p in trace.projections.values())
    print(f"| {label} | {size / 1e9:.2f}B | {'meta' if meta else f'float32 ({built:.0f} s to build)'} | "
          f"{plain:.3f} | {traced:.3f} | {traced / plain:.1f} | {rules:.3f} | {placed} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2-layer Llama only")
    parser.add_argument("--real", action="store_true", help="also the 1.1B shape with real float32 weights")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| model | parameters | weights | meta forward (s) | traced forward (s) | trace / forward "
          "| default_rules (s) | weights placed in heads |")
    print("|---|---|---|---|---|---|---|---|")
    if args.quick:
        row("Llama, 2 layers", "LlamaConfig", "LlamaForCausalLM", LLAMA_SMALL, True, 1)
        return
    row("TinyLlama-1.1B shape", "LlamaConfig", "LlamaForCausalLM", LLAMA_1B, True, args.repeats)
    row("Pythia-160M shape (GPT-NeoX)", "GPTNeoXConfig", "GPTNeoXForCausalLM", PYTHIA_160M, True, args.repeats)
    row("Mixtral-8x7B shape (experts)", "MixtralConfig", "MixtralForCausalLM", MIXTRAL_8X7B, True, args.repeats)
    if args.real:
        row("TinyLlama-1.1B shape", "LlamaConfig", "LlamaForCausalLM", LLAMA_1B, False, args.repeats)


if __name__ == "__main__":
    main()
