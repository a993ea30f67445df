"""Write the experiment notebooks (valid nbformat 4 JSON): ``python notebooks/build_notebooks.py``.

Each notebook is thin: a parameter cell (SIZE, RESULTS, DEVICE) and calls into ``analysis.experiments``.
The same group functions make the committed figures (``hessian-blocks figures``).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''# Parameters. SIZE: "small" (CPU, about a minute), "medium" (the committed figures, CPU, minutes),
# "paper" (closer to the papers' scale: a GPU or a long run).
SIZE = "small"
# Folder where finished work units are kept; a stopped run resumes from it (None: keep nothing).
RESULTS = None
# Where spectra, Hessian maps and training runs compute: "cpu", "cuda", "cuda:1", ...
DEVICE = "cpu"'''

SHOW = '''import io

from IPython.display import Image, display

from analysis import format_table
from analysis.experiments.groups import run_group

def show(group):
    result = run_group(group, SIZE, RESULTS, progress=False, device=DEVICE)
    for name, table in result.tables.items():
        if not name.endswith("_runs"):
            print(f"{name}\\n{format_table(table)}\\n")
    for fig in result.figures.values():
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        display(Image(png.getvalue()))
    return result'''

NOTEBOOKS = {
    "01_optimizer_comparison": (
        "Optimizer comparison: SGD-momentum vs AdamW vs Adam-mini vs GaLore-mini",
        "The GPT-2-style model trained with each optimizer over a small learning-rate grid, same budget and "
        "offline data. The summary gives each optimizer at its best learning rate (lowest validation loss), "
        "its loss and optimizer-state memory relative to AdamW (the papers: Adam-mini matches AdamW with "
        "about half the state; GaLore-mini, this project's low-rank variant, keeps about a fifth).",
        ["comparison"],
    ),
    "02_heterogeneity_vs_gap": (
        "Block heterogeneity (JS0) vs the SGD-AdamW gap",
        "For each model of the zoo: JS0 at initialisation (mean Jensen-Shannon distance between the "
        "spectral densities of its parameter blocks) and the gap between the best final training loss of "
        "SGD-momentum and of AdamW. The papers: Transformers have a much larger JS0 than CNNs, and a larger gap.",
        ["heterogeneity"],
    ),
    "03_block_spectra": (
        "Block spectra at initialisation and JS heatmaps",
        "Spectral densities of four sampled blocks of the VGG-style and the BERT-style model (eigenvalues "
        "divided by each block's 10th-largest, log frequency), and the matrix of JS distances between all "
        "blocks of every zoo model.",
        ["spectra"],
    ),
    "04_quadratics": (
        "Quadratics: GD vs Adam vs Adam-mini, and a man-made MLP",
        "Block-diagonal quadratics with condition number 5000: heterogeneous blocks, the same eigenvalues "
        "shuffled across blocks (homogeneous), and blocks sampled from GPT-2-style block spectra. Then an MLP "
        "whose layers are scaled to a chosen heterogeneity level, trained with SGD and AdamW.",
        ["quadratics", "manmade_mlp"],
    ),
    "05_hessian_structure": (
        "The near-block-diagonal Hessian",
        "The dense Hessian of a small MLP's hidden weights and of the query / key / value weights of a small "
        "GPT-2-style model at initialisation, with the blocks of Adam-mini's default partition drawn on it.",
        ["hessian"],
    ),
}


def build(name: str, title: str, text: str, groups: list[str]) -> nbformat.NotebookNode:
    cells = [new_markdown_cell(f"# {title}\n\n{text}"), new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
             new_code_cell(SHOW)]
    cells += [new_code_cell(f'{group} = show("{group}")') for group in groups]
    for i, cell in enumerate(cells):
        cell["id"] = f"{name[:2]}-cell-{i}"  # stable ids: rebuilding gives the same files
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def main() -> None:
    for name, (title, text, groups) in NOTEBOOKS.items():
        notebook = build(name, title, text, groups)
        nbformat.validate(notebook)
        nbformat.write(notebook, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
