"""Block-diagonal quadratics: GD vs Adam vs Adam-mini under heterogeneous and homogeneous blocks.

The papers' quadratic experiment. The objective is ``f(w) = 1/2 sum_b w_b^T H_b w_b`` with
``H_b = Q_b diag(lambda_b) Q_b^T`` (``Q_b`` a seeded random rotation, so no optimizer sees the
eigenbasis) and the same overall condition number (5000) in every case:

- ``heterogeneous``: block ``b``'s eigenvalues are log-uniform in its own band; the bands are
  log-spaced over ``[1, 5000]`` (e.g. 4 blocks: [1, 8.4], [8.4, 71], [71, 595], [595, 5000]), so
  the blocks differ in scale and each is well conditioned.
- ``homogeneous``: exactly the heterogeneous eigenvalues, shuffled at random across the blocks:
  the same spectrum of the whole Hessian (GD, which is rotation invariant, sees the same problem up
  to the start point) but every block now spans the whole range.
- ``gpt2-spectra`` (optional): each block's eigenvalues are sampled from the SLQ spectrum of one
  block of a GPT-2-style model at initialisation (probability = quadrature weight), in absolute
  value, floored at ``max / 5000`` so the condition number is exactly 5000.

Every optimizer starts from the same seeded point; gradients are exact (``H_b w_b``); each runs a
small learning-rate grid and the curves record the gradient norm at every iteration. Adam-mini runs
with one block per quadratic block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

import optim

from .store import ResultStore, check_size, progress_bar
from .zoo import zoo_models

__all__ = [
    "QUADRATIC_OPTIMIZERS",
    "BlockQuadratic",
    "QuadraticConfig",
    "heterogeneous_eigenvalues",
    "homogeneous_eigenvalues",
    "spectrum_eigenvalues",
    "run_quadratic",
    "quadratic_experiment",
    "summarize_quadratics",
    "plot_quadratics",
]

# The papers' names for the optimizers of the one registry (optim.make) and this experiment's settings:
# plain gradient descent, Adam (AdamW without weight decay) and Adam-mini (one block per quadratic block).
_REGISTERED: dict[str, tuple[str, dict]] = {
    "gd": ("sgd", {"momentum": 0.0}),
    "adam": ("adamw", {"eps": 1e-12}),
    "adam-mini": ("adam_mini", {"eps": 1e-12}),
}
QUADRATIC_OPTIMIZERS: tuple[str, ...] = tuple(_REGISTERED)


class BlockQuadratic(torch.nn.Module):
    """``f(w) = 1/2 w^T H w`` with ``H = blockdiag(H_1, ..., H_B)``, ``H_b = Q_b diag(lambda_b) Q_b^T``.

    One float64 parameter vector ``w``; block ``b`` is its ``b``-th contiguous segment.
    :meth:`partition` is the matching Adam-mini partition (one block per quadratic block).
    """

    def __init__(self, eigenvalues: Sequence[np.ndarray], seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        blocks = []
        for lam in eigenvalues:
            lam = torch.as_tensor(np.asarray(lam, dtype=np.float64))
            if lam.ndim != 1 or lam.numel() == 0 or not bool(torch.all(lam > 0)):
                raise ValueError("every block needs a non-empty 1-D array of positive eigenvalues")
            q, r = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=gen, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # Haar-distributed rotation
            blocks.append((q * lam) @ q.T)
        self.block_sizes = [b.shape[0] for b in blocks]
        self.hessian = torch.block_diag(*blocks)
        self.w = torch.nn.Parameter(torch.randn(self.hessian.shape[0], generator=gen, dtype=torch.float64))

    def set_gradient(self) -> float:
        """Write the exact gradient ``H w`` into ``w.grad``; return its 2-norm."""
        self.w.grad = self.hessian @ self.w.detach()
        return float(torch.linalg.vector_norm(self.w.grad))

    def loss(self) -> float:
        w = self.w.detach()
        return 0.5 * float(w @ self.hessian @ w)

    def partition(self):
        """One block per quadratic block (a hessian_blocks Partition of ``w``)."""
        from hessian_blocks import Partition, Rule

        runs = tuple((size, 1) for size in self.block_sizes)
        return Partition.from_rules(self, [Rule("w", "groups", axis=0, runs=runs, why="quadratic blocks")])


def heterogeneous_eigenvalues(n_blocks: int, dim: int, condition: float, seed: int = 0) -> list[np.ndarray]:
    """Block ``b``: ``dim`` log-uniform eigenvalues in the ``b``-th of ``n_blocks`` log-spaced bands
    of ``[1, condition]``; the extremes 1 and ``condition`` are included, so that is the condition number."""
    if n_blocks < 2 or dim < 2 or condition <= 1:
        raise ValueError(f"need n_blocks >= 2, dim >= 2, condition > 1; got {n_blocks}, {dim}, {condition}")
    rng = np.random.default_rng(seed)
    edges = np.linspace(0.0, np.log(condition), n_blocks + 1)
    blocks = [np.exp(rng.uniform(lo, hi, dim)) for lo, hi in zip(edges[:-1], edges[1:])]
    blocks[0][0], blocks[-1][0] = 1.0, float(condition)
    return blocks


def homogeneous_eigenvalues(eigenvalues: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """The same eigenvalues shuffled across blocks (block sizes kept): same spectrum, mixed blocks."""
    sizes = [len(lam) for lam in eigenvalues]
    pooled = np.random.default_rng(seed).permutation(np.concatenate(eigenvalues))
    return np.split(pooled, np.cumsum(sizes)[:-1])


def spectrum_eigenvalues(
    spectrum, n_blocks: int, dim: int, condition: float, seed: int = 0
) -> tuple[list[np.ndarray], list[str]]:
    """``dim`` eigenvalues from each of ``n_blocks`` evenly spaced *matrix* blocks of an SLQ spectrum.

    ``spectrum`` is a hessian_blocks SpectrumResult. Block ``b``'s eigenvalues are drawn from its
    Ritz nodes (all probes pooled, probability = quadrature weight), in absolute value; then all are
    floored at ``max / condition`` and the smallest set to it, so the condition number is exact.
    Returns the eigenvalues and the names of the blocks they came from.
    """
    matrices = [i for i, shape in enumerate(spectrum.shapes) if len(shape) >= 2]
    if len(matrices) < n_blocks:
        raise ValueError(f"the spectrum has {len(matrices)} matrix blocks; {n_blocks} are needed")
    chosen = [matrices[round(k * (len(matrices) - 1) / (n_blocks - 1))] for k in range(n_blocks)]
    nodes, weights = spectrum.ritz()
    rng = np.random.default_rng(seed)
    blocks = []
    for i in chosen:
        x, p = nodes[i].ravel(), weights[i].ravel()
        keep = np.isfinite(x) & np.isfinite(p)
        x, p = np.abs(x[keep]), p[keep]
        blocks.append(rng.choice(x, size=dim, p=p / p.sum()))
    top = max(float(b.max()) for b in blocks)
    floor = top / condition
    blocks = [np.maximum(b, floor) for b in blocks]
    lowest = min(range(n_blocks), key=lambda k: blocks[k].min())
    blocks[lowest][np.argmin(blocks[lowest])] = floor
    return blocks, [spectrum.names[i] for i in chosen]


def _optimizer(name: str, problem: BlockQuadratic, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """Optimizer ``name`` (one of QUADRATIC_OPTIMIZERS) from ``optim.make``, without weight decay."""
    if name not in _REGISTERED:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(QUADRATIC_OPTIMIZERS)}")
    registered, options = _REGISTERED[name]
    if registered != "sgd":
        options = {**options, "betas": betas}
    if registered in optim.PARTITIONED:
        options = {**options, "partition": problem.partition()}
    return optim.make(registered, problem, lr=lr, **options)


def run_quadratic(
    eigenvalues: Sequence[np.ndarray], optimizer: str, lr: float, iterations: int, *,
    seed: int = 0, betas: tuple[float, float] = (0.9, 0.99),
) -> np.ndarray:
    """Gradient norms ``[iterations + 1]`` of one optimizer on one quadratic (index 0: the start)."""
    problem = BlockQuadratic(eigenvalues, seed=seed)
    opt = _optimizer(optimizer, problem, lr, betas)
    norms = np.empty(iterations + 1)
    for t in range(iterations):
        norms[t] = problem.set_gradient()
        opt.step()
    norms[iterations] = problem.set_gradient()
    return norms


@dataclass(frozen=True)
class QuadraticConfig:
    """Sizes and grids of the quadratic experiment (``preset(size)`` for the shared sizes)."""

    n_blocks: int = 4
    dim: int = 25  # eigenvalues per block
    condition: float = 5000.0
    iterations: int = 4000
    optimizers: tuple[str, ...] = QUADRATIC_OPTIMIZERS
    lrs: dict = field(default_factory=lambda: {
        "gd": (2e-4, 3.9e-4),  # 2 / lambda_max = 4e-4 is GD's stability limit
        "adam": (3e-3, 1e-2, 3e-2, 1e-1),
        "adam-mini": (3e-3, 1e-2, 3e-2, 1e-1),
    })
    betas: tuple[float, float] = (0.9, 0.99)
    target: float = 1e-4  # gradient norm relative to the start for "iterations to target"
    gpt2_case: bool = True  # also the case with GPT-2-style block spectra (one SLQ measurement)
    gpt2_overrides: dict = field(default_factory=lambda: zoo_models("medium", ("gpt2-nano",))["gpt2-nano"])
    slq_steps: int = 25
    slq_probes: int = 2
    seed: int = 0
    device: str = "cpu"  # where the GPT-2-style spectrum is measured (the quadratics themselves run on CPU)

    @classmethod
    def preset(cls, size: str, **changes) -> "QuadraticConfig":
        check_size(size)
        base = {
            "small": dict(iterations=2000, lrs={"gd": (3.9e-4,), "adam": (3e-2, 1e-1), "adam-mini": (3e-2, 1e-1)},
                          gpt2_overrides=zoo_models("small", ("gpt2-nano",))["gpt2-nano"], slq_steps=15, slq_probes=1),
            "medium": dict(),
            "paper": dict(dim=100, iterations=30000, slq_steps=100, slq_probes=10, gpt2_overrides={}),
        }[size]
        return cls(**{**base, **changes})


def _cases(config: QuadraticConfig, store: ResultStore, progress: bool) -> dict[str, list[np.ndarray]]:
    het = heterogeneous_eigenvalues(config.n_blocks, config.dim, config.condition, seed=config.seed)
    cases = {"heterogeneous": het, "homogeneous": homogeneous_eigenvalues(het, seed=config.seed)}
    if config.gpt2_case:
        from .spectra import measure_spectrum

        spectrum = measure_spectrum(
            "gpt2-nano", config.gpt2_overrides, steps=config.slq_steps, probes=config.slq_probes,
            seed=config.seed, device=config.device, store=store, progress=progress,
        )
        cases["gpt2-spectra"], _ = spectrum_eigenvalues(spectrum, config.n_blocks, config.dim, config.condition,
                                                        seed=config.seed)
    return cases


def quadratic_experiment(
    config: QuadraticConfig, *, out: str | None = None, progress: bool = True
) -> pd.DataFrame:
    """Gradient-norm curves of every (case, optimizer, lr): columns case, optimizer, lr, iteration,
    grad_norm, rel_grad_norm (divided by the start's). Results are kept under ``out`` (resumable)."""
    store = ResultStore(out)
    cases = _cases(config, store, progress)
    units = [(case, opt, lr) for case in cases for opt in config.optimizers for lr in config.lrs[opt]]
    frames = []
    for case, opt, lr in progress_bar(units, desc="quadratics", enabled=progress):
        params = {"case": case, "optimizer": opt, "lr": lr, "iterations": config.iterations, "betas": config.betas,
                  "seed": config.seed, "eigenvalues": [lam.tolist() for lam in cases[case]]}
        record = store.run(
            f"quadratic-{case}-{opt}-lr{lr:g}", params,
            lambda: {"grad_norm": run_quadratic(cases[case], opt, lr, config.iterations, seed=config.seed,
                                                betas=config.betas)},
        )
        norms = np.asarray(record["grad_norm"], dtype=np.float64)
        frames.append(pd.DataFrame({"case": case, "optimizer": opt, "lr": lr, "iteration": np.arange(norms.size),
                                    "grad_norm": norms, "rel_grad_norm": norms / norms[0]}))
    curves = pd.concat(frames, ignore_index=True)
    curves.attrs["config"] = asdict(config)
    return curves


def _iterations_to_stay(rel: np.ndarray, target: float) -> float:
    """The first index from which ``rel`` stays at or below ``target`` (NaN counts as above)."""
    above = np.flatnonzero(~(rel <= target))
    if not above.size:
        return 0.0
    return np.inf if above[-1] == rel.size - 1 else float(above[-1] + 1)


def summarize_quadratics(curves: pd.DataFrame, target: float = 1e-4) -> pd.DataFrame:
    """Per (case, optimizer): the best lr and its iterations to ``rel_grad_norm <= target``.

    Best lr = fewest iterations to the target; among lrs that never reach it (iterations = inf),
    the lowest relative gradient norm at the end. Columns: case, optimizer, best_lr,
    iterations_to_target (the first iteration at or below the target; inf: not within the budget),
    iterations_to_stay (the first iteration from which the norm stays at or below the target to the
    end of the run: constant-lr Adam oscillates, and can dip below a target long before it stays
    there; inf: above it at the end), final_rel_grad_norm, min_rel_grad_norm.
    """
    rows = []
    for (case, opt, lr), run in curves.groupby(["case", "optimizer", "lr"], sort=False):
        rel = run["rel_grad_norm"].to_numpy()
        hit = np.flatnonzero(rel <= target)
        rows.append({"case": case, "optimizer": opt, "lr": lr,
                     "iterations_to_target": float(hit[0]) if hit.size else np.inf,
                     "iterations_to_stay": _iterations_to_stay(rel, target),
                     "final_rel_grad_norm": float(rel[-1]), "min_rel_grad_norm": float(np.nanmin(rel))})
    table = pd.DataFrame(rows)
    table["_final"] = table["final_rel_grad_norm"].fillna(np.inf)
    best = (table.sort_values(["iterations_to_target", "_final"], kind="stable")
            .groupby(["case", "optimizer"], sort=False).head(1))
    best = best.drop(columns="_final").rename(columns={"lr": "best_lr"})
    order = {c: i for i, c in enumerate(dict.fromkeys(curves["case"]))}
    return best.sort_values(["case", "optimizer"], key=lambda s: s.map(order) if s.name == "case" else s,
                            kind="stable").reset_index(drop=True)


def plot_quadratics(curves: pd.DataFrame, summary: pd.DataFrame):
    """One panel per case: log10 gradient norm vs iteration of each optimizer at its best lr."""
    from matplotlib.figure import Figure

    cases = list(dict.fromkeys(curves["case"]))
    fig = Figure(figsize=(4.2 * len(cases), 3.4), layout="constrained")
    axes = fig.subplots(1, len(cases), squeeze=False)[0]
    for ax, case in zip(axes, cases):
        for _, row in summary[summary["case"] == case].iterrows():
            run = curves[(curves["case"] == case) & (curves["optimizer"] == row["optimizer"])
                         & (curves["lr"] == row["best_lr"])]
            ax.plot(run["iteration"], np.log10(run["rel_grad_norm"]), linewidth=1.0,
                    label=f"{row['optimizer']} (lr {row['best_lr']:g})")
        ax.set_title(f"{case} blocks")
        ax.set_xlabel("iteration")
        ax.set_ylabel("log10 gradient norm / start")
        ax.legend(fontsize=8)
    fig.suptitle(f"Block-diagonal quadratics, condition number "
                 f"{curves.attrs.get('config', {}).get('condition', 5000):g}")
    return fig
