"""Batched Lanczos on many independent (block, probe) problems at once.

The operator is block diagonal on a concatenated coordinate vector of ``P`` coordinates:
``block_ids[p]`` is the block id (0..B-1) of coordinate ``p`` and ``matvec(V)`` maps a ``[K, P]``
tensor of ``K`` probe vectors to ``[K, P]``, applying ``H_bb`` to each block's coordinates. Every
(block, probe) pair is an independent Lanczos problem; all ``B*K`` of them advance together with
one ``matvec`` call per step. Per-block inner products are ``index_add_`` reductions over
``block_ids`` (no Python loop over blocks), the per-problem scalars ``[K, B]`` are broadcast back
to coordinates with ``x[:, block_ids]``.

Stochastic Lanczos quadrature (SLQ): for a unit start vector ``v`` the ``m``-step tridiagonal
``T`` gives Gauss quadrature nodes (eigenvalues of ``T``) and weights (squared first components
of its eigenvectors) with ``sum_i w_i f(theta_i) = v^T f(H) v`` exactly for polynomials ``f`` of
degree < 2m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

__all__ = ["LanczosResult", "lanczos", "make_probes"]


def make_probes(
    n_probes: int,
    n_coords: int,
    *,
    kind: str = "rademacher",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[n_probes, n_coords]`` random probe vectors.

    ``kind`` is ``"rademacher"`` (entries +-1) or ``"gaussian"`` (standard normal). The numbers are
    drawn on the CPU from a generator seeded with ``seed`` and then moved to ``device``/``dtype``,
    so a seed gives the same probes on every device.
    """
    if n_probes < 1 or n_coords < 1:
        raise ValueError(f"need n_probes >= 1 and n_coords >= 1, got {n_probes} and {n_coords}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "rademacher":
        probes = torch.randint(0, 2, (n_probes, n_coords), generator=gen, dtype=torch.int8)
        probes = probes.to(torch.float64).mul_(2).sub_(1)
    elif kind == "gaussian":
        probes = torch.randn(n_probes, n_coords, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"unknown probe kind {kind!r}: use 'rademacher' or 'gaussian'")
    return probes.to(device=device, dtype=dtype)


@dataclass(eq=False)
class LanczosResult:
    """Tridiagonal coefficients of ``B*K`` Lanczos runs (``B`` blocks x ``K`` probes, ``m`` steps).

    ``alpha[b, k, :steps[b, k]]`` is the diagonal of that problem's ``T``,
    ``beta[b, k, :steps[b, k] - 1]`` its off-diagonal (``beta[b, k, j]`` couples Lanczos vectors
    ``j`` and ``j + 1``). ``beta[b, k, steps - 1]`` holds the norm of the last residual (about
    zero where the problem broke down or exhausted its block); all entries past that are zero.
    """

    alpha: np.ndarray  # [B, K, m] float64
    beta: np.ndarray  # [B, K, m] float64
    steps: np.ndarray  # [B, K] int64

    def __post_init__(self) -> None:
        self.alpha = np.asarray(self.alpha, dtype=np.float64)
        self.beta = np.asarray(self.beta, dtype=np.float64)
        self.steps = np.asarray(self.steps, dtype=np.int64)
        if self.alpha.ndim != 3 or self.beta.shape != self.alpha.shape:
            raise ValueError(
                f"alpha and beta must both be [B, K, m], got {self.alpha.shape} and {self.beta.shape}"
            )
        if self.steps.shape != self.alpha.shape[:2]:
            raise ValueError(f"steps must be [B, K] = {self.alpha.shape[:2]}, got {self.steps.shape}")
        m = self.alpha.shape[2]
        if self.steps.size and (self.steps.min() < 1 or self.steps.max() > m):
            raise ValueError(f"steps must lie in 1..{m}")

    @property
    def n_blocks(self) -> int:
        return self.alpha.shape[0]

    @property
    def n_probes(self) -> int:
        return self.alpha.shape[1]

    @property
    def max_steps(self) -> int:
        return self.alpha.shape[2]

    def tridiagonal(self, block: int, probe: int) -> tuple[np.ndarray, np.ndarray]:
        """``(diag, offdiag)`` of problem ``(block, probe)``'s ``T`` (copies)."""
        s = int(self.steps[block, probe])
        return self.alpha[block, probe, :s].copy(), self.beta[block, probe, : s - 1].copy()

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Gauss quadrature ``(nodes, weights)``, both ``[B, K, m]`` float64.

        Nodes are the eigenvalues of each ``T`` (ascending), weights the squared first components
        of its eigenvectors (they sum to 1). Entries past a problem's ``steps``: node NaN, weight 0.
        """
        nodes = np.full(self.alpha.shape, np.nan)
        weights = np.zeros(self.alpha.shape)
        for b in range(self.n_blocks):
            for k in range(self.n_probes):
                diag, offdiag = self.tridiagonal(b, k)
                theta, vecs = eigh_tridiagonal(diag, offdiag)
                nodes[b, k, : len(theta)] = theta
                weights[b, k, : len(theta)] = vecs[0] ** 2
        return nodes, weights

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LanczosResult):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in ("alpha", "beta", "steps")
        )


def _block_sums(x: torch.Tensor, block_ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Sum ``x[..., P]`` over the coordinates of each block: ``[..., n_blocks]``."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros(flat.shape[0], n_blocks, dtype=x.dtype, device=x.device)
    out.index_add_(1, block_ids, flat)
    return out.reshape(*x.shape[:-1], n_blocks)


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    block_ids: torch.Tensor,
    n_blocks: int,
    steps: int,
    *,
    reorthogonalize: bool = False,
    breakdown_tol: float = 1e-10,
    callback: Callable[[int], None] | None = None,
) -> LanczosResult:
    """Run Lanczos on every (block, probe) problem of a block-diagonal operator at once.

    Parameters
    ----------
    matvec:
        ``[K, P] -> [K, P]``; block ``b``'s coordinates of the output are ``H_bb`` times that
        block's coordinates of the input (blocks do not mix). Called once per step.
    start:
        ``[K, P]`` start vectors; each (block, probe) part is normalised to unit norm here
        (a zero part raises ``ValueError``). Its dtype and device are used throughout.
    block_ids:
        ``LongTensor [P]``: block id in ``0..n_blocks-1`` of each coordinate.
    steps:
        maximum number of Lanczos steps ``m`` (the papers use 100).
    reorthogonalize:
        ``False`` (default, the papers' method): plain three-term recurrence. ``True``: full
        reorthogonalisation against all previous Lanczos vectors (classical Gram-Schmidt,
        twice, per block); stores ``m`` vectors of shape ``[K, P]``.
    breakdown_tol:
        problem ``(b, k)`` stops after step ``j`` (0-based) when its new residual norm satisfies
        ``beta_j <= breakdown_tol * max(|alpha_0|, ..., |alpha_j|, beta_0, ..., beta_{j-1})``,
        i.e. is negligible relative to the largest entry of its ``T`` so far (a zero block stops
        after one step with ``alpha = 0``). It also stops after ``d_b`` steps, ``d_b`` being
        the block's dimension: the Krylov space is then exhausted. A stopped problem keeps its
        step count, its vectors become zero so it contributes nothing, and no division by its
        tiny ``beta`` happens. The default suits float64; in float32 rounding leaves residuals
        near 1e-7 of the scale, so pass about 1e-5 to detect breakdowns there.
    callback:
        called as ``callback(j)`` after step ``j`` (1-based) completes, e.g. to drive a
        progress bar. The loop ends early once every problem has stopped.

    Returns a :class:`LanczosResult` with ``[B, K, m]`` float64 ``alpha``/``beta`` and ``[B, K]``
    step counts.
    """
    if start.ndim != 2:
        raise ValueError(f"start must be [K, P], got shape {tuple(start.shape)}")
    n_probes, n_coords = start.shape
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    if block_ids.ndim != 1 or block_ids.shape[0] != n_coords:
        raise ValueError(f"block_ids must be [P] = [{n_coords}], got shape {tuple(block_ids.shape)}")
    if block_ids.dtype != torch.long:
        raise ValueError(f"block_ids must be a LongTensor, got {block_ids.dtype}")
    block_ids = block_ids.to(start.device)
    if n_coords and (int(block_ids.min()) < 0 or int(block_ids.max()) >= n_blocks):
        raise ValueError(f"block_ids must lie in 0..{n_blocks - 1}")
    if not torch.isfinite(start).all():
        raise ValueError("start contains NaN or inf")
    dims = torch.bincount(block_ids, minlength=n_blocks)  # [B]
    if (dims == 0).any():
        empty = torch.nonzero(dims == 0).flatten().tolist()
        raise ValueError(f"blocks {empty} have no coordinates")

    def block_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _block_sums(x * y, block_ids, n_blocks)

    norms = block_dot(start, start).sqrt()  # [K, B]
    if (norms == 0).any():
        k, b = torch.nonzero(norms == 0)[0].tolist()
        raise ValueError(f"start vector {k} is zero on block {b}; every block needs a nonzero start")
    v = start / norms[:, block_ids]
    v_prev = torch.zeros_like(v)
    beta_prev = torch.zeros_like(norms)
    active = torch.ones_like(norms, dtype=torch.bool)  # [K, B]
    n_done = torch.zeros_like(norms, dtype=torch.long)
    scale = torch.zeros_like(norms)  # largest |entry| of T so far
    max_steps = dims.unsqueeze(0).expand_as(n_done)
    alphas = torch.zeros(steps, n_probes, n_blocks, dtype=start.dtype, device=start.device)
    betas = torch.zeros_like(alphas)
    basis = None
    if reorthogonalize:
        basis = torch.zeros(steps, n_probes, n_coords, dtype=start.dtype, device=start.device)

    for j in range(steps):
        if basis is not None:
            basis[j] = v
        w = matvec(v)
        if w.shape != v.shape:
            raise ValueError(f"matvec returned shape {tuple(w.shape)} for input {tuple(v.shape)}")
        w = w - beta_prev[:, block_ids] * v_prev
        alpha = block_dot(w, v)
        w = w - alpha[:, block_ids] * v
        if basis is not None:
            q = basis[: j + 1]
            for _ in range(2):  # classical Gram-Schmidt, twice
                coeff = block_dot(q, w.unsqueeze(0))  # [j+1, K, B]
                w = w - (coeff[:, :, block_ids] * q).sum(0)
        beta = block_dot(w, w).sqrt()
        if not bool(torch.isfinite(alpha).all() & torch.isfinite(beta).all()):
            raise FloatingPointError(f"non-finite Lanczos coefficients at step {j + 1}: matvec returned NaN/inf")

        alpha = torch.where(active, alpha, 0.0)
        n_done += active.long()
        scale = torch.maximum(scale, alpha.abs())
        cont = active & (beta > breakdown_tol * scale) & (n_done < max_steps)
        scale = torch.maximum(scale, torch.where(cont, beta, 0.0))
        alphas[j] = alpha
        betas[j] = torch.where(active, beta, 0.0)

        safe_beta = torch.where(cont, beta, 1.0)
        v_prev = v
        v = torch.where(cont[:, block_ids], w / safe_beta[:, block_ids], 0.0)
        del w  # not held through the next matvec: [K, P] less for its memory budget
        beta_prev = torch.where(cont, beta, 0.0)
        active = cont
        if callback is not None:
            callback(j + 1)
        if not bool(active.any()):
            break

    # [m, K, B] -> [B, K, m]
    return LanczosResult(
        alpha=alphas.permute(2, 1, 0).to(device="cpu", dtype=torch.float64).numpy(),
        beta=betas.permute(2, 1, 0).to(device="cpu", dtype=torch.float64).numpy(),
        steps=n_done.T.cpu().numpy(),
    )
