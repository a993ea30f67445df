"""Block spectra at initialisation: per-block densities (VGG-style vs BERT-style) and JS heatmaps.

The papers' blockwise-spectra figure: for a CNN and a Transformer at initialisation, the spectral
densities of a few sampled blocks (one block per parameter tensor), each block's eigenvalues divided
by its 10th-largest, on a log-frequency axis; and the matrix of Jensen-Shannon distances between all
blocks' densities. :func:`measure_spectrum` is the one measurement every experiment shares (kept in
a :class:`ResultStore`, so a spectrum is measured once per setting).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hessian_blocks import (
    BlockHessian,
    Partition,
    SpectrumResult,
    block_spectra,
    build_model,
    make_batches,
    sample_layers,
)
from hessian_blocks.guards import check_device

from .store import ResultStore, check_size, model_fingerprint, params_key, progress_bar
from .zoo import FAMILIES, zoo_models

__all__ = ["SpectraConfig", "measure_spectrum", "plot_sampled_densities", "sampled_blocks", "spectra_experiment",
           "spectra_table"]


def _ordinal(k: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def measure_spectrum(
    model: str, overrides: dict | None = None, *, data: str = "auto", batch_size: int = 4, n_batches: int = 1,
    steps: int = 25, probes: int = 2, seed: int = 0, device: str = "cpu", store: ResultStore | None = None,
    progress: bool = False, layers: int | None = None, dtype: str = "float64",
    on_step: Callable[[], None] | None = None,
) -> SpectrumResult:
    """SLQ spectra of the parameter tensors (one block each) of a zoo model at initialisation.

    The papers' plain Lanczos recurrence (in float64), Rademacher probes; the model, the data and the
    probes come from ``seed``. ``layers``: only the matrix blocks of that many evenly spaced layers plus
    embeddings and head (:func:`~hessian_blocks.blocks.sample_layers`, the papers' sample; default: every
    tensor). ``dtype``: precision of the products, "float64", "float32" or "auto" (by the device type,
    :data:`~hessian_blocks.choices.AUTO_DTYPE`). ``on_step()`` is called after every Lanczos step (e.g. to
    enforce a deadline). With a ``store`` the result is kept as ``.npz`` and reused.
    ``device`` is where the products run; it is not part of the stored key: products of one precision on
    CPU and CUDA agree to its rounding, so a spectrum measured on one resumes a run on the other (the
    result's settings record where it was measured).
    """
    from hessian_blocks.choices import AUTO_DTYPE

    target = check_device(device)
    if dtype == "auto":
        dtype = AUTO_DTYPE.get(target.type, "float64")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64, float32 or auto, got {dtype!r}")
    overrides = dict(overrides or {})
    params = {"model": model, "overrides": overrides, "data": data, "batch_size": batch_size,
              "n_batches": n_batches, "steps": steps, "probes": probes, "seed": seed}
    if layers is not None:  # left out at their defaults: results stored before these options existed stay valid
        params["layers"] = layers
    if dtype != "float64":
        params["dtype"] = dtype
    spec = build_model(model, seed=seed, **overrides)  # its fingerprint decides whether a stored result is reused

    def compute() -> SpectrumResult:
        import sys
        import time

        import torch
        from tqdm.auto import tqdm

        precision = getattr(torch, dtype)
        batches = make_batches(spec, data, batch_size=batch_size, n_batches=n_batches, seed=seed, dtype=precision)
        blocks = Partition.per_tensor(spec.model).blocks
        if layers is not None:
            blocks = sample_layers(blocks, layers)
        hessian = BlockHessian(spec.model, spec.loss_fn, batches, blocks, dtype=precision, device=device)
        with tqdm(total=steps, desc=f"{model}: SLQ on {len(hessian.blocks)} blocks", unit="step",
                  disable=not progress, file=sys.stderr, leave=False) as bar:

            def step(count: int) -> None:
                bar.update(count)
                if on_step is not None:
                    on_step()

            started = time.perf_counter()
            result = block_spectra(hessian, steps=steps, probes=probes, seed=seed, progress=step,
                                   settings={"model": model, "overrides": overrides, "data": data, "layers": layers})
        result.settings["seconds"] = round(time.perf_counter() - started, 3)
        return result

    return (store or ResultStore(None)).run_file(
        params_key(f"spectrum-{model}", params), params, compute,
        save=lambda result, path: result.save(path), load=SpectrumResult.load, suffix=".npz",
        fingerprint=model_fingerprint(spec.model),
    )


@dataclass(frozen=True)
class SpectraConfig:
    """Which models and SLQ settings (``preset(size)`` for the shared sizes)."""

    models: dict = field(default_factory=lambda: zoo_models("medium", ("vgg16", "bert-mini")))
    batch_size: int = 4
    steps: int = 25
    probes: int = 2
    panels: int = 4  # sampled blocks per model in the density figure
    rescale_rank: int = 10  # eigenvalues divided by each block's k-th largest
    seed: int = 0
    device: str = "cpu"  # where the Hessian-vector products run ("cuda", "cuda:1", ...)

    @classmethod
    def preset(cls, size: str, models: tuple[str, ...] = ("vgg16", "bert-mini"), **changes) -> "SpectraConfig":
        check_size(size)
        # small: 15 Ritz values per block are too few for a positive 10th-largest: divide by the largest
        slq = {"small": dict(steps=15, probes=1, rescale_rank=1), "medium": dict(),
               "paper": dict(steps=100, probes=10, batch_size=8)}
        return cls(**{"models": zoo_models(size, models), **slq[size], **changes})


def spectra_experiment(
    config: SpectraConfig, *, out: str | None = None, progress: bool = True
) -> dict[str, SpectrumResult]:
    """Spectrum of every configured model at initialisation, measured or resumed from ``out``."""
    store = ResultStore(out)
    return {
        name: measure_spectrum(name, overrides, batch_size=config.batch_size, steps=config.steps,
                               probes=config.probes, seed=config.seed, device=config.device, store=store,
                               progress=progress)
        for name, overrides in progress_bar(config.models.items(), total=len(config.models), desc="spectra",
                                            enabled=progress)
    }


def sampled_blocks(spectrum: SpectrumResult, count: int = 4) -> list[int]:
    """``count`` evenly spaced matrix blocks (parameters with >= 2 dimensions), in model order."""
    matrices = [i for i, shape in enumerate(spectrum.shapes) if len(shape) >= 2]
    pool = matrices if len(matrices) >= count else list(range(len(spectrum.names)))
    if len(pool) <= count:
        return pool
    return [pool[round(k * (len(pool) - 1) / (count - 1))] for k in range(count)]


def plot_sampled_densities(spectra: dict[str, SpectrumResult], *, panels: int = 4, rescale_rank: int = 10,
                           sigma2: float = 1e-5):
    """One row per model, one panel per sampled block: density (log) vs eigenvalue / 10th-largest."""
    from matplotlib.figure import Figure

    from analysis.plots import DENSITY_FLOOR

    fig = Figure(figsize=(3.3 * panels, 2.6 * len(spectra)), layout="constrained")
    axes = fig.subplots(len(spectra), panels, squeeze=False)
    for row, (model, spectrum) in zip(axes, spectra.items()):
        chosen = sampled_blocks(spectrum, panels)
        sampled = spectrum.select(chosen)
        density = sampled.density(sigma2=sigma2, rescale_rank=rescale_rank)
        for ax in row[len(chosen):]:
            ax.remove()
        for ax, i in zip(row, range(len(chosen))):
            y = density.densities[i]
            support = np.flatnonzero(y > DENSITY_FLOOR)
            ax.plot(density.grid, np.clip(y, DENSITY_FLOOR, None), linewidth=0.8)
            ax.set_yscale("log")
            if support.size:
                lo, hi = density.grid[support[0]], density.grid[support[-1]]
                ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
            ax.set_title(f"{model}: {sampled.names[i]}", fontsize=8)
            ax.set_xlabel(f"eigenvalue / {_ordinal(rescale_rank)}-largest ({density.scales[i]:.2g})", fontsize=7)
            ax.set_ylabel("density (log)", fontsize=7)
            ax.tick_params(labelsize=7)
    fig.suptitle("Hessian block spectra at initialisation")
    return fig


def spectra_table(spectra: dict[str, SpectrumResult], sigma2: float = 1e-5,
                  families: dict[str, str] | None = None) -> pd.DataFrame:
    """Per model: family (``families[model]``, default the zoo's :data:`~.zoo.FAMILIES`), number of blocks,
    JS0 (mean JS distance between the blocks' densities) and JS0 divided by the largest JS0 of the CNN-style
    models (the papers' Table 1; NaN without a CNN)."""
    from analysis import js0, js_matrix

    families = FAMILIES if families is None else families
    table = pd.DataFrame([{"model": model, "family": families.get(model, "other"), "blocks": len(spectrum.names),
                           "JS0": js0(js_matrix(spectrum.density(sigma2=sigma2).densities))}
                          for model, spectrum in spectra.items()])
    cnn = table.loc[table["family"] == "CNN", "JS0"]
    table["JS0_ratio_to_max_CNN"] = table["JS0"] / cnn.max() if len(cnn) else np.nan
    return table
