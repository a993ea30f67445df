"""Block-diagonal Hessian-vector products: per-block loop vs vmap vs auto vs one full-model HVP.

GPT2-nano shape (4 layers, width 128, 4 heads, vocab 512, context 64, batch 8, float64, 69 blocks,
one block per parameter tensor). Every timing is a median over repeats, measured side by side in
this one run; the ratios are what to compare across machines.

    python benchmarks/block_hvp.py                 # CPU, or CUDA when available
    python benchmarks/block_hvp.py --device cuda --repeats 20
    python benchmarks/block_hvp.py --quick         # tiny shape, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hessian_blocks.data import make_batches
from hessian_blocks.hvp import BlockHessian
from hessian_blocks.models import build_model


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny model and one repeat")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)

    overrides = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=300, context=16) if args.quick else {}
    repeats = 1 if args.quick else args.repeats
    spec = build_model("gpt2-nano", seed=0, **overrides)
    batches = make_batches(spec, "text", batch_size=2 if args.quick else args.batch_size, n_batches=1,
                           dtype=torch.float64)

    hessians = {s: BlockHessian(spec.model, spec.loss_fn, batches, dtype=torch.float64, device=device, strategy=s)
                for s in ("loop", "vmap", "auto")}
    size, n_blocks = hessians["loop"].size, len(hessians["loop"].blocks)
    vector = torch.randn(1, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    reference = hessians["loop"].block_matvec(vector)
    for strategy in ("vmap", "auto"):
        torch.testing.assert_close(hessians[strategy].block_matvec(vector), reference, rtol=1e-9, atol=1e-12)

    seconds = {
        "full-model HVP": timed(lambda: hessians["vmap"].matvec(vector), repeats, device),
        "block sweep, loop (papers)": timed(lambda: hessians["loop"].block_matvec(vector), repeats, device),
        "block sweep, vmap": timed(lambda: hessians["vmap"].block_matvec(vector), repeats, device),
        f"block sweep, auto (= {hessians['auto'].strategy})":
            timed(lambda: hessians["auto"].block_matvec(vector), repeats, device),
    }
    full, loop = seconds["full-model HVP"], seconds["block sweep, loop (papers)"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPT2-nano shape{' (quick)' if args.quick else ''}: {n_blocks} blocks, {size} parameters, "
          f"batch {batches[0][1].shape[0]}, float64, {name}, median of {repeats}")
    print(f"{'':32s} {'seconds':>10s} {'x full HVP':>11s} {'loop / this':>12s}")
    for label, value in seconds.items():
        print(f"{label:32s} {value:10.4f} {value / full:11.2f} {loop / value:12.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "blocks": n_blocks, "params": size, "seconds": seconds}, handle, indent=1)


if __name__ == "__main__":
    main()
