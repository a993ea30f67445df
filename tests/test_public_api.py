"""Every public module of the three packages declares ``__all__``, and every name it lists exists
(read with ast: no module is imported, so the check also covers modules that need optional libraries)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = sorted(p for package in ("hessian_blocks", "optim", "analysis") for p in (ROOT / package).rglob("*.py")
                if not p.name.startswith("_") or p.name == "__init__.py")


def declared(tree: ast.Module) -> tuple[list[str] | None, set[str]]:
    """(the names in ``__all__`` or None, every name bound at the module's top level or listed as a lazy export)."""
    listed, bound = None, set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports of lazily exported names
            bound |= {(alias.asname or alias.name) for sub in node.body if isinstance(sub, (ast.Import, ast.ImportFrom))
                      for alias in sub.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    bound.add(target.id)
                    if target.id == "__all__":
                        listed = list(ast.literal_eval(node.value))
    return listed, bound


@pytest.mark.parametrize("path", [p for p in PUBLIC if p.name != "__init__.py" or p.read_text().strip()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_public_module_declares_its_names(path):
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py" and not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
        pytest.skip("a package docstring only")
    listed, bound = declared(tree)
    assert listed is not None, f"{path.relative_to(ROOT)} has no __all__"
    assert len(set(listed)) == len(listed), f"{path.relative_to(ROOT)}: a name is listed twice in __all__"
    missing = sorted(set(listed) - bound)
    assert not missing, f"{path.relative_to(ROOT)}: __all__ lists {missing}, which the module does not define"
