"""Adam-mini with three partitions of the bundled GPT-2-style model, at two learning rates.

* ``derived``: measured by the partitioner (hessian_blocks.partitioner) on the model at init;
* ``paper``: the papers' rules written by hand (q/k per head, v/o/MLP per neuron, embeddings and
  output per token, norms whole, biases per coordinate);
* ``per-tensor``: one block per parameter tensor (the "PyTorch default" partition the Adam-mini
  paper reports as unstable on large Transformers).

Same initialisation, same batches (byte-level text bundled with Python), side by side in one run.
Prints the final training loss of every run and writes ``loss_curves.png``, ``losses.json`` and
``derived_partition.json`` (the rules with their evidence).

    PYTHONPATH=. python benchmarks/partition_training.py --out runs/partition_training   # ~45 min on 1 CPU core
    PYTHONPATH=. python benchmarks/partition_training.py --quick --out /tmp/pt          # ~3 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from hessian_blocks import Partition, Rule, build_model, make_batches
from hessian_blocks.partitioner import derive_decisions
from optim import AdamMini


def paper_rules(model: torch.nn.Module, head_dim: int) -> list[Rule]:
    """The papers' partition of the bundled GPT, written from its module names (the hand-made reference)."""
    rules = []
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            rules.append(Rule(name, "elements", why="paper: biases per coordinate"))
        elif "q_proj" in name or "k_proj" in name:
            rules.append(Rule(name, "groups", axis=0, size=head_dim, why="paper: per head"))
        elif p.dim() == 1:
            rules.append(Rule(name, "whole", why="paper: norm scale"))
        else:
            rules.append(Rule(name, "groups", axis=0, size=1, why="paper: per neuron / token"))
    return rules


def train(config: dict, partition: Partition, batches, lr: float, steps: int, seed: int) -> list[float]:
    spec = build_model("gpt2-nano", seed=seed, **config)
    model = spec.model.train()
    optimizer = AdamMini(model, partition=partition, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = spec.loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item() if torch.isfinite(loss) else float("nan"))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/partition_training"))
    parser.add_argument("--quick", action="store_true", help="small model, short runs")
    parser.add_argument("--lrs", type=float, nargs=2, default=[1e-3, 1e-2], help="two learning rates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.quick:
        config, steps, n_batches = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=256, context=32), 150, 40
    else:
        config, steps, n_batches = dict(n_layer=4, n_embd=128, n_head=4, vocab_size=256, context=64), 600, 200
    spec = build_model("gpt2-nano", seed=args.seed, **config)
    head_dim = config["n_embd"] // config["n_head"]

    started = time.perf_counter()
    measure_spec = build_model("gpt2-nano", seed=args.seed, dtype=torch.float64, **config)
    measure_batches = make_batches(measure_spec, "text", batch_size=8, n_batches=1, seed=args.seed + 1, dtype=torch.float64)
    decisions = derive_decisions(measure_spec.model, measure_spec.loss_fn, measure_batches, dtype=torch.float32,
                                 probes=2, strategy="vmap", seed=args.seed)
    derive_seconds = time.perf_counter() - started
    partitions = {
        "derived": Partition.from_rules(spec.model, [d.rule for d in decisions]),
        "paper": Partition.from_rules(spec.model, paper_rules(spec.model, head_dim)),
        "per-tensor": Partition.per_tensor(spec.model),
    }
    differing = [d.rule.param for d, p in zip(decisions, partitions["paper"].rules)
                 if (d.rule.split, d.rule.axis, d.rule.size, d.rule.runs) != (p.split, p.axis, p.size, p.runs)]

    batches = make_batches(spec, "text", batch_size=16, n_batches=n_batches, seed=args.seed + 2)
    curves = {lr: {label: train(config, part, batches, lr, steps, args.seed) for label, part in partitions.items()}
              for lr in args.lrs}

    args.out.mkdir(parents=True, exist_ok=True)
    partitions["derived"].save(args.out / "derived_partition.json")
    window = max(1, steps // 20)
    print(f"GPT-2-style {config}, {steps} steps, batch 16; partition derived in {derive_seconds:.1f} s")
    print(f"derived partition differs from the paper's on {len(differing)} tensors: {differing}")
    print(f"blocks: " + ", ".join(f"{k} {len(p.blocks)}" for k, p in partitions.items()))
    print(f"{'lr':>8} {'partition':>12} {'final loss (mean of last ' + str(window) + ')':>30} {'vs paper':>9}")
    summary = {}
    for lr, runs in curves.items():
        paper_final = float(np.mean(runs["paper"][-window:]))
        for label, losses in runs.items():
            final = float(np.mean(losses[-window:]))
            summary[f"{lr:g}/{label}"] = final
            print(f"{lr:>8g} {label:>12} {final:>30.4f} {final / paper_final:>9.4f}")
    (args.out / "losses.json").write_text(json.dumps(
        {"config": config, "steps": steps, "differing_from_paper": differing, "final": summary,
         "curves": {f"{lr:g}": runs for lr, runs in curves.items()}}, indent=1) + "\n")

    fig = Figure(figsize=(10, 4), layout="constrained")
    for k, (lr, runs) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), k + 1)
        for label, losses in runs.items():
            ax.plot(np.arange(1, steps + 1), losses, label=label, linewidth=1)
        ax.set_title(f"Adam-mini, lr = {lr:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.savefig(args.out / "loss_curves.png", dpi=120)
    print(f"wrote {args.out}/(loss_curves.png, losses.json, derived_partition.json)")


if __name__ == "__main__":
    main()
