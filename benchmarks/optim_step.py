"""Optimizer step time and state memory: torch AdamW (foreach, fused), the official adam-mini 1.1.1
and optim.AdamMini (foreach; the Triton kernels on CUDA), side by side in one run on the same
GPT-2-style parameters.

    python benchmarks/optim_step.py --shape small            # GPT-2 small shape (~163M params), CUDA if present
    python benchmarks/optim_step.py --shape medium           # GPT-2 medium shape (~406M params)
    python benchmarks/optim_step.py --shape tinyllama        # Hugging Face Llama, TinyLlama-1.1B shape (transformers)
    python benchmarks/optim_step.py --quick                  # CPU CI mode: a small shape, few steps

Only ``optimizer.step()`` is timed, on fixed random gradients (no forward/backward); the optimizers
take turns step by step (all of them hold their state at once). Prints median milliseconds per step,
ratios of medians to AdamW, and optimizer-state bytes per parameter.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from hessian_blocks.models.gpt import GPT, GPTConfig
from optim import AdamMini, param_groups_no_decay, state_memory

# width, layers, heads; vocab 50304 and context 1024 unless given
SHAPES = {
    "small": dict(n_embd=768, n_layer=12, n_head=12),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "quick": dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, context=256),
}
# Hugging Face Llama at TinyLlama-1.1B's width (32 query / 4 key-value heads, untied head): 4 layers, all 22
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, tie_word_embeddings=False)
LLAMA_SHAPES = {
    "llama4": dict(LLAMA, num_hidden_layers=4),
    "tinyllama": dict(LLAMA, num_hidden_layers=22),
    "llama-quick": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        vocab_size=256, num_hidden_layers=2, tie_word_embeddings=False),
}
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1


@dataclass
class Row:
    name: str
    median_ms: float
    bytes_per_param: float


def build(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``shape`` (bundled GPT, or Hugging Face Llama for the LLAMA_SHAPES) on ``device``,
    with fixed random gradients."""
    if shape in LLAMA_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPES[shape])).to(dtype)
    else:
        with torch.device(device):
            model = GPT(GPTConfig(**{"vocab_size": 50304, "context": 1024, **SHAPES[shape]})).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=dtype) * 1e-3
    return model


def official_geometry(model: torch.nn.Module) -> dict[str, int]:
    """The official adam-mini's dim / n_heads (/ n_kv_heads) arguments for ``model``."""
    config = model.config
    if isinstance(config, GPTConfig):
        return dict(dim=config.n_embd, n_heads=config.n_head)
    return dict(dim=config.hidden_size, n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads)


def candidates(model: torch.nn.Module, device: torch.device,
               compiled: bool = False) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    groups = lambda: param_groups_no_decay(model, WEIGHT_DECAY)  # noqa: E731
    out: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "torch AdamW foreach": lambda: torch.optim.AdamW(groups(), **HYPER, foreach=True),
        "torch AdamW fused": lambda: torch.optim.AdamW(groups(), **HYPER, fused=True),
    }
    try:
        from adam_mini import Adam_mini

        out["official adam-mini 1.1.1"] = lambda: Adam_mini(
            model.named_parameters(), **HYPER, weight_decay=WEIGHT_DECAY, **official_geometry(model), verbose=False
        )
    except ImportError:
        print("adam-mini is not installed: the official package is left out")
    out["ours foreach"] = lambda: AdamMini(groups(), model=model, **HYPER, foreach=True)
    if device.type == "cuda":
        out["ours kernel"] = lambda: AdamMini(groups(), model=model, **HYPER, fused=True)
    elif compiled:  # fused=True on the CPU: torch.compile's C++ backend (its compile is timed apart)
        out["ours compiled"] = lambda: AdamMini(groups(), model=model, **HYPER, fused=True)
    return out


def time_round_robin(
    optimizers: dict[str, torch.optim.Optimizer], device: torch.device, warmup: int, steps: int
) -> dict[str, list[float]]:
    """Seconds per step of each optimizer, taking turns step by step so that load changes on the
    machine hit every optimizer alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for optimizer in optimizers.values():
        for _ in range(warmup):
            optimizer.step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def run(shape: str, device: torch.device, dtype: torch.dtype, warmup: int, steps: int,
        only: list[str] | None, compiled: bool = False) -> list[Row]:
    model = build(shape, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"shape {shape}: {n_params / 1e6:.1f}M parameters, {dtype}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f", {torch.get_num_threads()} threads"))
    optimizers = {}
    for name, make in candidates(model, device, compiled).items():
        if only and not any(key in name for key in only):
            continue
        try:
            optimizers[name] = make()
            started = time.perf_counter()
            optimizers[name].step()  # creates the state (and JIT-compiles the kernels, or compiles)
            print(f"  {name}: first step {time.perf_counter() - started:.2f} s")
        except (RuntimeError, ValueError) as err:  # e.g. a fused kernel this build lacks
            optimizers.pop(name, None)
            print(f"  {name}: skipped ({str(err).splitlines()[0]})")
    times = time_round_robin(optimizers, device, warmup, steps)
    rows = []
    for name, optimizer in optimizers.items():
        median, fastest = statistics.median(times[name]) * 1e3, min(times[name]) * 1e3
        rows.append(Row(name, median, state_memory(optimizer).bytes_per_param))
        print(f"  {name:28s} {median:9.2f} ms/step (min {fastest:8.2f})   {rows[-1].bytes_per_param:5.2f} state "
              "bytes/param")
    return rows


def report(rows: list[Row]) -> None:
    by_name = {row.name: row for row in rows}
    ours = [row for row in rows if row.name.startswith("ours")]
    if not ours:
        return
    best = min(ours, key=lambda row: row.median_ms)
    print(f"fastest of ours: {best.name} ({best.median_ms:.2f} ms)")
    for other in ("torch AdamW foreach", "torch AdamW fused", "official adam-mini 1.1.1"):
        if other in by_name:
            print(f"  ours / {other}: {best.median_ms / by_name[other].median_ms:.3f}x"
                  f"   ({other} / ours: {by_name[other].median_ms / best.median_ms:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES) + sorted(LLAMA_SHAPES), default=None,
                        help="model shape (default: small; quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="CPU CI mode: the quick shape, few steps")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, cpu with --quick)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (JIT compilation happens here)")
    parser.add_argument("--only", nargs="*", help="run only optimizers whose name contains one of these words")
    parser.add_argument("--compiled", action="store_true",
                        help="on the CPU, also ours with fused=True (torch.compile; its first step compiles)")
    args = parser.parse_args(argv)
    shape = args.shape or ("quick" if args.quick else "small")
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    steps = args.steps or (5 if args.quick else 20)
    rows = run(shape, device, getattr(torch, args.dtype), args.warmup, steps, args.only, args.compiled)
    report(rows)


if __name__ == "__main__":
    main()
