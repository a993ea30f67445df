"""Every example in the docs (and the README) marked runnable runs, at the sizes written there.

The convention (see docs/testing.md): a fenced block right after a line ``<!-- runnable -->`` is run.

- ```python blocks run in order, one namespace per page, in a fresh temporary folder that is also on
  ``sys.path``; a block whose first line is ``# file: NAME.py`` is written there as NAME.py instead
  (a user module the next blocks import).
- ```console blocks: every line starting with ``hessian-blocks`` runs through the command line's
  ``main`` in that same folder and must exit with 0.

Pages that show bigger runs (the papers' sizes, GPUs) leave those blocks unmarked.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARK = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block that directly follows the runnable mark."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() == MARK:
            blocks.append((match.group(1), match.group(2)))
    return blocks


PAGES = [p for p in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))] if runnable_blocks(p.read_text())]


def test_the_convention_finds_marked_blocks_only():
    text = f"{MARK}\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n{MARK}\n```console\nhessian-blocks js\n```\n"
    assert runnable_blocks(text) == [("python", "x = 1\n"), ("console", "hessian-blocks js\n")]
    assert PAGES, "no docs page has a runnable example"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path, monkeypatch, capsys):
    from hessian_blocks.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for number, (language, code) in enumerate(runnable_blocks(page.read_text()), 1):
        where = f"{page.relative_to(ROOT)}, runnable block {number}"
        first = code.split("\n", 1)[0]
        if language == "python" and first.startswith("# file: "):
            module = tmp_path / first.removeprefix("# file: ").strip()
            module.write_text(code)
            sys.modules.pop(module.stem, None)  # a module of that name from another page
        elif language == "python":
            exec(compile(code, where, "exec"), namespace)
        elif language == "console":
            commands = [line for line in code.splitlines() if line.startswith("hessian-blocks ")]
            assert commands, f"{where}: a runnable console block without a hessian-blocks command"
            for line in commands:
                argv = shlex.split(line.split(" #", 1)[0])[1:]
                code = main(argv + ["--no-progress"])
                assert code == 0, f"{where}: {line}\n{capsys.readouterr().err}"
        else:
            pytest.fail(f"{where}: runnable blocks are python or console, not {language}")
    capsys.readouterr()
