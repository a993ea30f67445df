"""Where the seconds of a block-spectrum run go: set-up, guards and the first Lanczos steps, by operation kind.

The run ``hessian-blocks js`` makes, taken apart on a GPT-2-style model with 4 sampled layers plus
embeddings and head (the papers' sample): the wall time of each phase (model, data, BlockHessian, the
guards, the first and the second Lanczos step), then torch.profiler's breakdown of one Lanczos step
(10 probes x every block) into matrix products, attention softmax, other elementwise work, copies and
indexing, and what no operation accounts for (autograd engine, vmap and Python overhead; on CUDA: the
GPU idle between kernels), with the number of operations (CPU) or kernels (CUDA) and of vectorized
backward calls. The same step is then timed for each variant side by side: products one (block, probe)
pair at a time (what the loop did before) vs vectorized over the pairs of a parameter, float64 vs
float32 products, loop vs vmap.

    python benchmarks/spectra_profile.py                     # CPU: 12 layers, width 64, 2 x 128 tokens
    python benchmarks/spectra_profile.py --device cuda --shape gpt2-small   # 12 x 768, 1 x 1024 tokens
    python benchmarks/spectra_profile.py --quick             # tiny, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hessian_blocks import BlockHessian, Partition, build_model, make_batches, sample_layers
from hessian_blocks.guards import check_batches
from hessian_blocks.lanczos import lanczos, make_probes

SHAPES = {  # GPT-2-style configs of the bundled gpt2-nano, with (batch size, probes)
    "quick": (dict(n_layer=2, n_embd=16, n_head=2, vocab_size=256, context=16), 2, 2),
    "cpu-small": (dict(n_layer=12, n_embd=64, n_head=4, vocab_size=512, context=128), 2, 10),
    "gpt2-small": (dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50304, context=1024), 1, 10),
}
CATEGORIES = {  # aten operation -> kind (anything else: "elementwise and reductions")
    "matrix products": ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution",
                        "cudnn_convolution", "mkldnn_convolution", "convolution_backward", "addmv", "mv", "dot"),
    "softmax": ("_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data", "softmax",
                "log_softmax", "masked_fill", "masked_fill_"),
    "copies and indexing": ("copy_", "_to_copy", "clone", "contiguous", "index", "index_put_", "_index_put_impl_",
                            "index_add_", "index_copy_", "index_select", "gather", "scatter", "scatter_add_", "cat",
                            "stack", "fill_", "zero_", "zeros", "zeros_like", "empty", "empty_like", "new_zeros",
                            "ones_like", "embedding", "embedding_dense_backward", "embedding_backward",
                            "nonzero", "where"),
}
KIND = {op: kind for kind, ops in CATEGORIES.items() for op in ops}


def build(shape: str, dtype: torch.dtype, device: torch.device, strategy: str = "auto",
          chunk_size: int | None = None) -> tuple[BlockHessian, dict[str, float], int]:
    """The BlockHessian of the shape's model on 4 sampled layers + embeddings/head, the wall seconds of
    each set-up phase, and the number of probes."""
    overrides, batch_size, probes = SHAPES[shape]
    phases = {}
    started = time.perf_counter()
    spec = build_model("gpt2-nano", seed=0, **overrides)
    phases["model"] = time.perf_counter() - started
    started = time.perf_counter()
    batches = make_batches(spec, "synthetic", batch_size=batch_size, n_batches=1, dtype=dtype)
    check_batches(spec.model, spec.loss_fn, batches)
    phases["data (and its checks)"] = time.perf_counter() - started
    started = time.perf_counter()
    blocks = sample_layers(Partition.per_tensor(spec.model).blocks, 4)
    hessian = BlockHessian(spec.model, spec.loss_fn, batches, blocks, dtype=dtype, device=device,
                           strategy=strategy, chunk_size=chunk_size, check=False)
    _sync(device)
    phases["BlockHessian (parameters to the device)"] = time.perf_counter() - started
    started = time.perf_counter()
    hessian.check()
    _sync(device)
    phases["guards"] = time.perf_counter() - started
    return hessian, phases, probes


def lanczos_step(hessian: BlockHessian, start: torch.Tensor) -> float:
    """Wall seconds of one Lanczos step (one block-diagonal product of every block and probe), float64 recurrences."""
    started = time.perf_counter()
    lanczos(lambda v: hessian.block_matvec(v).double(), start, hessian.block_ids, len(hessian.blocks), 1)
    _sync(hessian.device)
    return time.perf_counter() - started


def breakdown(hessian: BlockHessian, start: torch.Tensor) -> dict[str, Any]:
    """torch.profiler's account of one Lanczos step: seconds by kind of operation (CPU: self CPU time of
    the aten operations; CUDA: kernel time), what no operation accounts for, and the counts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = hessian.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = lanczos_step(hessian, start)
    seconds = dict.fromkeys([*CATEGORIES, "elementwise and reductions"], 0.0)
    operations = kernels = 0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = KIND.get(event.key.removeprefix("aten::"), "elementwise and reductions")
        spent = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        seconds[kind] += spent
        operations += event.count
    if cuda:
        kernels = sum(event.count for event in prof.key_averages()
                      if event.device_type == torch.autograd.DeviceType.CUDA)
    accounted = sum(seconds.values())
    rest = "GPU idle between kernels (launches, Python, autograd)" if cuda else \
        "autograd engine, vmap and Python (no operation's own time)"
    seconds[rest] = max(wall - accounted, 0.0)
    chunks = len(hessian._pair_chunks(start.to(hessian.dtype)))
    return {"wall_s": wall, "seconds": seconds, "aten_operations": operations, "cuda_kernels": kernels or None,
            "vectorized_calls": chunks, "pairs": int(start.shape[0]) * len(hessian.blocks)}


def variants(shape: str, device: torch.device, dtype: torch.dtype, start: torch.Tensor,
             repeats: int) -> dict[str, float]:
    """The same Lanczos step, each variant built once and timed ``repeats`` times in turn (interleaved, so a
    busy machine slows them alike); the best of each."""
    other = torch.float32 if dtype == torch.float64 else torch.float64
    hessians = {
        f"loop, one pair per backward (before), {_name(dtype)}": build(shape, dtype, device, "loop", chunk_size=1)[0],
        f"loop, default chunks (now), {_name(dtype)}": build(shape, dtype, device, "loop")[0],
        f"loop, default chunks (now), {_name(other)}": build(shape, other, device, "loop")[0],
        f"vmap, {_name(dtype)}": build(shape, dtype, device, "vmap")[0],
    }
    for hessian in hessians.values():
        lanczos_step(hessian, start[:1])  # warm-up
    times: dict[str, list[float]] = {label: [] for label in hessians}
    for _ in range(repeats):
        for label, hessian in hessians.items():
            times[label].append(lanczos_step(hessian, start))
    return {label: min(t) for label, t in times.items()}


def profile_run(shape: str = "cpu-small", device: str = "cpu", dtype: str = "float64", repeats: int = 1,
                compare: bool = True) -> dict[str, Any]:
    """Phases, the breakdown of the first Lanczos step, and (``compare``) the variants side by side."""
    device = torch.device(device)
    dtype = getattr(torch, dtype)
    hessian, phases, probes = build(shape, dtype, device)
    start = make_probes(probes, hessian.size, dtype=torch.float64, device=device)
    phases["first Lanczos step"] = lanczos_step(hessian, start)
    phases["second Lanczos step"] = lanczos_step(hessian, start)
    report = {"shape": shape, "config": SHAPES[shape][0], "batch_size": SHAPES[shape][1], "probes": probes,
              "blocks": len(hessian.blocks), "coordinates": hessian.size, "dtype": _name(dtype),
              "device": str(device), "strategy": hessian.strategy, "phases_s": phases,
              "step_breakdown": breakdown(hessian, start)}
    if compare:
        report["step_variants_s"] = variants(shape, device, dtype, start, repeats)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['shape']} ({report['blocks']} blocks, {report['coordinates']:,} coordinates, "
             f"{report['probes']} probes, {report['dtype']}, {report['strategy']}, {report['device']})", "",
             "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {seconds:.3g} |" for phase, seconds in report["phases_s"].items()]
    step = report["step_breakdown"]
    counts = f"{step['aten_operations']:,} aten operations"
    if step["cuda_kernels"]:
        counts += f", {step['cuda_kernels']:,} CUDA kernels"
    lines += ["", f"one Lanczos step under the profiler: {step['wall_s']:.3g} s, {step['pairs']} (block, probe) "
              f"pairs in {step['vectorized_calls']} vectorized calls, {counts}", "",
              "| kind | seconds | share |", "|---|---|---|"]
    lines += [f"| {kind} | {seconds:.3g} | {seconds / step['wall_s']:.0%} |" for kind, seconds in
              step["seconds"].items()]
    if "step_variants_s" in report:
        variants = report["step_variants_s"]
        before = next(iter(variants.values()))
        lines += ["", "| one Lanczos step | seconds | before / this |", "|---|---|---|"]
        lines += [f"| {label} | {seconds:.3g} | {before / seconds:.2f} |" for label, seconds in variants.items()]
    return "\n".join(lines)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None,
                        help="model shape (default: cpu-small on the CPU, gpt2-small on CUDA; quick with --quick)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float64", "float32"), default=None,
                        help="precision of the profiled products (default: float32 on CUDA, float64 on the CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of each variant, interleaved (default: 2)")
    parser.add_argument("--quick", action="store_true", help="the tiny shape, one repeat (seconds)")
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    shape = args.shape or ("quick" if args.quick else "gpt2-small" if cuda else "cpu-small")
    report = profile_run(shape, args.device, args.dtype or ("float32" if cuda else "float64"),
                         repeats=1 if args.quick else args.repeats)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
