"""The command line, the top floor: ``hessian-blocks spectrum | js | partition | compare | figures | table1``.

One module per command family (:mod:`.measure`, :mod:`.partition`, :mod:`.experiments`), the shared
option groups in :mod:`.options`. Every command prints a table, writes CSV / JSON / NPZ / PNG files
into ``--out``, shows a progress bar on long work, and gives the same numbers for the same ``--seed``.
Bad input ends a command with one line naming the problem and exit code 2; a warning is one line too.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    from ..guards import HessianSetupError  # torch loads here, after parsing (--help answers without it)


    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"hessian-blocks {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning  # one line per warning, without the source line
            return args.run(args)
    except (ValueError, TypeError, OSError, ImportError, HessianSetupError) as err:
        # OSError: unreadable/unwritable paths
        print(f"hessian-blocks {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each sets ``run`` to its runner."""
    from . import experiments, measure, partition

    parser = argparse.ArgumentParser(
        prog="hessian-blocks",
        description="Blockwise Hessian spectra (SLQ), Jensen-Shannon block heterogeneity, Hessian-derived "
        "partitions and optimizer comparisons.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for family in (measure, partition, experiments):
        family.add_commands(commands)
    return parser
