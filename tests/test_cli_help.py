"""``hessian-blocks --help`` answers before any heavy library loads: the parser takes its choices from
light modules (``hessian_blocks.choices``, ``optim.choices``, ``analysis.experiments.store`` /
``groups``), and the packages load their names lazily."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "matplotlib", "scipy", "sklearn", "transformers", "tqdm")
COMMANDS = ("spectrum", "js", "partition", "compare", "figures")


def loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return {"heavy": heavy modules loaded, "out": what code
    stored in the variable ``out``}."""
    script = (f"import sys, json\nout = None\n{code}\n"
              f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules), 'out': out}}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv", [[]] + [[command] for command in COMMANDS], ids=lambda a: " ".join(a) or "top")
def test_help_imports_no_heavy_library(argv):
    code = ("import contextlib, io\nfrom hessian_blocks.cli import main\nbuf = io.StringIO()\n"
            f"with contextlib.redirect_stdout(buf):\n    try:\n        main({argv + ['--help']!r})\n"
            "    except SystemExit as stop:\n        out = [stop.code, buf.getvalue()]")
    result = loaded_after(code)
    assert result["heavy"] == []
    code, text = result["out"]
    assert code == 0 and "usage: hessian-blocks" in text


def test_help_lists_the_registries_choices():
    """The light names are the registries' names (the registries import them, the CLI offers them)."""
    from analysis.experiments.training import OPTIMIZERS
    from hessian_blocks.data import DATA_SOURCES
    from hessian_blocks.hvp import STRATEGIES
    from hessian_blocks.models import _REGISTRY, MODEL_NAMES

    assert tuple(_REGISTRY) == MODEL_NAMES
    result = loaded_after(
        "import contextlib, io\nfrom hessian_blocks.cli import build_parser\nout = {}\nfor command in ('js', "
        "'compare'):\n    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):\n        try:\n            "
        "build_parser().parse_args([command, '--help'])\n        except SystemExit:\n            out[command] = "
        "buf.getvalue()")
    js_help, compare_help = (" ".join(result["out"][c].split()) for c in ("js", "compare"))
    assert ", ".join(MODEL_NAMES) in js_help and ", ".join(DATA_SOURCES) in js_help
    assert "{" + ",".join(STRATEGIES) + "}" in js_help
    assert ", ".join(OPTIMIZERS) in compare_help


def test_packages_import_lazily_and_resolve_their_names():
    result = loaded_after("import hessian_blocks, optim, analysis\nout = sorted(hessian_blocks.__all__)")
    assert result["heavy"] == []
    import types

    import hessian_blocks
    import hessian_blocks.lanczos as lanczos_module
    from hessian_blocks.lazy import lazy_exports

    # a submodule and an export never share a name: `import package.name as alias` binds the module
    assert isinstance(lanczos_module, types.ModuleType) and callable(lanczos_module.lanczos)
    with pytest.raises(ValueError, match=r"exports \['lanczos'\] are named like the submodules"):
        lazy_exports("hessian_blocks", {"lanczos": ".lanczos"})
    assert all(getattr(hessian_blocks, name) is not None for name in result["out"])
    import analysis
    import optim

    for package in (analysis, optim):
        assert all(getattr(package, name) is not None for name in package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        hessian_blocks.no_such_name  # noqa: B018
