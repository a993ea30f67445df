"""Stochastic Lanczos Quadrature on every block of a :class:`BlockHessian` at once."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .hvp import BlockHessian
from .lanczos import lanczos, make_probes
from .results import SpectrumResult

__all__ = ["block_spectra", "total_steps"]



def breakdown_tol(dtype: torch.dtype) -> float:
    """The residual, relative to a problem's largest tridiagonal entry, below which Lanczos stops it
    (see :func:`~hessian_blocks.lanczos.lanczos`), by the precision of the products: 1e-10 for float64,
    100 units of rounding otherwise (1.2e-5 for float32, whose rounding leaves residuals near 1e-7 of
    the scale where an exact product would have none)."""
    return max(1e-10, 100 * torch.finfo(dtype).eps)


def block_spectra(
    hessian: BlockHessian,
    *,
    steps: int = 100,
    probes: int = 10,
    probe_kind: str = "rademacher",
    seed: int = 0,
    reorthogonalize: bool = False,
    full_model: bool = False,
    progress: Callable[[int], None] | None = None,
    settings: dict | None = None,
    start: torch.Tensor | None = None,
) -> SpectrumResult:
    """Ritz nodes and weights of every (block, probe) Lanczos problem, run together.

    Each Lanczos step costs one block-diagonal Hessian product of all blocks and probes, computed in
    the hessian's dtype; the Lanczos recurrences (vectors, inner products, the tridiagonals) run in
    float64 whatever that dtype, so float32 products lose no more than their own rounding. With
    ``full_model`` the Hessian on all selected coordinates gets its own SLQ run (one problem per
    probe), for the full-spectrum density. The probes come from ``seed``; the same seed, data and
    model give the same numbers.

    Args:
        steps: Lanczos steps m per problem (the papers use 100).
        probes: random start vectors per block n_v (the papers use 10).
        probe_kind: "rademacher" or "gaussian".
        reorthogonalize: full reorthogonalisation (the papers use the plain recurrence).
        progress: called with the number of steps completed by each Lanczos step, e.g. a
            progress bar's ``update``.
        settings: extra metadata stored with the result (model name, data source, ...).
        start: ``[probes, P]`` start vectors to use instead of drawing them from ``seed`` (used in float64).
    """
    if steps < 1 or probes < 1:
        raise ValueError(f"steps and probes must be >= 1, got steps={steps}, probes={probes}")
    on_step = (lambda _step: progress(1)) if progress is not None else None
    if start is None:
        start = make_probes(probes, hessian.size, kind=probe_kind, seed=seed, dtype=torch.float64,
                            device=hessian.device)
    elif tuple(start.shape) != (probes, hessian.size):
        raise ValueError(f"start must be [probes, P] = [{probes}, {hessian.size}], got {tuple(start.shape)}")
    start = start.to(hessian.device, torch.float64)
    tol = breakdown_tol(hessian.dtype)
    blocks = lanczos(
        lambda v: hessian.block_matvec(v).to(torch.float64), start, hessian.block_ids, len(hessian.blocks), steps,
        reorthogonalize=reorthogonalize, breakdown_tol=tol, callback=on_step,
    )
    full = None
    if full_model:
        whole = torch.zeros_like(hessian.block_ids)
        full = lanczos(lambda v: hessian.matvec(v).to(torch.float64), start, whole, 1, steps,
                       reorthogonalize=reorthogonalize, breakdown_tol=tol, callback=on_step)
    record = {
        "steps": steps,
        "probes": probes,
        "probe_kind": probe_kind,
        "seed": seed,
        "reorthogonalize": reorthogonalize,
        "dtype": str(hessian.dtype).removeprefix("torch."),
        "strategy": hessian.strategy,
        "device": str(hessian.device),
        "n_samples": hessian.n_samples,
        "n_batches": hessian.n_batches,
        **(settings or {}),
    }
    return SpectrumResult(
        names=[b.name for b in hessian.blocks],
        params=[b.param for b in hessian.blocks],
        shapes=[tuple(b.shape) for b in hessian.blocks],
        sizes=np.array([b.numel for b in hessian.blocks]),
        lanczos=blocks,
        settings=record,
        full=full,
    )


def total_steps(steps: int, full_model: bool) -> int:
    """Number of progress updates :func:`block_spectra` makes at most (for a progress bar total)."""
    return steps * (2 if full_model else 1)
