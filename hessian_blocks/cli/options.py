"""Option groups shared by the commands, declared once, and the helpers that read them."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = [
    "DTYPE_NAMES", "add_compute_options", "add_model_options", "add_output_options", "check_output_file",
    "check_output_folder", "device_name", "exit_on_interrupt", "folder_name", "holding_output_file",
    "note_eval_mode", "parse_overrides", "torch_dtype",
]

DTYPE_NAMES = ("auto", "float64", "float32")


def torch_dtype(name: str, device: str = "cpu"):
    """The torch dtype called ``name`` (one of DTYPE_NAMES; ``auto``: by the type of ``device``, see
    :data:`hessian_blocks.choices.AUTO_DTYPE`)."""
    import torch

    from ..choices import AUTO_DTYPE

    if name == "auto":
        name = AUTO_DTYPE.get(torch.device(device).type, "float64")
    return {"float64": torch.float64, "float32": torch.float32}[name]


def device_name(name: str) -> str:
    """``--device``'s value: ``auto`` is cuda where this machine has a CUDA GPU, else cpu; any other name as
    given (checked before any work)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_options(parser: argparse.ArgumentParser, *, repeatable: bool = False, default: str | None = None,
                      required: bool = False, batches: bool = True) -> argparse._ArgumentGroup:
    """``--model``, ``--set``, ``--data`` (and ``--batches``, ``--batch-size`` where ``batches``)."""
    from ..choices import DATA_SOURCES, MODEL_NAMES

    group = parser.add_argument_group("model and data")
    what = (f"bundled model ({', '.join(MODEL_NAMES)}), a Hugging Face model built from its config with random "
            "weights ('hf:LlamaForCausalLM', 'hf:path/to/config.json'), or 'package.module:factory'")
    if repeatable:
        group.add_argument("--model", action="append", metavar="NAME", help=f"{what}; repeat to compare models")
    else:
        suffix = f" (default: {default})" if default else ""
        group.add_argument("--model", default=default, required=required, metavar="NAME", help=what + suffix)
    group.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a model config field, e.g. --set n_layer=2 (hf: models: their config's fields, "
                            "e.g. --set num_hidden_layers=2, and context=N tokens per sample)" +
                            (" (applies to every --model)" if repeatable else ""))
    group.add_argument("--data", default="auto",
                       help=f"data source: auto, {', '.join(DATA_SOURCES)}, or a .pt/.npz/.txt file (default: auto)")
    if batches:
        group.add_argument("--batches", type=int, default=1, help="number of batches in the loss (default: 1)")
        group.add_argument("--batch-size", type=int, default=8, help="samples per batch (default: 8)")
    return group


def add_compute_options(parser: argparse.ArgumentParser, *, products: bool = True,
                        dtype: str = "auto") -> argparse._ArgumentGroup:
    """``--device`` (and ``--dtype`` with default ``dtype``, ``--strategy`` of the Hessian-vector products where
    ``products``)."""
    from ..choices import STRATEGIES

    group = parser.add_argument_group("compute")
    group.add_argument("--device", type=device_name, default="auto",
                       help="auto, cpu, cuda, cuda:1, ... (default: auto, cuda when this machine has a CUDA GPU)")
    if products:
        group.add_argument("--dtype", choices=DTYPE_NAMES, default=dtype,
                           help="precision of the Hessian-vector products; the Lanczos recurrences run in float64 "
                                "(default: " + ("auto: float32 on CUDA, float64 on the CPU" if dtype == "auto"
                                                else dtype) + ")")
        group.add_argument("--strategy", choices=STRATEGIES, default="auto",
                           help="block Hessian-vector product strategy (default: auto, the per-device choice of "
                                "hessian_blocks.hvp.AUTO_STRATEGY)")
    return group


def add_output_options(parser: argparse.ArgumentParser, default_out: Path,
                       what: str = "output folder") -> argparse._ArgumentGroup:
    """``--out`` and ``--no-progress``."""
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, default=default_out, help=f"{what} (default: {default_out})")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return group


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``--set FIELD=VALUE`` options as a dict; values are JSON where they parse, else strings."""
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


def folder_name(label: str) -> str:
    """``label`` made safe as a file or folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def check_output_folder(path: Path, flag: str = "--out") -> Path:
    """Refuse an output folder that is an existing file or lies under one (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is an existing file, not a folder: give a folder (it is created if missing)")
    _check_parents(path, flag)
    return path


def check_output_file(path: Path, flag: str, example: str) -> Path:
    """Refuse an output file path that is an existing folder (``example``: a file name to suggest in it)
    or lies under a file."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give the path of the file to write, e.g. {path / example}")
    _check_parents(path, flag)
    return path


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: '{parent}' is a file, so nothing can be written under it; "
                                 "give a path in a folder")
            return


def exit_on_interrupt(kept: Callable[[argparse.Namespace], str]):
    """Decorate a runner so that Ctrl-C ends it with one line, ``interrupted; <kept(args)>``, and exit
    code 130 instead of a traceback; ``kept`` says what the interrupted run left and how to go on."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def run_interruptibly(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except KeyboardInterrupt:
                print(f"\nhessian-blocks {args.command}: interrupted; {kept(args)}", file=sys.stderr)
                return 130

        return run_interruptibly

    return wrap


def holding_output_file(example: str):
    """Decorate a runner that writes the file ``--out`` so that it holds that file while it runs (checked
    first to be a file path; ``example``: a file name to suggest in a folder): a second run writing the
    same file is refused with one line naming the run that holds it (exit code 2)."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def run_holding(args: argparse.Namespace) -> int:
            from ..files import hold_output

            check_output_file(args.out, "--out", example)
            with hold_output(args.out, folder=False):
                return run(args)

        return run_holding

    return wrap


def note_eval_mode(label: str, model) -> None:
    """One line on stderr when the model has modules that behave differently in train mode (Dropout,
    BatchNorm): the commands measure the Hessian in eval mode, where they are deterministic."""
    from ..guards import train_mode_modules

    was_training = model.training
    model.train()
    modules = train_mode_modules(model)
    model.train(was_training)
    if modules:
        listed = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        print(f"note: {label}: measured in eval mode, so {listed} use running statistics / no dropout "
              "(the papers' setting; in the library, BlockHessian refuses such modules in train mode)",
              file=sys.stderr)
