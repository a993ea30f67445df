"""Command line: ``hessian-blocks spectrum`` and ``hessian-blocks js``.

Every command prints a table, writes CSV / JSON / NPZ / PNG files into ``--out``, shows a
progress bar with an ETA on long work, and gives the same numbers for the same ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .blocks import Partition, sample_layers, select_blocks
from .guards import HessianSetupError
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
    group = measure.add_argument_group("output")
    group.add_argument("--out", type=Path, default=Path("runs/latest"), help="output folder (default: runs/latest)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")

    density = argparse.ArgumentParser(add_help=False)
    group = density.add_argument_group("density")
    group.add_argument("--sigma2", type=float, default=1e-5, help="Gaussian broadening variance on the eigenvalue axis (default: 1e-5)")
    group.add_argument("--grid-points", type=int, default=50_000, help="points of the common density grid (default: 50000)")

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
    return parser


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


def measure_model(name: str, args: argparse.Namespace) -> SpectrumResult:
    """Build the model and data named on the command line and run SLQ on the selected blocks."""
    from tqdm.auto import tqdm

    from .data import make_batches
    from .models import build_model

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--probes", args.probes), ("--grid-points", args.grid_points)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.blocks and args.sample_layers:
        raise ValueError("use either --blocks or --sample-layers, not both")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    dtype = DTYPES[args.dtype]
    spec = build_model(name, seed=args.seed, **_overrides(args.set))
    batches = make_batches(spec, args.data, batch_size=args.batch_size, n_batches=args.batches, seed=args.seed, dtype=dtype)
    partition = Partition.load(args.partition, spec.model) if args.partition else Partition.per_tensor(spec.model)
    blocks = partition.blocks
    if args.blocks:
        blocks = select_blocks(blocks, args.blocks)
    elif args.sample_layers:
        blocks = sample_layers(blocks, args.sample_layers)
    hessian = BlockHessian(spec.model, spec.loss_fn, batches, blocks, dtype=dtype, device=args.device, strategy=args.strategy)
    settings = {"model": name, "overrides": args.set, "data": args.data, "batch_size": args.batch_size,
                "partition": str(args.partition) if args.partition else "per-tensor"}
    started = time.perf_counter()
    with tqdm(total=total_steps(args.steps, args.full_model), desc=f"{name}: SLQ on {len(blocks)} blocks",
              unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        spectrum = block_spectra(
            hessian, steps=args.steps, probes=args.probes, probe_kind=args.probe_kind, seed=args.seed,
            reorthogonalize=args.reorthogonalize, full_model=args.full_model, progress=bar.update, settings=settings,
        )
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


def _folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


if __name__ == "__main__":
    sys.exit(main())
