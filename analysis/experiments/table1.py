"""The papers' Table 1 at their sizes: JS0 at initialisation of two CNNs and three Transformers.

ResNet18 and VGG16 (224x224 images, 1000 classes, the ImageNet architectures), ViT-base/16, BERT-base
(masked LM, 512 tokens) and GPT-2-small (1024 tokens), built from the bundled model classes with the
published configurations and random weights. As the papers measured: one block per parameter tensor on a
sample of 4 evenly spaced layers plus embeddings and head (the CNNs: 4 convolutions plus the classifier;
ResNet18's 4 stages are all sampled), 100 Lanczos steps x 10 probes, one batch of synthetic data of the real
input shapes. The outputs: the JS0 table, each model's JS heatmap, the papers' Figure 3 (each sampled block's
density over its eigenvalues divided by its 10th largest) and, with each figure, whether the papers'
ordering holds (every Transformer's JS0 above every CNN's; "hundreds of times" in the papers' text).

``size="paper"`` is that, for one GPU (``hessian-blocks table1``; about 8-10 minutes on an H200 with float32
products, estimated from FLOP counts); ``"medium"`` and ``"small"`` run the same families at the zoo's CPU
sizes (``"small"``: seconds, what CI runs).
A ``budget_s`` measures the models in order until it is spent and says which finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd

from .spectra import measure_spectrum, plot_sampled_densities, spectra_table
from .store import ResultStore, check_size, progress_bar
from .zoo import FAMILIES, zoo_models

__all__ = ["BudgetSpent", "PAPER_MODELS", "Table1Config", "Table1Model", "figure3", "ordering_verdict", "plot_js0_bars",
           "table1_experiment", "table1_orderings", "table1_outputs", "table1_table"]


@dataclass(frozen=True)
class Table1Model:
    """One row of Table 1: a bundled model class, the overrides that give the published architecture, and
    the batch (``batch_size`` samples of the model's input shape, synthetic data)."""

    model: str
    overrides: dict
    batch_size: int

    @property
    def family(self) -> str:
        return FAMILIES[self.model]


PAPER_MODELS: dict[str, Table1Model] = {
    "ResNet18": Table1Model("resnet18", dict(width=64, image_size=224, num_classes=1000, stem="imagenet"), 8),
    "VGG16": Table1Model("vgg16", dict(widths=(64, 128, 256, 512, 512), fc_width=4096, image_size=224,
                                       num_classes=1000), 4),
    "ViT-base": Table1Model("vit-tiny", dict(image_size=224, patch_size=16, n_layer=12, n_embd=768, n_head=12,
                                             num_classes=1000), 2),
    "BERT-base": Table1Model("bert-mini", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=30522, context=512), 1),
    "GPT-2-small": Table1Model("gpt2-nano", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                                                 context=1024), 1),
}
"""The papers' sizes: the ImageNet ResNet18 (11.7M parameters) and VGG16 (138M), ViT-base/16 (86M),
BERT-base (110M with its untied decoder) and GPT-2-small (124M + its untied head)."""


def _zoo_rows(size: str) -> dict[str, Table1Model]:
    """The same five families at one of the zoo's CPU sizes."""
    zoo = zoo_models(size, tuple(row.model for row in PAPER_MODELS.values()))
    return {label: Table1Model(row.model, zoo[row.model], 4) for label, row in PAPER_MODELS.items()}


@dataclass(frozen=True)
class Table1Config:
    """Which models, SLQ settings and device (``preset(size)`` for the shared sizes)."""

    models: dict = field(default_factory=lambda: dict(PAPER_MODELS))
    steps: int = 100
    probes: int = 10
    layers: int = 4  # sampled layers (plus embeddings and head)
    dtype: str = "auto"  # of the products: float32 on CUDA, float64 on the CPU
    rescale_rank: int = 10  # Figure 3 divides each block's eigenvalues by its 10th largest
    panels: int = 4  # sampled blocks per model in Figure 3
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def preset(cls, size: str, models: tuple[str, ...] | None = None, **changes) -> "Table1Config":
        """``paper``: the published sizes; ``medium`` / ``small``: the zoo's CPU sizes (``small`` with 10 steps
        x 2 probes, too few Ritz values for a 10th largest: Figure 3 divides by the largest)."""
        check_size(size)
        rows = dict(PAPER_MODELS) if size == "paper" else _zoo_rows(size)
        unknown = [m for m in models or () if m not in rows]
        if unknown:
            raise ValueError(f"not in Table 1: {', '.join(unknown)}; choose from {', '.join(rows)}")
        slq = {"small": dict(steps=10, probes=2, rescale_rank=1), "medium": dict(steps=40, probes=4), "paper": {}}
        return cls(**{"models": {m: rows[m] for m in models or rows}, **slq[size], **changes})


class BudgetSpent(Exception):
    """The time budget of a Table 1 run ran out while a model was measured."""


def table1_experiment(config: Table1Config, *, out: str | None = None, progress: bool = True,
                      budget_s: float | None = None) -> tuple[dict, list[str]]:
    """(spectra, unfinished): the spectrum of every model that finished, in ``config.models``' order, and
    the labels of those that did not. Finished models are kept in ``out`` and resumed from it. With
    ``budget_s``, a model is abandoned at the first Lanczos step past the budget (checked after every step)
    and the later ones are not started."""
    store = ResultStore(out)
    deadline = None if budget_s is None else time.perf_counter() + budget_s

    def check_deadline() -> None:
        if deadline is not None and time.perf_counter() > deadline:
            raise BudgetSpent

    spectra, unfinished = {}, []
    for label, row in progress_bar(config.models.items(), total=len(config.models), desc="Table 1",
                                   enabled=progress):
        try:
            check_deadline()
            spectra[label] = measure_spectrum(
                row.model, row.overrides, data="synthetic", batch_size=row.batch_size, steps=config.steps,
                probes=config.probes, seed=config.seed, device=config.device, store=store, progress=progress,
                layers=config.layers, dtype=config.dtype, on_step=check_deadline)
        except BudgetSpent:
            unfinished.append(label)
    return spectra, unfinished


def table1_table(spectra: dict, config: Table1Config) -> pd.DataFrame:
    """Per model: family, architecture (bundled class), parameters, batch, blocks, JS0 and JS0 over the
    largest CNN's JS0, largest first."""
    families = {label: config.models[label].family for label in spectra}
    table = spectra_table(spectra, families=families)
    rows = [config.models[label] for label in table["model"]]
    described = [_describe(row) for row in rows]
    table.insert(2, "architecture", [row.model for row in rows])
    table.insert(3, "params", [count for count, _ in described])
    table.insert(4, "batch", [batch for _, batch in described])
    return table.sort_values("JS0", ascending=False, kind="stable").reset_index(drop=True)


def table1_orderings(table: pd.DataFrame) -> pd.DataFrame:
    """The papers' orderings, each with whether it holds here and the figures it rests on: every
    Transformer's JS0 above every CNN's, and by how much (the papers: "hundreds of times")."""
    cnn = table[table["family"] == "CNN"]
    transformers = table[table["family"] == "Transformer"]
    if cnn.empty or transformers.empty:
        missing = "CNN" if cnn.empty else "Transformer"
        return pd.DataFrame([{"ordering": "Transformers' JS0 above the CNNs'", "holds": None,
                              "evidence": f"no {missing} finished: nothing to compare"}])
    top_cnn = cnn.loc[cnn["JS0"].idxmax()]
    highest = f"{top_cnn['model']} {top_cnn['JS0']:.3g}"
    rows = [{"ordering": f"{t['model']}'s JS0 above every CNN's", "holds": bool(t["JS0"] > top_cnn["JS0"]),
             "evidence": f"{t['JS0']:.3g} vs {highest} ({t['JS0'] / top_cnn['JS0']:.3g}x)"}
            for _, t in transformers.iterrows()]
    low = transformers.loc[transformers["JS0"].idxmin()]
    ratio = low["JS0"] / top_cnn["JS0"]
    rows.insert(0, {"ordering": "every Transformer's JS0 above every CNN's", "holds": bool(ratio > 1),
                    "evidence": f"lowest Transformer {low['model']} {low['JS0']:.3g}, highest CNN {highest}: "
                                f"{ratio:.3g}x"})
    rows.append({"ordering": "by orders of magnitude (the papers: hundreds of times)", "holds": bool(ratio >= 100),
                 "evidence": f"{ratio:.3g}x"})
    return pd.DataFrame(rows)


def ordering_verdict(orderings: pd.DataFrame) -> str:
    """One line for a figure: whether the papers' main ordering holds."""
    first = orderings.iloc[0]
    if first["holds"] is None:
        return f"papers' ordering not checked: {first['evidence']}"
    return f"Transformers' JS0 above the CNNs' (papers): {'holds' if first['holds'] else 'does NOT hold'} " \
           f"({first['evidence']})"


def plot_js0_bars(table: pd.DataFrame, verdict: str):
    """JS0 per model (log scale), coloured by family, the verdict in the title."""
    from matplotlib.figure import Figure

    from .heterogeneity import FAMILY_COLORS

    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    colors = [FAMILY_COLORS.get(family, "C3") for family in table["family"]]
    ax.bar(table["model"], table["JS0"], color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("JS0 at initialisation (log)")
    ax.set_title(f"Table 1: block heterogeneity at initialisation\n{verdict}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    return fig


def figure3(spectra: dict, config: Table1Config, verdict: str):
    """The papers' Figure 3: each model's sampled blocks' densities over eigenvalue / 10th-largest."""
    fig = plot_sampled_densities(spectra, panels=config.panels, rescale_rank=config.rescale_rank)
    fig.suptitle(f"Hessian block spectra at initialisation\n{verdict}", fontsize=10)
    return fig


def table1_outputs(spectra: dict, config: Table1Config) -> tuple[dict[str, pd.DataFrame], dict]:
    """(tables, figures) of finished spectra: the JS0 table and the orderings; the JS0 bar chart, Figure 3 and
    each model's JS heatmap, every figure titled with whether the papers' ordering holds."""
    import warnings

    from analysis import js0, js_matrix, plot_js_heatmap
    from hessian_blocks.results import BroadeningWarning

    table = table1_table(spectra, config)
    orderings = table1_orderings(table)
    verdict = ordering_verdict(orderings)
    figures = {"table1_js0": plot_js0_bars(table, verdict), "table1_block_spectra": figure3(spectra, config, verdict)}
    for label, spectrum in spectra.items():
        with warnings.catch_warnings():  # the table's densities warned already
            warnings.simplefilter("ignore", BroadeningWarning)
            matrix = js_matrix(spectrum.density().densities)
        title = f"{label} ({config.models[label].family}): JS0 = {js0(matrix):.3g}\n{verdict}"
        figures[f"table1_js_heatmap_{label}"] = plot_js_heatmap(matrix, spectrum.names, title=title)
    return {"table1": table, "table1_orderings": orderings}, figures


def _describe(row: Table1Model) -> tuple[int, str]:
    """(parameters, batch shape) of a row's model."""
    from hessian_blocks import build_model

    spec = build_model(row.model, **row.overrides)
    shape = spec.data_shape
    if "context" in shape:
        batch = f"{row.batch_size} x {shape['context']} tokens"
    else:
        batch = f"{row.batch_size} x {shape['channels']}x{shape['image_size']}x{shape['image_size']}"
    return sum(p.numel() for p in spec.model.parameters()), batch
