"""``hessian-blocks js --top N`` (what ``make demo`` runs): the printed table keeps the N blocks of
largest mean JS distance, blocks.csv keeps every block."""

from __future__ import annotations

import pandas as pd
import pytest

from hessian_blocks.cli import main

TINY = ["--model", "gpt2-nano", "--set", "n_layer=1", "--set", "n_embd=16", "--set", "n_head=2",
        "--set", "vocab_size=300", "--set", "context=8", "--batch-size", "2", "--batches", "1",
        "--steps", "6", "--probes", "2", "--grid-points", "4000", "--sigma2", "1e-3", "--no-progress",
        "--blocks", "blocks.0.attn.*"]


def test_top_prints_the_most_heterogeneous_blocks_and_keeps_all_in_the_csv(tmp_path, capsys):
    assert main(["js", *TINY, "--top", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(tmp_path / "gpt2-nano" / "blocks.csv")
    assert len(table) == 8
    top = table.nlargest(3, "mean_js")["block"].tolist()
    rest = table[~table["block"].isin(top)]["block"].tolist()
    shown = [line.split()[0] for line in printed.splitlines() if line.startswith("blocks.0.attn.")]
    assert shown == top and not set(rest) & set(shown)
    assert "the 3 most heterogeneous (largest mean JS distance), all in blocks.csv" in printed
    assert "JS0 (mean Jensen-Shannon distance" in printed and str(tmp_path / "js0.csv") in printed


def test_top_must_be_positive(tmp_path, capsys):
    assert main(["js", *TINY, "--top", "0", "--out", str(tmp_path)]) == 2
    assert "--top must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "gpt2-nano").exists()


@pytest.mark.parametrize("top", ["8", "50"])
def test_top_at_or_above_the_block_count_prints_every_block(top, tmp_path, capsys):
    assert main(["js", *TINY, "--top", top, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("blocks.0.attn.") for line in printed.splitlines()) == 8
    assert "most heterogeneous" not in printed


def test_the_makefile_demo_command_parses():
    """``make demo`` (the README's first command) runs a command line the parser accepts."""
    import re
    import shlex
    from pathlib import Path

    from hessian_blocks.cli import build_parser

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(r"^demo:.*\n\t(.*)$", makefile, re.M).group(1)
    argv = shlex.split(recipe.replace("$(DEMO_OUT)", "runs/demo"))
    assert argv[0] == "$(BIN)/hessian-blocks"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "js" and args.model == ["gpt2-nano", "vgg16"] and args.top == 5
