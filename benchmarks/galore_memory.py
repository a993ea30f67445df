"""GaLore-mini vs Adam-mini vs AdamW on the bundled GPT-2-style model: state bytes and loss.

1. Optimizer-state bytes after one step, relative to AdamW, for the matrices GaLore-mini projects
   (every 2-D weight: embeddings, attention, MLP, output head) and for the whole model, at
   rank = width / 4 (``--rank``).
2. Training loss of AdamW, Adam-mini and GaLore-mini from the same initialisation on the same
   offline batches (byte-level text bundled with Python), same learning rate and betas, and the
   final loss on held-out batches.

GaLore-mini runs with ``scale=1`` by default: with no weight decay, GaLore's ``scale=0.25`` at 4x the
learning rate is the same update, so one shared learning rate compares like with like.

Prints both tables and writes ``galore_mini.png`` (loss curves | memory bars) and ``galore_mini.json``
to ``--out`` (default ``benchmarks/results``).

    python benchmarks/galore_memory.py                    # gpt2-nano defaults, 300 steps (~3-4 min on 1 CPU core)
    python benchmarks/galore_memory.py --quick --out /tmp/galore
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

import optim
from analysis.experiments.training import TrainSetup, mean_loss, run_steps
from hessian_blocks import build_model

FULL = dict(config={}, steps=300, batch_size=16, train_batches=32, val_batches=4)
QUICK = dict(config=dict(n_layer=1, n_embd=64, n_head=4, vocab_size=256, context=32), steps=40, batch_size=8,
             train_batches=8, val_batches=2)
LABELS = {"adamw": "AdamW", "adam_mini": "Adam-mini", "galore_mini": "GaLore-mini"}


def optimizer_for(name: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    extra = dict(rank=args.rank, update_proj_gap=args.gap, scale=args.scale,
                 projector=args.projector) if name == "galore_mini" else {}
    return optim.make(name, model, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, **extra)


def state_bytes(config: dict, args: argparse.Namespace, batch) -> dict:
    """State bytes of each optimizer after one step: whole model and the projected matrices only."""
    out, projected = {}, None
    for name in LABELS:
        spec = build_model("gpt2-nano", seed=args.seed, **config)
        optimizer = optimizer_for(name, spec.model, args)
        run_steps(spec.model, spec.loss_fn, optimizer, [batch], 1)
        if name == "galore_mini":
            named = dict(spec.model.named_parameters())
            projected = [n for n, p in named.items() if optimizer.projection(p) is not None]
        out[name] = (optimizer, spec.model)
    rows = {}
    for name, (optimizer, model) in out.items():
        named = dict(model.named_parameters())
        whole = optim.state_memory(optimizer)
        subset = optim.state_memory(optimizer, [named[n] for n in projected])
        rows[name] = {"whole_bytes": whole.total_bytes, "projected_bytes": subset.total_bytes,
                      "whole_params": whole.n_params, "projected_params": subset.n_params, "by_key": whole.by_key}
    for row in rows.values():
        row["whole_vs_adamw"] = row["whole_bytes"] / rows["adamw"]["whole_bytes"]
        row["projected_vs_adamw"] = row["projected_bytes"] / rows["adamw"]["projected_bytes"]
    return {"projected": projected, "rows": rows}


def train(name: str, config: dict, args: argparse.Namespace, train_batches, val_batches) -> dict:
    spec = build_model("gpt2-nano", seed=args.seed, **config)
    model = spec.model.train()
    optimizer = optimizer_for(name, model, args)
    losses, times = run_steps(model, spec.loss_fn, optimizer, train_batches, args.steps)
    return {"losses": losses, "val_loss": mean_loss(spec, val_batches), "seconds_per_step": float(np.mean(times))}


def smooth(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, values.size))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def figure(memory: dict, runs: dict, args: argparse.Namespace, width: int) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    curves, bars = fig.subplots(1, 2, width_ratios=(1.6, 1))
    window = max(1, args.steps // 30)
    for name, run in runs.items():
        curve = smooth(run["losses"], window)
        curves.plot(np.arange(curve.size) + window, curve, label=f"{LABELS[name]} (held-out {run['val_loss']:.3f})")
    curves.set_xlabel("step")
    curves.set_ylabel(f"training loss (mean of {window} steps)")
    curves.set_title(f"gpt2-nano, lr {args.lr:g}; GaLore-mini rank {memory['rank_label']}, gap {args.gap}, scale "
                     f"{args.scale:g}")
    curves.legend()
    names = list(LABELS)
    xs = np.arange(len(names))
    for offset, key, label in ((-0.2, "projected_vs_adamw", "projected matrices"),
                               (0.2, "whole_vs_adamw", "whole model")):
        values = [memory["rows"][n][key] for n in names]
        drawn = bars.bar(xs + offset, values, width=0.4, label=label)
        bars.bar_label(drawn, labels=[f"{v:.2f}x" for v in values], fontsize=8)
    bars.axhline(0.25, color="grey", linestyle=":", linewidth=1)
    bars.set_xticks(xs, [LABELS[n] for n in names])
    bars.set_ylabel("optimizer state / AdamW's")
    bars.set_title(f"state bytes after one step (width {width})")
    bars.legend(fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="a one-layer width-64 model, 40 steps")
    parser.add_argument("--steps", type=int, help="training steps (default 300, quick 40)")
    parser.add_argument("--lr", type=float, default=1e-3, help="shared learning rate (AdamW's best of 1e-3, 3e-3 here)")
    parser.add_argument("--rank", type=int, help="GaLore-mini rank (default width / 4)")
    parser.add_argument("--gap", type=int, default=50, help="steps between projector refreshes")
    parser.add_argument("--scale", type=float, default=1.0, help="GaLore's alpha on the projected-back update")
    parser.add_argument("--projector", choices=("svd", "randomized"), default="svd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    args.steps = args.steps or preset["steps"]
    config = preset["config"]
    setup = TrainSetup("gpt2-nano", config, "auto", preset["batch_size"], preset["train_batches"],
                       preset["val_batches"])
    spec, train_batches, val_batches = setup.build(args.seed)  # validation text held out from the training text
    width = spec.model.config.n_embd
    args.rank = args.rank or width // 4

    memory = state_bytes(config, args, train_batches[0])
    memory["rank_label"] = f"{args.rank} (width {width} / {width // args.rank if args.rank else 0})"
    print(f"optimizer state after one step, gpt2-nano width {width}, GaLore-mini rank {args.rank} "
          f"({len(memory['projected'])} projected matrices):")
    print(f"{'optimizer':<12} {'projected bytes':>16} {'vs AdamW':>9} {'whole bytes':>12} {'vs AdamW':>9}")
    for name, row in memory["rows"].items():
        print(f"{LABELS[name]:<12} {row['projected_bytes']:>16,} {row['projected_vs_adamw']:>8.3f}x "
              f"{row['whole_bytes']:>12,} {row['whole_vs_adamw']:>8.3f}x")

    runs = {}
    for name in LABELS:
        runs[name] = train(name, config, args, train_batches, val_batches)
        run = runs[name]
        tail = float(np.mean(run["losses"][-max(1, args.steps // 10):]))
        print(f"{LABELS[name]:<12} final train loss (last 10% mean) {tail:.4f}  held-out {run['val_loss']:.4f}  "
              f"{1e3 * run['seconds_per_step']:.0f} ms/step", flush=True)
    base = runs["adamw"]["val_loss"]
    for name in ("adam_mini", "galore_mini"):
        print(f"{LABELS[name]} held-out loss - AdamW's: {runs[name]['val_loss'] - base:+.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure(memory, runs, args, width).savefig(args.out / "galore_mini.png", dpi=120)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "galore_mini.json").write_text(json.dumps({"settings": settings, "config": config, "memory": memory,
                                                           "runs": runs}, indent=1))
    print(f"wrote {args.out / 'galore_mini.png'} and {args.out / 'galore_mini.json'}")


if __name__ == "__main__":
    main()
