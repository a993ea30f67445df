"""Every notebook runs at its default (small) size without error, and is what the builder writes."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_the_built_ones():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "notebooks" / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert [p.stem for p in NOTEBOOKS] == sorted(builder.NOTEBOOKS)
    for path in NOTEBOOKS:
        built = builder.build(path.stem, *builder.NOTEBOOKS[path.stem])
        assert nbformat.read(path, as_version=4).cells == built.cells, f"{path.name}: rerun build_notebooks.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_small_size(path, tmp_path_factory):
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    parameters = notebook.cells[1]
    assert 'SIZE = "small"' in parameters.source and "RESULTS = None" in parameters.source
    assert 'DEVICE = "cpu"' in parameters.source
    # keep work units where the experiment tests of this session keep theirs: each runs once
    store = tmp_path_factory.getbasetemp() / "experiments-small"
    parameters.source = parameters.source.replace("RESULTS = None", f"RESULTS = {str(store)!r}")
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} showed no figure"
