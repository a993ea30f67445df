"""``hessian-blocks spectrum`` and ``hessian-blocks js``: block spectra by SLQ, and the Jensen-Shannon
distances between them."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..files import PARTIAL_SUFFIX, atomic_write_text, hold_output, staged_folder
from .options import (
    add_compute_options,
    add_model_options,
    add_output_options,
    check_output_folder,
    exit_on_interrupt,
    folder_name,
    note_eval_mode,
    parse_overrides,
    torch_dtype,
)

if TYPE_CHECKING:
    from ..results import DensityResult, SpectrumResult

__all__ = ["add_commands", "measure_model", "run_js", "run_spectrum"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``spectrum`` and ``js``."""
    measure = argparse.ArgumentParser(add_help=False)
    add_model_options(measure, repeatable=True)
    group = measure.add_argument_group("blocks")
    group.add_argument("--partition", type=Path, help="partition JSON file (default: one block per parameter tensor)")
    group.add_argument("--blocks", action="append", default=[], metavar="GLOB",
                       help="keep blocks whose block or parameter name matches GLOB (repeatable)")
    group.add_argument("--sample-layers", type=int, metavar="N",
                       help="keep the matrix blocks of N evenly spaced layers plus embeddings/head (the papers' "
                            "sample)")
    group = measure.add_argument_group("SLQ")
    group.add_argument("--steps", type=int, default=100, help="Lanczos steps per block and probe (default: 100)")
    group.add_argument("--probes", type=int, default=10, help="random probe vectors per block (default: 10)")
    group.add_argument("--probe-kind", choices=("rademacher", "gaussian"), default="rademacher")
    group.add_argument("--reorthogonalize", action="store_true",
                       help="full reorthogonalisation (default: plain recurrence, as the papers)")
    group.add_argument("--full-model", action="store_true", help="also estimate the full-model spectrum")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for the model init, the data and the probes (default: 0)")
    group = add_compute_options(measure)
    group.add_argument("--split-blocks", action="store_true",
                       help="under torchrun: give each process a share of the blocks and all the data "
                            "(default: a share of the batches and all the blocks)")
    add_output_options(measure, Path("runs/latest"))

    density = argparse.ArgumentParser(add_help=False)
    group = density.add_argument_group("density")
    group.add_argument("--sigma2", type=float, default=1e-5,
                       help="Gaussian broadening variance on the eigenvalue axis (default: 1e-5)")
    group.add_argument("--grid-points", type=int, default=None,
                       help="points of the common density grid (default: 50000, more where the eigenvalues span "
                            "a range so wide that the Gaussians would fall between grid points)")
    group.add_argument("--rescale-rank", type=int, metavar="K",
                       help="divide each block's eigenvalues by its K-th largest before the densities, so that "
                            "blocks of very different scales are compared by shape (the papers' figures use 10; "
                            "default: no rescaling)")

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
    js.add_argument("--top", type=int, metavar="N",
                    help="print only the N blocks with the largest mean JS distance per model (blocks.csv keeps "
                         "every block; default: print every block)")
    js.set_defaults(run=run_js)


def _torchrun_aware(run):
    """Under torchrun every process measures (its share of the work); only rank 0 reports and writes files.
    ``--device`` and ``--out`` are checked first, before a process group is set up; Ctrl-C ends the
    command with one line saying what it left (exit code 130). Rank 0 holds ``--out`` while it runs: a second
    run into the same folder is refused (exit code 2)."""

    @exit_on_interrupt(lambda args: f"every model finished before it has all its files in {args.out}/MODEL; the "
                                    "files of the model being written, if any, are in "
                                    f"{args.out}/MODEL.{os.getpid()}{PARTIAL_SUFFIX}; rerun the same command to "
                                    "measure again")
    @functools.wraps(run)
    def run_on_every_rank(args: argparse.Namespace) -> int:
        from ..distributed import is_main_process, process_group_from_env
        from ..guards import check_device

        check_device(args.device)
        check_output_folder(args.out)
        # rank 0 (torchrun's RANK, before the group forms: a refusal ends the run before any rank measures)
        holding = hold_output(args.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
        with holding, process_group_from_env(args.device):
            if is_main_process():
                return run(args)
            for name in args.model or []:
                measure_model(name, args)
            return 0

    return run_on_every_rank


@_torchrun_aware
def run_spectrum(args: argparse.Namespace) -> int:
    from analysis import block_table, format_table, plot_block_densities, save_figure

    for label, spectrum, measured in _spectra(args):
        with staged_folder(args.out / folder_name(label)) as staged:
            spectrum.save(staged / "spectrum.npz")
            density, compared, _ = _density(label, spectrum, args, staged / "spectrum.npz" if measured else None,
                                            least=1)
            table = block_table(spectrum)
            table.to_csv(staged / "blocks.csv", index=False)
            density.save(staged / "density.npz")
            save_figure(plot_block_densities(density, blocks=_panel_selection(compared), title=label),
                        staged / "densities.png")
        print(f"\n{label}: {len(spectrum.names)} blocks\n{format_table(table)}")
        print(f"wrote {args.out / folder_name(label)}/(spectrum.npz, density.npz, blocks.csv, densities.png)")
    return 0


@_torchrun_aware
def run_js(args: argparse.Namespace) -> int:
    from analysis import (
        block_table,
        format_table,
        js0,
        js0_table,
        js_matrix,
        plot_block_densities,
        plot_js_heatmap,
        save_figure,
    )

    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    summary = {}
    for label, spectrum, measured in _spectra(args):
        if len(spectrum.names) < 2:
            raise ValueError(f"{label}: JS distances need at least two blocks, the selection has {len(spectrum.names)}")
        with staged_folder(args.out / folder_name(label)) as staged:
            spectrum.save(staged / "spectrum.npz")
            density, compared, left_out = _density(label, spectrum, args,
                                                   staged / "spectrum.npz" if measured else None, least=2)
            matrix = js_matrix(density.densities)
            table = block_table(compared, matrix)
            if left_out:  # every block in blocks.csv; those left out have no mean JS distance
                table = block_table(spectrum).merge(table[["block", "mean_js"]], on="block", how="left")
            summary[label] = js0(matrix)
            record = {"model": label, "js0": summary[label], "blocks": len(spectrum.names),
                      "blocks_compared": len(compared.names), **_density_settings(density, args),
                      "rescale_left_out": left_out, **spectrum.settings}
            table.to_csv(staged / "blocks.csv", index=False)
            _matrix_frame(matrix, compared.names).to_csv(staged / "js_matrix.csv")
            density.save(staged / "density.npz")
            save_figure(plot_js_heatmap(matrix, compared.names, title=f"{label}: JS distance between block spectra"),
                        staged / "js_heatmap.png")
            save_figure(plot_block_densities(density, blocks=_panel_selection(compared), title=label),
                        staged / "densities.png")
            (staged / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
        shown, which = table, ""
        if args.top is not None and args.top < len(table):
            shown = table.nlargest(args.top, "mean_js")
            which = f"; the {args.top} most heterogeneous (largest mean JS distance), all in blocks.csv"
        counted = (f"{len(spectrum.names)} blocks" if not left_out else
                   f"{len(compared.names)} of {len(spectrum.names)} blocks compared (rescale_left_out in summary.json)")
        print(f"\n{label}: {counted}, JS0 = {summary[label]:.4g}{which}\n{format_table(shown)}")
        print(f"wrote {args.out / folder_name(label)}/(spectrum.npz, density.npz, blocks.csv, js_matrix.csv, "
              "summary.json, js_heatmap.png, densities.png)")

    order = sorted(summary, key=summary.get)
    table = js0_table(summary, baseline=order[0] if len(summary) > 1 else None)
    atomic_write_text(args.out / "js0.csv", table.to_csv(index=False))
    print(f"\nJS0 (mean Jensen-Shannon distance between block spectra at initialisation)\n{format_table(table)}")
    print(f"wrote {args.out / 'js0.csv'}")
    return 0


def _spectra(args: argparse.Namespace):
    """Yield (label, SpectrumResult, measured) for every --from-results file (read whole, so that its
    folder may be rewritten) and every --model (measured when its turn comes)."""
    sources = getattr(args, "from_results", [])
    if not args.model and not sources:
        raise ValueError("give at least one --model (or --from-results for js)")
    if args.rescale_rank is not None and args.rescale_rank < 1:
        raise ValueError(f"--rescale-rank must be >= 1, got {args.rescale_rank}")
    from ..results import SpectrumResult

    for path in sources:
        spectrum = SpectrumResult.load(path)
        yield str(spectrum.settings.get("model", Path(path).stem)), spectrum, False
    for name in args.model or []:
        yield name, measure_model(name, args), True


def _density(label: str, spectrum: SpectrumResult, args: argparse.Namespace, kept: Path | None,
             least: int) -> tuple[DensityResult, SpectrumResult, dict[str, str]]:
    """(densities, the spectrum of the blocks they cover, the blocks left out with why) with the command's
    --sigma2, --grid-points and --rescale-rank. With ``--rescale-rank K``, the blocks that cannot be
    divided by their K-th largest eigenvalue (:meth:`~hessian_blocks.SpectrumResult.unrescalable`) are
    left out with one warning naming them; fewer than ``least`` blocks left is an error. When the
    densities cannot be made, the error says where the measured spectrum is ``kept``, to try other
    settings without measuring."""
    try:
        compared, left_out = _rescalable(label, spectrum, args.rescale_rank, least)
        density = compared.density(sigma2=args.sigma2, n_points=args.grid_points, rescale_rank=args.rescale_rank)
    except ValueError as err:
        if kept is None:
            raise
        raise ValueError(f"{err}. The measured spectrum is kept: hessian-blocks js --from-results {kept} "
                         "(with other density settings) uses it without measuring again") from err
    return density, compared, left_out


def _rescalable(label: str, spectrum: SpectrumResult, rank: int | None,
                least: int) -> tuple[SpectrumResult, dict[str, str]]:
    """(the blocks that ``--rescale-rank`` can divide, those it cannot with why); see :func:`_density`."""
    if rank is None:
        return spectrum, {}
    left_out = spectrum.unrescalable(rank)
    if not left_out:
        return spectrum, {}
    kept = [i for i, name in enumerate(spectrum.names) if name not in left_out]
    listed = ", ".join(f"'{name}' ({why})" for name, why in list(left_out.items())[:6])
    listed += f" and {len(left_out) - 6} more" if len(left_out) > 6 else ""
    if len(kept) < least:
        raise ValueError(f"{label}: --rescale-rank {rank} leaves {len(kept)} of {len(spectrum.names)} blocks that can "
                         f"be divided by their {rank}-th largest eigenvalue, {least} needed ({listed} cannot): give a "
                         "smaller --rescale-rank, select larger blocks (--blocks), or drop --rescale-rank")
    compares = "the densities and JS0 compare" if least > 1 else "the densities show"
    warnings.warn(f"{label}: --rescale-rank {rank} leaves out {len(left_out)} of {len(spectrum.names)} blocks, which "
                  f"cannot be divided by their {rank}-th largest eigenvalue: {listed}; {compares} the other "
                  f"{len(kept)}{' (rescale_left_out in summary.json)' if least > 1 else ''}", stacklevel=3)
    return spectrum.select(kept), left_out


def _density_settings(density: DensityResult, args: argparse.Namespace) -> dict:
    """What the densities (and so JS0) depend on beyond the spectrum, for summary.json."""
    return {"sigma2": density.sigma2, "grid_points": int(density.grid.size),
            "grid_range": [float(density.grid[0]), float(density.grid[-1])], "rescale_rank": args.rescale_rank}


def measure_model(name: str, args: argparse.Namespace) -> SpectrumResult | None:
    """Build the model and data named on the command line and run SLQ on the selected blocks.

    Under torchrun each process takes its share of the batches (or, with ``--split-blocks``, of the
    blocks); rank 0 gets the whole result, other ranks may get None.
    """
    from tqdm.auto import tqdm

    from ..blocks import Partition, sample_layers, select_blocks
    from ..data import make_batches
    from ..distributed import (
        DataParallelBlockHessian,
        device_for_rank,
        get_world_size,
        is_main_process,
        shard_batches,
        split_block_spectra,
    )
    from ..guards import check_batches
    from ..hvp import BlockHessian
    from ..models import build_model
    from ..slq import block_spectra, total_steps

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--probes", args.probes), ("--grid-points", args.grid_points),
                        ("--rescale-rank", args.rescale_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.blocks and args.sample_layers:
        raise ValueError("use either --blocks or --sample-layers, not both")
    if args.split_blocks and args.full_model:
        raise ValueError("--full-model needs every block in one process: drop --split-blocks (the default splits the "
                         "batches)")
    dtype, device, world_size = torch_dtype(args.dtype, args.device), device_for_rank(args.device), get_world_size()
    spec = build_model(name, seed=args.seed, **parse_overrides(args.set))
    if is_main_process():
        note_eval_mode(name, spec.model)
    partition = Partition.load(args.partition, spec.model) if args.partition else Partition.per_tensor(spec.model)
    batches = make_batches(spec, args.data, batch_size=args.batch_size, n_batches=args.batches, seed=args.seed,
                           dtype=dtype)
    check_batches(spec.model, spec.loss_fn, batches, f"{name} on data {args.data}: batch")
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
            spectrum = split_block_spectra(spec.model, spec.loss_fn, batches, blocks, progress=bar.update, **slq,
                                           **hessian_options)
        elif world_size > 1:
            hessian = DataParallelBlockHessian(spec.model, spec.loss_fn, shard_batches(batches), blocks,
                                               **hessian_options)
            spectrum = block_spectra(hessian, full_model=args.full_model, progress=bar.update, **slq)
        else:
            hessian = BlockHessian(spec.model, spec.loss_fn, batches, blocks, **hessian_options)
            spectrum = block_spectra(hessian, full_model=args.full_model, progress=bar.update, **slq)
    if spectrum is not None:
        spectrum.settings["seconds"] = round(time.perf_counter() - started, 3)
    return spectrum


def _panel_selection(spectrum: SpectrumResult, limit: int = 16) -> list[int] | None:
    """At most ``limit`` evenly spaced blocks for the density figure."""
    count = len(spectrum.names)
    if count <= limit:
        return None
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _matrix_frame(matrix, names):
    import pandas as pd

    return pd.DataFrame(matrix, index=names, columns=names)
