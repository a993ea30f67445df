"""``hessian-blocks compare``, ``hessian-blocks figures`` and ``hessian-blocks table1``: the experiments' commands.

They keep every finished work unit under ``--results`` and resume from it; Ctrl-C ends them
with one line saying so (exit code 130).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

from ..files import hold_output
from .options import (
    DTYPE_NAMES,
    add_compute_options,
    add_model_options,
    add_output_options,
    check_output_folder,
    exit_on_interrupt,
    parse_overrides,
)

__all__ = ["add_commands", "run_compare", "run_figures", "run_table1"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``compare``, ``figures`` and ``table1`` on the CLI's subparsers."""
    from analysis.experiments.groups import FIGURE_GROUPS
    from analysis.experiments.store import SIZES
    from optim.choices import OPTIMIZERS, PARTITIONED

    compare = commands.add_parser(
        "compare", help="train with SGD-momentum, AdamW, Adam-mini and GaLore-mini: loss curves, best lr, memory",
        description="Train one model with each optimizer over a small learning-rate grid and seeds, on "
        "offline data with the same budget; print the best-lr summary and write CSV + PNG files.",
    )
    add_model_options(compare, default="gpt2-nano", batches=False)
    compare.add_argument("--size", choices=SIZES, default="small",
                         help="preset for model size, budget and grids (default: small)")
    compare.add_argument("--optimizer", action="append", choices=OPTIMIZERS, metavar="NAME",
                         help=f"optimizer to run ({', '.join(OPTIMIZERS)}); repeatable (default: all)")
    compare.add_argument("--lr", action="append", default=[], metavar="NAME=LR[,LR...]",
                         help="learning-rate grid of one optimizer: distinct finite positive rates, e.g. "
                              "--lr adamw=1e-3,3e-3; repeat for other optimizers, at most once per optimizer "
                              "(default: the size's grid)")
    compare.add_argument("--steps", type=int, help="training steps per run, each on a new batch (default: the size's)")
    compare.add_argument("--seeds", type=int, help="seeds 0..N-1 per (optimizer, lr) (default: the size's)")
    compare.add_argument("--batch-size", type=int,
                         help="samples per training and validation batch (default: the size's)")
    compare.add_argument("--val-batches", type=int,
                         help="validation batches, drawn from the held-out part of the data (default: the size's); "
                              "a data file holds out its last 10 %%, which must hold batch size x validation "
                              "batches samples")
    compare.add_argument("--partition", default="default",
                         help=f"the partition of {' and '.join(PARTITIONED)} (the optimizers that take one): "
                              "default, derived (from the Hessian), or a partition JSON file (default: default)")
    compare.add_argument("--weight-decay", type=float, default=0.0,
                         help="weight decay (finite, >= 0) on all but biases and norm weights: decoupled, as in AdamW, "
                              "for adamw, adam_mini and galore_mini; L2 (added to the gradient) for sgd (default: 0)")
    add_compute_options(compare, products=False)
    add_output_options(compare, Path("runs/compare"))
    compare.add_argument("--results", type=Path, help="work-unit folder for resuming (default: OUT/results)")
    compare.set_defaults(run=run_compare)

    figures = commands.add_parser(
        "figures", help="regenerate every figure (PNG) of the experiments",
        description="Run the experiment groups at --size and write their figures as PNG into --out and "
        "their tables as CSV into --results (where finished work is kept, so a stopped run resumes).",
    )
    figures.add_argument("--size", choices=SIZES, default="medium",
                         help="small (seconds), medium (the committed figures, CPU), paper (GPU / long) (default: "
                              "medium)")
    figures.add_argument("--only", action="append", choices=tuple(FIGURE_GROUPS), metavar="GROUP",
                         help=f"run only this group ({', '.join(FIGURE_GROUPS)}); repeatable")
    figures.add_argument("--results", type=Path, help="work-unit and table folder (default: OUT/results)")
    figures.add_argument("--device", default="cpu",
                         help="cpu, cuda, cuda:1, ...: where spectra, Hessian maps and training runs compute; "
                         "finished spectra and maps resume on any device, training runs are kept per device "
                         "(default: cpu)")
    add_output_options(figures, Path("figures"), what="folder of the PNG files")
    figures.set_defaults(run=run_figures)

    table1 = commands.add_parser(
        "table1", help="the papers' Table 1 at their sizes: JS0 of ResNet18, VGG16, ViT-base, BERT-base, GPT-2-small",
        description="JS0 at initialisation of the papers' five models (4 sampled layers plus embeddings and head, "
        "100 Lanczos steps x 10 probes, one synthetic batch of the real input shapes): the JS0 table, whether the "
        "papers' orderings hold, the JS heatmaps and the papers' Figure 3. --size paper is for a GPU (about 10 "
        "minutes on one H200); small and medium run the same families at CPU sizes.",
    )
    table1.add_argument("--size", choices=SIZES, default="paper",
                        help="paper (the published sizes; a GPU), medium (CPU minutes) or small (seconds) (default: "
                             "paper)")
    table1.add_argument("--model", action="append", metavar="NAME",
                        help="only this model (ResNet18, VGG16, ViT-base, BERT-base, GPT-2-small); repeatable "
                             "(default: all five, in that order)")
    table1.add_argument("--budget", type=float, metavar="SECONDS",
                        help="measure the models in order until this many seconds are spent; the table says which "
                             "finished (default: no limit)")
    table1.add_argument("--steps", type=int, help="Lanczos steps (default: the size's; 100 at paper size)")
    table1.add_argument("--probes", type=int, help="probes per block (default: the size's; 10 at paper size)")
    group = add_compute_options(table1, products=False)
    group.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                       help="precision of the products (default: auto: float32 on CUDA, float64 on the CPU)")
    add_output_options(table1, Path("runs/table1"), what="folder of the tables and figures")
    table1.add_argument("--results", type=Path, help="work-unit folder for resuming (default: OUT/results)")
    table1.set_defaults(run=run_table1)


def _resumable(default_results: Callable[[argparse.Namespace], Path]):
    """Decorate a runner that keeps its finished work units under ``--results``: the runner finds
    ``args.results`` filled in (``default_results(args)`` when not given), and Ctrl-C ends it with one
    line naming that folder and how to resume, exit code 130, instead of a traceback. ``--out`` and
    ``--results`` are checked to be folders (or missing) before any work, and ``--out`` is held while the
    runner runs: a second run into the same folder is refused (exit code 2)."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        interruptible = exit_on_interrupt(
            lambda args: f"finished units are kept in {args.results}; rerun the same command to resume")(run)

        @functools.wraps(run)
        def run_resumably(args: argparse.Namespace) -> int:
            check_output_folder(args.out)
            if args.results is None:
                args.results = default_results(args)
            check_output_folder(args.results, "--results")
            with hold_output(args.out):
                return interruptible(args)

        return run_resumably

    return wrap


def _lr_grids(pairs: list[str]) -> dict[str, tuple[float, ...]]:
    """The ``--lr NAME=LR[,LR...]`` options as {optimizer: rates}. Malformed options, rates that are not
    finite and positive, a rate listed twice and an optimizer given twice are errors."""
    grids = {}
    for pair in pairs:
        name, sep, values = pair.partition("=")
        try:
            grid = tuple(float(v) for v in values.split(","))
        except ValueError:
            grid = ()
        if not sep or not name or not grid or not all(math.isfinite(lr) and lr > 0 for lr in grid):
            raise ValueError(f"--lr expects NAME=LR[,LR...] with finite positive rates, got {pair!r}")
        if len(set(grid)) != len(grid):
            raise ValueError(f"--lr {pair}: a rate is listed twice (it would train the same runs twice); list each "
                             "once")
        if name in grids:
            raise ValueError(f"--lr given twice for {name}: list all its rates in one option, "
                             f"e.g. --lr {name}=1e-3,3e-3")
        grids[name] = grid
    return grids


@_resumable(lambda args: args.out / "results")
def run_compare(args: argparse.Namespace) -> int:
    from analysis import format_table, save_figure
    from analysis.experiments.comparison import (
        ComparisonConfig,
        comparison_experiment,
        comparison_summary,
        plot_loss_curves,
        plot_lr_sweep,
        plot_state_memory,
    )
    from optim.choices import PARTITIONED

    from ..guards import check_device

    check_device(args.device)
    preset = ComparisonConfig.preset(args.size, model=args.model)
    grids = _lr_grids(args.lr)
    chosen = args.optimizer or list(preset.lrs)
    extra = sorted(set(grids) - set(chosen))
    if extra:
        raise ValueError(f"--lr given for {extra}, which are not among the optimizers {chosen}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be finite and >= 0, got {args.weight_decay}")
    changes = {"lrs": {opt: grids.get(opt, preset.lrs[opt]) for opt in chosen},
               "overrides": {**preset.overrides, **parse_overrides(args.set)}, "data": args.data,
               "partition": args.partition, "weight_decay": args.weight_decay, "device": args.device}
    for flag, field, value in (("--steps", "steps", args.steps), ("--seeds", "seeds", args.seeds),
                               ("--batch-size", "batch_size", args.batch_size),
                               ("--val-batches", "val_batches", args.val_batches)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
            changes[field] = tuple(range(value)) if field == "seeds" else value
    if args.partition != "default" and not set(PARTITIONED) & set(chosen):
        raise ValueError(f"--partition {args.partition}: only {' and '.join(PARTITIONED)} take a partition, and the "
                         f"chosen optimizers ({', '.join(chosen)}) include neither; add --optimizer adam_mini "
                         "or drop --partition")
    if args.partition not in ("default", "derived") and not Path(args.partition).exists():
        raise FileNotFoundError(f"--partition {args.partition}: no such file (or use 'default' / 'derived')")
    config = ComparisonConfig.preset(args.size, model=args.model, **changes)

    runs, curves = comparison_experiment(config, out=args.results, progress=not args.no_progress)
    summary = comparison_summary(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out / "runs.csv", index=False)
    curves.to_csv(args.out / "curves.csv", index=False)
    summary.to_csv(args.out / "summary.csv", index=False)
    save_figure(plot_loss_curves(curves, summary, title=f"{args.model}: training loss"), args.out / "loss_curves.png")
    save_figure(plot_lr_sweep(runs, title=f"{args.model}: learning-rate sweep"), args.out / "lr_sweep.png")
    save_figure(plot_state_memory(summary, title=f"{args.model}: optimizer state"), args.out / "state_memory.png")
    print(f"\n{args.model}: best learning rate per optimizer ({config.steps} steps, {len(config.seeds)} seed(s))")
    print(format_table(summary))
    _note_bad_runs(runs, curves)
    print(f"wrote {args.out}/(runs.csv, curves.csv, summary.csv, loss_curves.png, lr_sweep.png, state_memory.png)")
    return 0


def _note_bad_runs(runs, curves) -> None:
    """One line naming the runs that diverged (a loss stopped being finite) or ended unstable (final
    training loss above UNSTABLE_FACTOR x the first step's), if any: the summary only counts them."""
    import sys

    from analysis.experiments.training import UNSTABLE_FACTOR

    first = curves[curves["step"] == 0].set_index(["optimizer", "lr", "seed"])["loss"]
    listed = [f"{run.optimizer} lr {run.lr:g} seed {run.seed} "
              + ("(diverged)" if run.diverged else f"({first[run.optimizer, run.lr, run.seed]:.3g} -> "
                                                   f"{run.train_loss:.3g})")
              for run in runs.itertuples() if run.diverged or run.unstable]
    if listed:
        print(f"note: {len(listed)} of {len(runs)} runs diverged or ended unstable (final training loss above "
              f"{UNSTABLE_FACTOR:g}x the first step's; 'diverged' and 'unstable' in runs.csv and summary.csv): "
              f"{', '.join(listed[:8])}{' ...' if len(listed) > 8 else ''}", file=sys.stderr)


@_resumable(lambda args: args.out / "results")
def run_figures(args: argparse.Namespace) -> int:
    from analysis import format_table, save_figure
    from analysis.experiments.groups import FIGURE_GROUPS, run_group
    from analysis.experiments.store import atomic_write_text

    from ..guards import check_device

    check_device(args.device)
    args.results.mkdir(parents=True, exist_ok=True)
    # the manifest lists each group's figures from its latest run, so groups run one --only at a time add up
    manifest_path = args.results / "figures.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("size") != args.size or "groups" not in manifest:
        manifest = {"size": args.size, "groups": {}}
    written = 0
    for name in args.only or list(FIGURE_GROUPS):
        group = run_group(name, args.size, args.results, progress=not args.no_progress, device=args.device)
        for stem, frame in group.tables.items():
            frame.to_csv(args.results / f"{stem}.csv", index=False)
            if not stem.endswith("_runs"):
                print(f"\n{name}: {stem}\n{format_table(frame)}")
        manifest["groups"][name] = [str(save_figure(fig, args.out / f"{stem}.png"))
                                    for stem, fig in group.figures.items()]
        written += len(group.figures)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")  # read back by the next run
    print(f"\nwrote {written} figures to {args.out}/ and the tables to {args.results}/")
    return 0


@_resumable(lambda args: args.out / "results")
def run_table1(args: argparse.Namespace) -> int:
    from analysis import format_table, save_figure
    from analysis.experiments.table1 import Table1Config, table1_experiment, table1_outputs

    from ..guards import check_device

    check_device(args.device)
    changes = {"device": args.device, "dtype": args.dtype}
    for flag, field, value in (("--steps", "steps", args.steps), ("--probes", "probes", args.probes)):
        if value is not None:
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
            changes[field] = value
    if args.budget is not None and not args.budget > 0:
        raise ValueError(f"--budget must be a positive number of seconds, got {args.budget}")
    config = Table1Config.preset(args.size, models=tuple(args.model) if args.model else None, **changes)
    spectra, unfinished = table1_experiment(config, out=args.results, progress=not args.no_progress,
                                            budget_s=args.budget)
    if unfinished:
        print(f"\nthe --budget of {args.budget:g} s ran out before {', '.join(unfinished)} finished; rerun the same "
              f"command to resume (the finished models are kept in {args.results})")
    if not spectra:
        return 0
    tables, figures = table1_outputs(spectra, config)
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, frame in tables.items():
        frame.to_csv(args.out / f"{stem}.csv", index=False)
    for stem, figure in figures.items():
        save_figure(figure, args.out / f"{stem}.png")
    print(f"\nTable 1 ({args.size} size, {config.steps} Lanczos steps x {config.probes} probes, {config.layers} "
          f"sampled layers)\n{format_table(tables['table1'])}\n\nthe papers' orderings\n"
          f"{format_table(tables['table1_orderings'])}")
    print(f"wrote {args.out}/(table1.csv, table1_orderings.csv and {len(figures)} figures)")
    return 0
