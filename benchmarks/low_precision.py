"""Low-precision Adam-mini: does a bfloat16 or 8-bit first moment, or pure-bfloat16 training, cost loss?

Trains the comparison experiment's medium setup (GPT-2-style model, 2 layers, width 64, a new batch
of 16 every step, 300 steps, held-out validation text; ``ComparisonConfig.preset("medium")``) with

- AdamW (float32 states) and Adam-mini with a float32, a bfloat16 and an 8-bit block-quantized first
  moment, on float32 parameters;
- pure bfloat16: parameters, gradients and Adam-mini's first moment in bfloat16, with round-to-nearest
  parameter updates and with stochastic rounding;

over three seeds at the experiment's best Adam lr (1e-3), and prints, side by side from one run:
validation loss (mean over seeds; bfloat16 models are evaluated in float32), its ratio to float32
Adam-mini, optimizer-state bytes per parameter, and seconds per step on this CPU relative to float32
Adam-mini. Writes ``low_precision.json`` to ``--out`` (default ``benchmarks/results``).

    python benchmarks/low_precision.py                  # 18 runs of 300 steps: ~4 minutes on one idle CPU core
    python benchmarks/low_precision.py --quick --out /tmp/lp
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import optim
from analysis.experiments.comparison import ComparisonConfig
from analysis.experiments.training import mean_loss, run_steps

LR = 1e-3
# label: (parameter dtype, optimizer, options)
VARIANTS: dict[str, tuple[torch.dtype, str, dict]] = {
    "AdamW": (torch.float32, "adamw", {}),
    "Adam-mini fp32 m": (torch.float32, "adam_mini", {}),
    "Adam-mini bf16 m": (torch.float32, "adam_mini", {"state_dtype": torch.bfloat16}),
    "Adam-mini 8-bit m": (torch.float32, "adam_mini", {"state_dtype": torch.int8}),
    "pure bf16, round to nearest": (torch.bfloat16, "adam_mini", {}),
    "pure bf16, stochastic rounding": (torch.bfloat16, "adam_mini", {"stochastic_rounding": True}),
}
BASELINE = "Adam-mini fp32 m"


def run(label: str, config: ComparisonConfig, seed: int) -> dict:
    dtype, name, options = VARIANTS[label]
    spec, train, val = config.setup().build(seed)
    model = spec.model.to(dtype).train()
    optimizer = optim.make(name, model, lr=LR, **options)
    torch.manual_seed(seed)
    losses, times = run_steps(model, spec.loss_fn, optimizer, train, config.steps)
    memory = optim.state_memory(optimizer)
    model.float()  # evaluate every variant's weights in the same arithmetic
    return {"val_loss": mean_loss(spec, val), "final_train_loss": losses[-1], "bytes_per_param": memory.bytes_per_param,
            "seconds_per_step": statistics.fmean(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small size, 30 steps, one seed (a smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        config, seeds = ComparisonConfig.preset("small", steps=30), [0]
    else:
        config, seeds = ComparisonConfig.preset("medium"), list(range(args.seeds))
    results = {label: [run(label, config, seed) for seed in seeds] for label in VARIANTS}
    summary = {}
    for label, runs in results.items():
        summary[label] = {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
        summary[label]["val_loss_per_seed"] = [r["val_loss"] for r in runs]
    base = summary[BASELINE]
    print(f"\n{config.model} {config.overrides}, {config.steps} steps, lr {LR:g}, seeds {seeds}\n")
    print("| variant | val loss | vs fp32 Adam-mini | state bytes/param | s/step | vs fp32 Adam-mini |")
    print("|---|---|---|---|---|---|")
    for label, row in summary.items():
        print(f"| {label} | {row['val_loss']:.4f} | {row['val_loss'] / base['val_loss'] - 1:+.2%} | "
              f"{row['bytes_per_param']:.3f} | {row['seconds_per_step'] * 1e3:.1f} ms | "
              f"{row['seconds_per_step'] / base['seconds_per_step']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "low_precision.json"
    path.write_text(json.dumps({"model": config.model, "overrides": config.overrides, "steps": config.steps, "lr": LR,
                                "seeds": seeds, "summary": summary, "runs": results}, indent=1) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
