"""Command line: ``hessian-blocks spectrum`` and ``hessian-blocks js``.

Every command prints a table, writes CSV / JSON / NPZ / PNG files into ``--out``, shows a
progress bar with an ETA on long work, and gives the same numbers for the same ``--seed``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .blocks import Partition, sample_layers, select_blocks
from .distributed import (
    DataParallelBlockHessian, device_for_rank, get_world_size, is_main_process, process_group_from_env, shard_batches,
    split_block_spectra,
)
from .guards import HessianSetupError, check_device
from .hvp import STRATEGIES, BlockHessian
from .results import SpectrumResult
from .slq import block_spectra, total_steps

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, HessianSetupError) as err:
        print(f"hessian-blocks {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from .data import DATA_SOURCES
    from .models import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog="hessian-blocks",
        description="Blockwise Hessian spectra (SLQ) and Jensen-Shannon block heterogeneity.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    measure = argparse.ArgumentParser(add_help=False)
    group = measure.add_argument_group("model and data")
    group.add_argument("--model", action="append", metavar="NAME",
                       help=f"bundled model ({', '.join(MODEL_NAMES)}) or 'package.module:factory'; repeat to compare models")
    group.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a model config field, e.g. --set n_layer=2 (applies to every --model)")
    group.add_argument("--data", default="auto",
                       help=f"data source: auto, {', '.join(DATA_SOURCES)}, or a .pt/.npz/.txt file (default: auto)")
    group.add_argument("--batches", type=int, default=1, help="number of batches in the loss (default: 1)")
    group.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    group = measure.add_argument_group("blocks")
    group.add_argument("--partition", type=Path, help="partition JSON file (default: one block per parameter tensor)")
    group.add_argument("--blocks", action="append", default=[], metavar="GLOB",
                       help="keep blocks whose block or parameter name matches GLOB (repeatable)")
    group.add_argument("--sample-layers", type=int, metavar="N",
                       help="keep the matrix blocks of N evenly spaced layers plus embeddings/head (the papers' sample)")
    group = measure.add_argument_group("SLQ")
    group.add_argument("--steps", type=int, default=100, help="Lanczos steps per block and probe (default: 100)")
    group.add_argument("--probes", type=int, default=10, help="random probe vectors per block (default: 10)")
    group.add_argument("--probe-kind", choices=("rademacher", "gaussian"), default="rademacher")
    group.add_argument("--reorthogonalize", action="store_true", help="full reorthogonalisation (default: plain recurrence, as the papers)")
    group.add_argument("--full-model", action="store_true", help="also estimate the full-model spectrum")
    group.add_argument("--seed", type=int, default=0, help="seed for the model init, the data and the probes (default: 0)")
    group = measure.add_argument_group("compute")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="precision of the products (default: float64)")
    group.add_argument("--strategy", choices=STRATEGIES, default="auto", help="block Hessian-vector product strategy (default: auto)")
    group.add_argument("--split-blocks", action="store_true",
                       help="under torchrun: give each process a share of the blocks and all the data "
                            "(default: a share of the batches and all the blocks)")
    group = measure.add_argument_group("output")
    group.add_argument("--out", type=Path, default=Path("runs/latest"), help="output folder (default: runs/latest)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")

    density = argparse.ArgumentParser(add_help=False)
    group = density.add_argument_group("density")
    group.add_argument("--sigma2", type=float, default=1e-5, help="Gaussian broadening variance on the eigenvalue axis (default: 1e-5)")
    group.add_argument("--grid-points", type=int, default=None,
                       help="points of the common density grid (default: 50000, more where the eigenvalues span a range "
                            "so wide that the Gaussians would fall between grid points)")

    spectrum = commands.add_parser(
        "spectrum", parents=[measure, density], help="per-block spectral densities (SLQ)",
        description="Estimate the Hessian spectral density of every block with SLQ and save it.",
    )
    spectrum.set_defaults(run=run_spectrum)

    js = commands.add_parser(
        "js", parents=[measure, density], help="Jensen-Shannon distances between block spectra (JS0)",
        description="Block spectra, their pairwise Jensen-Shannon distances and JS0 (mean over pairs). "
        "With several --model options, a JS0 table compares the models.",
    )
    js.add_argument("--from-results", type=Path, action="append", default=[], metavar="NPZ",
                    help="reuse a saved spectrum.npz instead of measuring (repeatable)")
    js.set_defaults(run=run_js)

    add_partition_command(commands)

    from analysis.commands import add_commands  # compare, figures (the experiment layer)

    add_commands(commands)
    return parser


def _torchrun_aware(run):
    """Under torchrun every process measures (its share of the work); only rank 0 reports and writes files.
    ``--device`` is checked first, before a process group is set up on it."""

    @functools.wraps(run)
    def run_on_every_rank(args: argparse.Namespace) -> int:
        check_device(args.device)
        with process_group_from_env(args.device):
            if is_main_process():
                return run(args)
            for name in args.model or []:
                measure_model(name, args)
            return 0

    return run_on_every_rank


@_torchrun_aware
def run_spectrum(args: argparse.Namespace) -> int:
    from analysis import block_table, format_table, plot_block_densities, save_figure

    for label, spectrum, folder in _measured(args):
        density = spectrum.density(sigma2=args.sigma2, n_points=args.grid_points)
        table = block_table(spectrum)
        table.to_csv(folder / "blocks.csv", index=False)
        density.save(folder / "density.npz")
        save_figure(plot_block_densities(density, blocks=_panel_selection(spectrum), title=label), folder / "densities.png")
        print(f"\n{label}: {len(spectrum.names)} blocks\n{format_table(table)}")
        print(f"wrote {folder}/(spectrum.npz, density.npz, blocks.csv, densities.png)")
    return 0


@_torchrun_aware
def run_js(args: argparse.Namespace) -> int:
    from analysis import (
        block_table, format_table, js0, js0_table, js_matrix, plot_block_densities, plot_js_heatmap, save_figure,
    )

    summary = {}
    for label, spectrum, folder in _measured(args):
        if len(spectrum.names) < 2:
            raise ValueError(f"{label}: JS distances need at least two blocks, the selection has {len(spectrum.names)}")
        density = spectrum.density(sigma2=args.sigma2, n_points=args.grid_points)
        matrix = js_matrix(density.densities)
        table = block_table(spectrum, matrix)
        summary[label] = js0(matrix)
        table.to_csv(folder / "blocks.csv", index=False)
        _matrix_frame(matrix, spectrum.names).to_csv(folder / "js_matrix.csv")
        density.save(folder / "density.npz")
        save_figure(plot_js_heatmap(matrix, spectrum.names, title=f"{label}: JS distance between block spectra"),
                    folder / "js_heatmap.png")
        save_figure(plot_block_densities(density, blocks=_panel_selection(spectrum), title=label), folder / "densities.png")
        (folder / "summary.json").write_text(json.dumps({"model": label, "js0": summary[label], **spectrum.settings}, indent=1) + "\n")
        print(f"\n{label}: {len(spectrum.names)} blocks, JS0 = {summary[label]:.4g}\n{format_table(table)}")
        print(f"wrote {folder}/(spectrum.npz, density.npz, blocks.csv, js_matrix.csv, summary.json, js_heatmap.png, densities.png)")

    order = sorted(summary, key=summary.get)
    table = js0_table(summary, baseline=order[0] if len(summary) > 1 else None)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "js0.csv", index=False)
    print(f"\nJS0 (mean Jensen-Shannon distance between block spectra at initialisation)\n{format_table(table)}")
    print(f"wrote {args.out / 'js0.csv'}")
    return 0


def _measured(args: argparse.Namespace):
    """Yield (label, SpectrumResult, output folder) for every --from-results file and --model."""
    for path in getattr(args, "from_results", []):
        spectrum = SpectrumResult.load(path)
        label = str(spectrum.settings.get("model", Path(path).stem))
        folder = args.out / _folder_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        yield label, spectrum, folder
    if not args.model and not getattr(args, "from_results", []):
        raise ValueError("give at least one --model (or --from-results for js)")
    for name in args.model or []:
        spectrum = measure_model(name, args)
        folder = args.out / _folder_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        spectrum.save(folder / "spectrum.npz")
        yield name, spectrum, folder


def measure_model(name: str, args: argparse.Namespace) -> SpectrumResult | None:
    """Build the model and data named on the command line and run SLQ on the selected blocks.

    Under torchrun each process takes its share of the batches (or, with ``--split-blocks``, of the
    blocks); rank 0 gets the whole result, other ranks may get None.
    """
    from tqdm.auto import tqdm

    from .data import make_batches
    from .models import build_model

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--probes", args.probes), ("--grid-points", args.grid_points)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.blocks and args.sample_layers:
        raise ValueError("use either --blocks or --sample-layers, not both")
    if args.split_blocks and args.full_model:
        raise ValueError("--full-model needs every block in one process: drop --split-blocks (the default splits the batches)")
    dtype, device, world_size = DTYPES[args.dtype], device_for_rank(args.device), get_world_size()
    spec = build_model(name, seed=args.seed, **_overrides(args.set))
    batches = make_batches(spec, args.data, batch_size=args.batch_size, n_batches=args.batches, seed=args.seed, dtype=dtype)
    partition = Partition.load(args.partition, spec.model) if args.partition else Partition.per_tensor(spec.model)
    blocks = partition.blocks
    if args.blocks:
        blocks = select_blocks(blocks, args.blocks)
    elif args.sample_layers:
        blocks = sample_layers(blocks, args.sample_layers)
    settings = {"model": name, "overrides": args.set, "data": args.data, "batch_size": args.batch_size,
                "partition": str(args.partition) if args.partition else "per-tensor", "processes": world_size}
    slq = dict(steps=args.steps, probes=args.probes, probe_kind=args.probe_kind, seed=args.seed,
               reorthogonalize=args.reorthogonalize, settings=settings)
    hessian_options = dict(dtype=dtype, device=device, strategy=args.strategy)
    started = time.perf_counter()
    with tqdm(total=total_steps(args.steps, args.full_model), desc=f"{name}: SLQ on {len(blocks)} blocks",
              unit="step", disable=args.no_progress or not is_main_process(), file=sys.stderr) as bar:
        if args.split_blocks:
            spectrum = split_block_spectra(spec.model, spec.loss_fn, batches, blocks, progress=bar.update, **slq, **hessian_options)
        elif world_size > 1:
            hessian = DataParallelBlockHessian(spec.model, spec.loss_fn, shard_batches(batches), blocks, **hessian_options)
            spectrum = block_spectra(hessian, full_model=args.full_model, progress=bar.update, **slq)
        else:
            hessian = BlockHessian(spec.model, spec.loss_fn, batches, blocks, **hessian_options)
            spectrum = block_spectra(hessian, full_model=args.full_model, progress=bar.update, **slq)
    if spectrum is not None:
        spectrum.settings["seconds"] = round(time.perf_counter() - started, 3)
    return spectrum


def _overrides(pairs: Sequence[str]) -> dict:
    overrides = {}
    for pair in pairs:
        field, sep, text = pair.partition("=")
        if not sep or not field:
            raise ValueError(f"--set expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[field] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field] = text
    return overrides


def _panel_selection(spectrum: SpectrumResult, limit: int = 16) -> list[int] | None:
    """At most ``limit`` evenly spaced blocks for the density figure."""
    count = len(spectrum.names)
    if count <= limit:
        return None
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _matrix_frame(matrix, names):
    import pandas as pd

    return pd.DataFrame(matrix, index=names, columns=names)


def add_partition_command(commands) -> None:
    """``hessian-blocks partition``: derive an Adam-mini partition file from the measured Hessian."""
    from .data import DATA_SOURCES
    from .partitioner import DEFAULT_CONTRAST, DEFAULT_MASS_THRESHOLD, DEFAULT_MAX_RUNS, DEFAULT_MAX_SPREAD, DEFAULT_THRESHOLD

    command = commands.add_parser(
        "partition", help="derive Adam-mini's blocks from the measured Hessian structure",
        description="Measure how the slices (rows, columns, heads, tokens) of every parameter tensor couple "
        "through the Hessian and write the partition file that optim.AdamMini(partition=...) reads.",
    )
    command.add_argument("--model", required=True, metavar="NAME", help="bundled model or 'package.module:factory'")
    command.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    command.add_argument("--small", action="append", default=[], metavar="FIELD=VALUE",
                         help="measure a smaller instance built with these extra overrides (e.g. --small n_layer=2 "
                              "--small n_embd=128, same head size) and map its rules to the full model")
    command.add_argument("--data", default="auto", help=f"auto, {', '.join(DATA_SOURCES)}, or a .pt/.npz/.txt file")
    command.add_argument("--batches", type=int, default=1, help="batches in the loss (default: 1)")
    command.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    command.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                         help=f"coupling between blocks above which an axis stays one block (default: {DEFAULT_THRESHOLD})")
    command.add_argument("--contrast", type=float, default=DEFAULT_CONTRAST,
                         help=f"distinct groups couple inside this many times more than to their neighbours; the finest grouping "
                              f"wins that cuts no distinct group at links above threshold/contrast (default: {DEFAULT_CONTRAST})")
    command.add_argument("--max-runs", type=int, choices=(1, 2), default=DEFAULT_MAX_RUNS,
                         help=f"1: equal groups only; 2: also single slices before or after them (default: {DEFAULT_MAX_RUNS})")
    command.add_argument("--max-spread", type=float, default=DEFAULT_MAX_SPREAD,
                         help=f"near-diagonal Hessians with an even diagonal (90th/10th percentile at most this) are one "
                              f"block (default: {DEFAULT_MAX_SPREAD})")
    command.add_argument("--mass-threshold", type=float, default=DEFAULT_MASS_THRESHOLD,
                         help=f"largest off-diagonal mass fraction of a near-diagonal Hessian ('whole' or 'elements' "
                              f"instead of slices; default: {DEFAULT_MASS_THRESHOLD})")
    command.add_argument("--method", choices=("auto", "dense", "probes"), default="auto", help="how to measure (default: auto)")
    command.add_argument("--probes", type=int, default=4, help="Rademacher probes per slice (default: 4)")
    command.add_argument("--dense-max", type=int, default=1024, help="largest tensor measured densely (default: 1024)")
    command.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the probes (default: 0)")
    command.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    command.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="precision of the products (default: float64)")
    command.add_argument("--strategy", choices=STRATEGIES, default="auto", help="Hessian-vector product strategy")
    command.add_argument("--out", type=Path, default=Path("partition.json"), help="partition file to write (default: partition.json)")
    command.add_argument("--couplings", type=Path, metavar="NPZ",
                         help="keep the measured couplings in this file: read when it exists (deciding again with other "
                              "--threshold/--contrast/... measures nothing), else measured and written; refused when it was "
                              "measured with another model, data or measurement setting")
    command.add_argument("--heatmap", action="append", default=[], metavar="PARAM",
                         help="also draw the measured Hessian of this tensor with its derived blocks (PNG next to --out; repeatable)")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.set_defaults(run=run_partition)


def run_partition(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from .data import make_batches
    from .models import build_model
    from .coupling import load_couplings, measure_coupling, save_couplings
    from .partitioner import check_settings, decide_rule, map_rules

    check_device(args.device)
    decision = dict(threshold=args.threshold, contrast=args.contrast, max_runs=args.max_runs,
                    mass_threshold=args.mass_threshold, max_spread=args.max_spread)
    check_settings(**decision)
    dtype = DTYPES[args.dtype]
    overrides = _overrides(args.set)
    spec = build_model(args.model, seed=args.seed, **overrides)
    measured = build_model(args.model, seed=args.seed, **{**overrides, **_overrides(args.small)}) if args.small else spec
    batches = make_batches(measured, args.data, batch_size=args.batch_size, n_batches=args.batches, seed=args.seed, dtype=dtype)
    shapes = {name: tuple(p.shape) for name, p in measured.model.named_parameters() if p.requires_grad}
    measurement = {key: getattr(args, key) for key in ("model", "set", "small", "data", "batches", "batch_size", "method",
                                                       "probes", "dense_max", "seed", "dtype")}
    if args.couplings is not None and args.couplings.exists():
        couplings = load_couplings(args.couplings, settings=measurement)
        if {name: c.shape for name, c in couplings.items()} != shapes:
            raise ValueError(f"{args.couplings} does not hold the tensors of this model; delete it or give another path")
        print(f"couplings read from {args.couplings} (nothing measured)", file=sys.stderr)
    else:
        with tqdm(total=len(shapes), desc=f"{args.model}: measuring {len(shapes)} tensors", unit="tensor",
                  disable=args.no_progress, file=sys.stderr) as bar:
            couplings = measure_coupling(
                measured.model, measured.loss_fn, batches, method=args.method, probes=args.probes, dense_max=args.dense_max,
                seed=args.seed, dtype=dtype, device=args.device, strategy=args.strategy, progress=lambda _: bar.update(1),
            )
        if args.couplings is not None:
            save_couplings(couplings, args.couplings, settings=measurement)
    decisions = [decide_rule(c, **decision) for c in couplings.values()]
    rules = [d.rule for d in decisions]
    if args.small:
        rules = map_rules(measured.model, rules, spec.model)
    partition = Partition.from_rules(spec.model, rules)
    partition.save(args.out)
    for param in args.heatmap:
        from analysis import save_figure
        from analysis.hessian_map import hessian_map, plot_hessian_blocks

        measured_partition = Partition.from_rules(measured.model, [d.rule for d in decisions])
        hmap = hessian_map(measured.model, measured.loss_fn, batches, measured_partition, params=[param],
                           dtype=dtype, device=args.device, strategy=args.strategy)
        path = args.out.with_name(f"{args.out.stem}_{_folder_name(param)}.png")
        save_figure(plot_hessian_blocks(hmap.matrix, hmap.boundaries, title=f"{param}: Hessian and derived blocks"), path)
        print(f"wrote {path}")
    table = pd.DataFrame({
        "parameter": [d.rule.param for d in decisions],
        "shape": ["x".join(map(str, d.shape)) for d in decisions],
        "split": [d.summary for d in decisions],
        "evidence": [d.evidence for d in decisions],
    })
    measured_on = f" (measured on the smaller instance {' '.join(args.small)})" if args.small else ""
    print(f"\n{args.model}: {len(partition.blocks)} blocks over {len(rules)} tensors{measured_on}")
    print(table.to_string(index=False, max_colwidth=90))
    print(f"wrote {args.out}")
    return 0


def _folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


if __name__ == "__main__":
    sys.exit(main())
