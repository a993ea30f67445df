"""``hessian-blocks partition``: Adam-mini's blocks derived from the measured Hessian structure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import (
    add_compute_options,
    add_model_options,
    add_output_options,
    check_output_file,
    folder_name,
    holding_output_file,
    note_eval_mode,
    parse_overrides,
    torch_dtype,
)

__all__ = ["add_commands", "run_partition"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``hessian-blocks partition``: derive an Adam-mini partition file from the measured Hessian."""
    from ..choices import (
        DEFAULT_CONTRAST,
        DEFAULT_MASS_THRESHOLD,
        DEFAULT_MAX_RUNS,
        DEFAULT_MAX_SPREAD,
        DEFAULT_THRESHOLD,
        DENSE_MAX,
        MAX_SLICES,
        METHODS,
    )

    command = commands.add_parser(
        "partition", help="derive Adam-mini's blocks from the measured Hessian structure",
        description="Measure how the slices (rows, columns, heads, tokens) of every parameter tensor couple "
        "through the Hessian and write the partition file that optim.AdamMini(partition=...) reads.",
    )
    add_model_options(command, required=True)
    command.add_argument("--small", action="append", default=[], metavar="FIELD=VALUE|auto",
                         help="measure a smaller instance built with these extra overrides (e.g. --small n_layer=2 "
                              "--small n_embd=128, same head size) and map its rules to the full model; 'auto': "
                              "at most 2 layers, 2 key/value heads, the same head size "
                              "(further FIELD=VALUE apply on top)")
    command.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                         help="coupling between blocks above which an axis stays one block (default: "
                              f"{DEFAULT_THRESHOLD})")
    command.add_argument("--contrast", type=float, default=DEFAULT_CONTRAST,
                         help="distinct groups couple inside this many times more than to their neighbours; the "
                              "finest grouping wins that cuts no distinct group at links above threshold/contrast "
                              f"(evenly coupled heads: threshold/contrast^2; default: {DEFAULT_CONTRAST})")
    command.add_argument("--max-runs", type=int, choices=(1, 2), default=DEFAULT_MAX_RUNS,
                         help="1: equal groups only; 2: also single slices before or after them, and a group "
                              "and single slices repeated per head (GPT-NeoX's interleaved q|k|v; default: "
                              f"{DEFAULT_MAX_RUNS})")
    command.add_argument("--max-spread", type=float, default=DEFAULT_MAX_SPREAD,
                         help="near-diagonal Hessians with an even diagonal (90th/10th percentile at most this) are "
                              "one block, and a group's slices spread their diagonal norms at most this much "
                              f"(default: {DEFAULT_MAX_SPREAD})")
    command.add_argument("--mass-threshold", type=float, default=DEFAULT_MASS_THRESHOLD,
                         help=f"largest off-diagonal mass fraction of a near-diagonal Hessian ('whole' or 'elements' "
                              f"instead of slices; default: {DEFAULT_MASS_THRESHOLD})")
    command.add_argument("--method", choices=METHODS, default="auto",
                         help="how to measure (default: auto)")
    command.add_argument("--probes", type=int, default=2,
                         help="Rademacher probes per slice in the first round (default: 2)")
    command.add_argument("--max-probes", type=int, default=8,
                         help="most probes per slice: a tensor whose decision changes without one of its probes gets "
                              "as many probes again, up to this (default: 8; equal to --probes: no second round)")
    command.add_argument("--dense-max", type=int, default=DENSE_MAX,
                         help="largest tensor always measured densely; larger ones only where dense needs no more "
                              f"products than the first round of probes (default: {DENSE_MAX})")
    command.add_argument("--max-slices", type=int, default=MAX_SLICES,
                         help="axes with more slices are decided on every 2nd, 4th or 8th slice (plus the first "
                              "stride, which sends a tensor whose structure is finer than its stride back to every "
                              f"slice); 0: every slice of every axis (default: {MAX_SLICES})")
    command.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the probes (default: 0)")
    add_compute_options(command, dtype="float32")
    add_output_options(command, Path("partition.json"), what="partition file to write")
    command.add_argument("--couplings", type=Path, metavar="NPZ",
                         help="keep the measured couplings in this file: read when it exists (deciding again with "
                              "other --threshold/--contrast/... measures nothing), else measured and written; refused "
                              "when it was measured with another model, data or measurement setting")
    command.add_argument("--heatmap", action="append", default=[], metavar="PARAM",
                         help="also draw the measured Hessian of this tensor with its derived blocks (PNG next to "
                              "--out; repeatable)")
    command.set_defaults(run=run_partition)


@holding_output_file("partition.json")
def run_partition(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..data import make_batches
    from ..guards import check_device
    from ..models import build_model
    from ..partitions.coupling import planned_products
    from ..partitions.decide import DecisionSettings
    from ..partitions.measured import CouplingsFile, derive
    from ..partitions.render import table_rows
    from ..partitions.transfer import small_overrides

    check_device(args.device)
    check_output_file(args.out, "--out", "partition.json")
    if args.couplings is not None:
        check_output_file(args.couplings, "--couplings", "couplings.npz")
    settings = DecisionSettings(threshold=args.threshold, contrast=args.contrast, max_runs=args.max_runs,
                                mass_threshold=args.mass_threshold, max_spread=args.max_spread)
    if args.max_probes < args.probes:
        raise ValueError(f"--max-probes ({args.max_probes}) must be at least --probes ({args.probes})")
    if args.max_slices < 0:
        raise ValueError(f"--max-slices must be >= 0 (0: every slice), got {args.max_slices}")
    dtype = torch_dtype(args.dtype)
    overrides = parse_overrides(args.set)
    # with --small only the smaller instance is measured: the full model's shapes suffice (any size)
    spec = build_model(args.model, seed=args.seed, device="meta" if args.small else None, **overrides)
    note_eval_mode(args.model, spec.model)
    small = parse_overrides([pair for pair in args.small if pair != "auto"])
    if "auto" in args.small:
        small = {**small_overrides(spec.config), **small}
    measured = build_model(args.model, seed=args.seed, **{**overrides, **small}) if args.small else spec
    batches = make_batches(measured, args.data, batch_size=args.batch_size, n_batches=args.batches, seed=args.seed,
                           dtype=dtype)
    measurement = dict(method=args.method, probes=args.probes, max_probes=args.max_probes, dense_max=args.dense_max,
                       max_slices=args.max_slices, seed=args.seed)
    couplings = None if args.couplings is None else CouplingsFile(args.couplings, {
        key: getattr(args, key) for key in ("model", "set", "small", "data", "batches", "batch_size", *measurement,
                                            "dtype")})
    reading = couplings is not None and args.couplings.exists()
    shapes = [tuple(p.shape) for p in measured.model.parameters() if p.requires_grad]
    planned = sum(planned_products(shape, args.method, args.probes, args.dense_max, args.max_slices)
                  for shape in shapes)
    with _HVPProgress(planned, f"{args.model}: measuring {len(shapes)} tensors", args.no_progress) as progress:
        derived = derive(spec.model, measured.loss_fn, batches, small=measured.model if args.small else None,
                         settings=settings, couplings=couplings, progress=progress, dtype=dtype, device=args.device,
                         strategy=args.strategy, **measurement)
    if reading:
        print(f"couplings read from {args.couplings} (nothing measured)", file=sys.stderr)
    derived.partition.save(args.out)
    for param in args.heatmap:
        from analysis import save_figure
        from analysis.hessian_map import hessian_map, plot_hessian_blocks

        from ..blocks import Partition

        measured_partition = Partition.from_rules(measured.model, [d.rule for d in derived.decisions])
        hmap = hessian_map(measured.model, measured.loss_fn, batches, measured_partition, params=[param],
                           dtype=dtype, device=args.device, strategy=args.strategy)
        path = args.out.with_name(f"{args.out.stem}_{folder_name(param)}.png")
        save_figure(plot_hessian_blocks(hmap.matrix, hmap.boundaries, title=f"{param}: Hessian and derived blocks"),
                    path)
        print(f"wrote {path}")
    measured_on = "" if not args.small else (
        f" (measured on the smaller instance {' '.join(f'{k}={v}' for k, v in small.items())})" if small
        else " (--small auto: the model is already that small, measured itself)")
    undecided = [d.coupling.param for d in derived.decisions if not d.settled]
    if undecided:
        print(f"warning: {len(undecided)} decision(s) change without one of their probes (UNDECIDED in the evidence: "
              f"{', '.join(undecided[:5])}{' ...' if len(undecided) > 5 else ''}); the rule of the full estimate is "
              f"written. Raise --max-probes (now {args.max_probes}) to settle them.", file=sys.stderr)
    print(f"\n{args.model}: {len(derived.partition.blocks)} blocks over {len(derived.partition.rules)} tensors"
          f"{measured_on}")
    print(pd.DataFrame(table_rows(derived.decisions)).to_string(index=False, max_colwidth=90))
    print(f"wrote {args.out}")
    return 0


class _HVPProgress:
    """A progress bar of Hessian-vector products, shown from the first product on (none when a kept
    measurement is read); a refining round may do more products than first planned."""

    def __init__(self, planned: int, description: str, disable: bool):
        self.planned, self.description, self.disable = planned, description, disable
        self.bar = None

    def __enter__(self) -> _HVPProgress:
        return self

    def __call__(self, products: int) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.planned, desc=self.description, unit="HVP", disable=self.disable,
                            file=sys.stderr)
        self.bar.total = max(self.bar.total, self.bar.n + products)
        self.bar.update(products)

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.close()
