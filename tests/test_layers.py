"""The layers point one way: engine < optim < analysis < experiments < CLI (read from the imports with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hessian_blocks", "optim", "analysis")
# (module prefix, layer); the longest matching prefix wins
LAYERS = (
    ("hessian_blocks", 0),
    ("optim", 1),
    ("analysis", 2),
    ("analysis.experiments", 3),
    ("hessian_blocks.cli", 4),
)
LAYER_NAMES = ("engine", "optim", "analysis", "experiments", "cli")
# third-party libraries the engine must not need (tables and plots belong to analysis)
ENGINE_FORBIDDEN = ("pandas", "matplotlib")


def layer_of(module: str) -> int | None:
    """The layer of a module of this project, None for any other module."""
    matches = [(len(prefix), layer) for prefix, layer in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (or in ``source`` as if it were that
    file), relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
            # `from . import x` / `from package import module`: each imported name may be a module
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if layer_of(f"{target}.{alias.name}") is not None
                      and (ROOT / Path(*f"{target}.{alias.name}".split("."))).exists()]
    return found


SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_layer_map():
    assert layer_of("hessian_blocks.blocks") == 0
    assert layer_of("hessian_blocks.partitions.structural") == 0
    assert layer_of("hessian_blocks.cli.measure") == 4
    assert layer_of("optim.adam_mini") == 1
    assert layer_of("analysis.js") == 2
    assert layer_of("analysis.experiments.training") == 3
    assert layer_of("numpy") is None
    assert len(SOURCES) > 40


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_points_up(path):
    own = layer_of(module_name(path))
    upward = [f"line {line}: {target} ({LAYER_NAMES[layer_of(target)]})" for line, target in imported_modules(path)
              if layer_of(target) is not None and layer_of(target) > own]
    assert not upward, f"{module_name(path)} ({LAYER_NAMES[own]}) imports a higher layer: {upward}"
    if own == 0:
        heavy = [f"line {line}: {target}" for line, target in imported_modules(path)
                 if target.split(".")[0] in ENGINE_FORBIDDEN]
        assert not heavy, f"the engine module {module_name(path)} imports {heavy}"


def test_the_checker_sees_an_upward_import():
    """A relative import of the CLI from the engine is found (the test above can fail)."""
    fake = ROOT / "hessian_blocks" / "partitions" / "_layer_probe.py"
    targets = [t for _, t in imported_modules(fake, "from ..cli import main\nimport analysis.js\n")]
    assert "hessian_blocks.cli" in targets and "analysis.js" in targets
    assert all(layer_of(t) > 0 for t in ("hessian_blocks.cli", "analysis.js"))
