"""Adam-mini with three partitions of a GPT-2 model, at two learning rates.

* ``derived``: measured by the partitioner (hessian_blocks.partitions) on the model at init;
* ``paper``: the papers' rules written by hand (q/k per head, v/o/MLP per neuron, embeddings and
  output per token, norms whole, biases per coordinate);
* ``per-tensor``: one block per parameter tensor (the "PyTorch default" partition the Adam-mini
  paper reports as unstable on large Transformers).

The model is the bundled GPT-2-style model (``--model gpt2-nano``, untied output layer) or a
Hugging Face ``GPT2LMHeadModel`` built from a config (``--model hf-gpt2``: tied input/output
embedding, fused Conv1D ``c_attn``; needs ``transformers``). Same initialisation, same batches
(byte-level text bundled with Python), side by side in one run.
With ``--seeds N`` every run is repeated from N initialisations and batch orders (the partition
is derived once, on the first); ``--ablate`` adds two mixtures that tell which of the derived
partition's differences from the paper's move the loss: the derived rules with the paper's on every
1-D tensor (biases, norm scales: ``derived+paper-1D``), and with the paper's on every tensor of two
or more axes (``derived+paper-nD``).
Prints the final training loss of every run and writes ``loss_curves.png``, ``losses.json``,
``derived_partition.json`` (the rules with their evidence) and ``couplings-seed<N>.npz`` (the measured slice
couplings: a second run with the same ``--out`` and model re-uses them and only re-decides, so
decision settings can be changed without the slow measurement; ``--remeasure`` forces it).

    PYTHONPATH=. python benchmarks/partition_training.py --out runs/partition_training   # ~30 min on 1 CPU core
    PYTHONPATH=. python benchmarks/partition_training.py --quick --out /tmp/pt          # ~1.5 min
    PYTHONPATH=. python benchmarks/partition_training.py --model hf-gpt2 --out /tmp/hf  # ~5 min
    # the README's table: --seeds 3 --ablate (the default gpt2-nano: ~19 min measuring, ~40 min training)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

import optim
from analysis.experiments.training import run_steps
from hessian_blocks import Partition, Rule, build_model, make_batches
from hessian_blocks.models import ModelSpec, cross_entropy_loss
from hessian_blocks.partitions.coupling import load_couplings, measure_coupling, save_couplings
from hessian_blocks.partitions.decide import decide_rule

SIZES = {  # (model config, steps, training batches) of the default and the --quick runs
    "gpt2-nano": ((dict(n_layer=4, n_embd=128, n_head=4, vocab_size=256, context=64), 600, 200),
                  (dict(n_layer=2, n_embd=32, n_head=4, vocab_size=256, context=32), 150, 40)),
    "hf-gpt2": ((dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, context=64), 400, 100),
                (dict(n_layer=2, n_embd=32, n_head=4, vocab_size=256, context=32), 150, 40)),
}


def build(kind: str, config: dict, seed: int, dtype: torch.dtype = torch.float32) -> ModelSpec:
    """The bundled GPT-2-style model, or Hugging Face GPT-2 (tied embedding) from the same config fields."""
    if kind == "gpt2-nano":
        return build_model("gpt2-nano", seed=seed, dtype=dtype, **config)
    import transformers

    hf_config = transformers.GPT2Config(
        n_layer=config["n_layer"], n_embd=config["n_embd"], n_head=config["n_head"], vocab_size=config["vocab_size"],
        n_positions=config["context"], attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(hf_config).to(dtype).eval()
    data_shape = {"vocab_size": config["vocab_size"], "context": config["context"]}
    return ModelSpec(kind, model, lambda output, y: cross_entropy_loss(output.logits, y), "text", data_shape, hf_config)


def paper_rules(kind: str, model: torch.nn.Module, head_dim: int) -> list[Rule]:
    """The papers' partition written from the module names of the model (the hand-made reference).

    The bundled model stores weights [out, in] (neurons and tokens along axis 0); Hugging Face
    GPT-2's Conv1D stores them [in, out] (neurons along axis 1) and fuses q|k|v into ``c_attn``.
    """
    rules = []
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            rules.append(Rule(name, "elements", why="paper: biases per coordinate"))
        elif p.dim() == 1:
            rules.append(Rule(name, "whole", why="paper: norm scale"))
        elif "q_proj" in name or "k_proj" in name:
            rules.append(Rule(name, "groups", axis=0, size=head_dim, why="paper: per head"))
        elif "c_attn" in name:
            width = p.shape[0]
            rules.append(Rule(name, "groups", axis=1, runs=((head_dim, 2 * width // head_dim), (1, width)),
                              why="paper: q and k per head, v per neuron"))
        elif kind == "hf-gpt2" and name.startswith("transformer.h."):
            rules.append(Rule(name, "groups", axis=1, size=1, why="paper: per neuron (Conv1D [in, out])"))
        else:
            rules.append(Rule(name, "groups", axis=0, size=1, why="paper: per neuron / token"))
    return rules


def train(kind: str, config: dict, partition: Partition, batches, lr: float, steps: int, seed: int) -> list[float]:
    spec = build(kind, config, seed)
    model = spec.model.train()
    optimizer = optim.make("adam_mini", model, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, partition=partition)
    return run_steps(model, spec.loss_fn, optimizer, batches, steps)[0]


def plot_curves(curves: dict[str, dict[str, list[list[float]]]], window: int) -> Figure:
    """Training loss per step for each lr (a panel) and partition: the mean over seeds, faint, and
    its moving average over ``window`` steps, solid (dashed for the ablation mixtures)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    for k, (lr, runs) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), k + 1)
        for k_label, (label, per_seed) in enumerate(runs.items()):
            mean = np.mean(np.asarray(per_seed, dtype=float), axis=0)
            steps = np.arange(1, len(mean) + 1)
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            style = "--" if label.startswith("derived+") else "-"
            ax.plot(steps, mean, color=f"C{k_label}", linewidth=0.6, alpha=0.25)
            ax.plot(steps[window - 1:], smooth, style, color=f"C{k_label}", linewidth=1.5, label=label)
        seeds = len(next(iter(runs.values())))
        ax.set_title(f"Adam-mini, lr = {lr} (mean of {seeds} seed{'s' if seeds > 1 else ''})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/partition_training"))
    parser.add_argument("--model", choices=tuple(SIZES), default="gpt2-nano", help="which GPT-2 (default: gpt2-nano)")
    parser.add_argument("--quick", action="store_true", help="small model, short runs")
    parser.add_argument("--lrs", type=float, nargs=2, default=[1e-3, 1e-2], help="two learning rates")
    parser.add_argument("--seed", type=int, default=0, help="seed of the measured model and of the first run")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training runs per partition and lr, seeds SEED, SEED+1, ...")
    parser.add_argument("--ablate", action="store_true", help="also train the derived partition with the paper's rules "
                                                                "on 1-D tensors, and on the others")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the couplings even if OUT/couplings-seed<N>.npz exists")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    torch.manual_seed(args.seed)
    config, steps, n_batches = SIZES[args.model][1 if args.quick else 0]
    spec = build(args.model, config, args.seed)
    head_dim = config["n_embd"] // config["n_head"]

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"couplings-seed{args.seed}.npz"
    measurement = {"model": args.model, "config": config, "seed": args.seed, "probes": 2, "dtype": "float32"}
    if cache.exists() and not args.remeasure:
        couplings = load_couplings(cache, settings=measurement)   # refused if measured for another model or size
        source = f"re-used from {cache}"
    else:
        measure_spec = build(args.model, config, args.seed, dtype=torch.float64)
        measure_batches = make_batches(measure_spec, "text", batch_size=8, n_batches=1, seed=args.seed + 1,
                                       dtype=torch.float64)
        couplings = measure_coupling(measure_spec.model, measure_spec.loss_fn, measure_batches, dtype=torch.float32,
                                     probes=2, strategy="vmap", seed=args.seed)
        save_couplings(couplings, cache, settings=measurement)
        source = "measured"
    decisions = [decide_rule(c) for c in couplings.values()]
    derive_seconds = time.perf_counter() - started
    derived = [d.rule for d in decisions]
    paper = paper_rules(args.model, spec.model, head_dim)
    partitions = {
        "derived": Partition.from_rules(spec.model, derived),
        "paper": Partition.from_rules(spec.model, paper),
        "per-tensor": Partition.per_tensor(spec.model),
    }
    if args.ablate:
        dims = {name: p.dim() for name, p in spec.model.named_parameters()}
        for label, paper_on in (("derived+paper-1D", lambda n: n == 1), ("derived+paper-nD", lambda n: n >= 2)):
            mixed = [p if paper_on(dims[p.param]) else d for d, p in zip(derived, paper)]
            partitions[label] = Partition.from_rules(spec.model, mixed)
    differing = [d.param for d, p in zip(derived, paper)
                 if (d.split, d.axis, d.size, d.runs) != (p.split, p.axis, p.size, p.runs)]

    seeds = range(args.seed, args.seed + args.seeds)
    curves = {lr: {label: [] for label in partitions} for lr in args.lrs}  # lr -> partition -> one curve per seed
    for seed in seeds:
        batches = make_batches(spec, "text", batch_size=16, n_batches=n_batches, seed=seed + 2)
        for lr in args.lrs:
            for label, part in partitions.items():
                curves[lr][label].append(train(args.model, config, part, batches, lr, steps, seed))

    partitions["derived"].save(args.out / "derived_partition.json")
    window = max(1, steps // 20)
    print(f"{args.model} {config}, {steps} steps, batch 16; partition derived in {derive_seconds:.1f} s "
          f"(couplings {source})")
    print(f"derived partition differs from the paper's on {len(differing)} tensors: {differing}")
    print("blocks: " + "; ".join(f"{k} {len(p.blocks)}" for k, p in partitions.items()))
    print(f"final training loss: mean of the last {window} steps, averaged over seeds {list(seeds)}")
    print(f"{'lr':>8} {'partition':>22} {'final loss':>11} {'vs paper':>9}  per seed")
    summary = {}
    for lr, runs in curves.items():
        finals = {label: [float(np.mean(c[-window:])) for c in per_seed] for label, per_seed in runs.items()}
        paper_final = float(np.mean(finals["paper"]))
        for label, values in finals.items():
            summary[f"{lr:g}/{label}"] = {"mean": float(np.mean(values)), "per_seed": values}
            print(f"{lr:>8g} {label:>22} {np.mean(values):>11.4f} {np.mean(values) / paper_final:>9.4f}  "
                  + " ".join(f"{v:.4f}" for v in values))
    (args.out / "losses.json").write_text(json.dumps(
        {"model": args.model, "config": config, "steps": steps, "seeds": list(seeds), "differing_from_paper": differing,
         "final": summary,
         "curves": {f"{lr:g}": runs for lr, runs in curves.items()}}, indent=1) + "\n")

    fig = plot_curves({f"{lr:g}": runs for lr, runs in curves.items()}, window)
    fig.savefig(args.out / "loss_curves.png", dpi=120)
    print(f"wrote {args.out}/(loss_curves.png, losses.json, derived_partition.json)")


if __name__ == "__main__":
    main()
