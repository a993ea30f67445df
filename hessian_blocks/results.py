"""Result containers for blockwise spectra and densities, with exact .npz round trips."""

from __future__ import annotations

import json
import math
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from .density import gaussian_density, grid_points, kth_largest_eigenvalue, spectral_grid
from .files import atomic_write
from .lanczos import LanczosResult

__all__ = ["BroadeningWarning", "DensityResult", "SpectrumResult"]

_ROUNDOFF_FACTOR = 100  # a k-th largest eigenvalue at most this x eps x the largest magnitude is round-off


class BroadeningWarning(UserWarning):
    """Some blocks' whole spectra are narrower than the Gaussian broadening: their densities are the
    broadening kernel itself, and JS distances between them measure only where they sit."""

_FORMAT_VERSION = 1


def _npz_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _write_npz(path: str | Path, fmt: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    header = json.dumps({"format": fmt, "version": _FORMAT_VERSION, **meta})
    return atomic_write(_npz_path(path), lambda fh: np.savez(fh, meta=np.array(header), **arrays))


def _read_npz(path: str | Path, fmt: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON metadata and the arrays of a ``fmt`` file; anything else (a folder, bytes that are no
    .npz archive, a truncated archive, an .npz of other arrays, another format) is a ValueError."""
    path = Path(path)
    fix = f"pass a {fmt.split('/')[-1]} .npz file written by hessian-blocks (its save method)"
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder: {fix}")
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist: {fix}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # numpy's ValueError asks for pickle
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # the start of an archive whose end is missing or damaged
        problem = "is a truncated or damaged .npz archive" if zipped else "is not an .npz archive"
        raise ValueError(f"'{path}' {problem} ({type(err).__name__}): {fix}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"'{path}' holds a single array (an .npy file), not an .npz archive: {fix}")
    try:
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"'{path}' is truncated or damaged ({type(err).__name__}: {err}): "
                         f"write it again, or {fix}") from None
    if "meta" not in arrays:
        raise ValueError(f"'{path}' is an .npz archive of other arrays ({', '.join(sorted(arrays)) or 'none'}), "
                         f"not a {fmt} file: {fix}")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"'{path}': its 'meta' array is not the JSON header of a {fmt} file: {fix}")
    if meta.get("format") != fmt:
        raise ValueError(f"'{path}': expected a {fmt!r} file, found format {meta.get('format')!r}: {fix}")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"'{path}': unsupported {fmt} version {meta.get('version')!r}")
    return meta, arrays


_Loaded = TypeVar("_Loaded")


def _build_loaded(path: str | Path, fmt: str, build: Callable[[], _Loaded]) -> _Loaded:
    """``build()`` from a file's arrays and metadata; a missing or malformed entry names the file."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"'{path}' is a damaged {fmt} file ({type(err).__name__}: {err}); write it again") from None


def _warn_if_narrower_than_broadening(names: list[str], nodes: np.ndarray, weights: np.ndarray, sigma2: float,
                                      rescaled: bool) -> None:
    """One :class:`BroadeningWarning` naming the blocks whose spectrum (the span of their Ritz values of
    nonzero weight) is narrower than 2 sigma, and what to change (sigma2, rescaling)."""
    if not (math.isfinite(sigma2) and sigma2 > 0):
        return  # the grid and the density refuse it with a message
    weighted = np.isfinite(nodes) & (weights > 1e-12)
    lows = np.where(weighted, nodes, np.inf).min(axis=(1, 2))
    highs = np.where(weighted, nodes, -np.inf).max(axis=(1, 2))
    widths = highs - lows
    sigma = math.sqrt(sigma2)
    narrow = np.flatnonzero(widths < 2 * sigma)
    if narrow.size == 0:
        return
    single = widths[narrow] <= 1e-9 * max(float(np.abs(highs[np.isfinite(highs)]).max(initial=0.0)), 1e-300)
    listed = ", ".join(f"'{names[i]}' ({0.0 if one else widths[i]:.2g})" for i, one in zip(narrow[:6], single[:6]))
    rescale = "" if rescaled else (" or rescale each block's eigenvalues by its 10th largest (rescale_rank=10, "
                                   "--rescale-rank 10) so that the blocks' shapes are compared, not their scales")
    warnings.warn(
        f"{narrow.size} of {len(names)} blocks have a whole spectrum narrower than the Gaussian broadening "
        f"(2 sigma = {2 * sigma:.2g} with sigma2 = {sigma2:g}): {listed}{' ...' if narrow.size > 6 else ''} "
        "(widths in parentheses). Their densities are each about one Gaussian, so their JS distances say only how "
        "far apart they sit (about 0 when within sigma of each other), not how their spectra differ. Use a sigma2 "
        f"well below (width / 2)^2 of the blocks to compare (--sigma2){';' if rescale else ''}{rescale}"
        f"{'; a block of width 0 has one eigenvalue and stays one Gaussian at any sigma2' if single.any() else ''}",
        BroadeningWarning, stacklevel=3,
    )


def _lanczos_arrays(prefix: str, result: LanczosResult) -> dict[str, np.ndarray]:
    return {f"{prefix}_alpha": result.alpha, f"{prefix}_beta": result.beta, f"{prefix}_steps": result.steps}


def _lanczos_from(prefix: str, arrays: dict[str, np.ndarray]) -> LanczosResult | None:
    if f"{prefix}_alpha" not in arrays:
        return None
    return LanczosResult(
        alpha=arrays[f"{prefix}_alpha"], beta=arrays[f"{prefix}_beta"], steps=arrays[f"{prefix}_steps"]
    )


def _optional_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a, b)


@dataclass(eq=False)
class DensityResult:
    """Spectral densities of ``B`` blocks on one common grid (each integrates to 1)."""

    grid: np.ndarray  # [G]
    densities: np.ndarray  # [B, G]
    names: list[str]
    sigma2: float
    scales: np.ndarray | None = None  # [B] per-block divisor of the eigenvalues when rescaled
    full: np.ndarray | None = None  # [G] full-model density
    full_scale: float | None = None  # divisor of the full model's eigenvalues when rescaled

    def __post_init__(self) -> None:
        self.grid = np.asarray(self.grid, dtype=np.float64)
        self.densities = np.asarray(self.densities, dtype=np.float64)
        self.names = list(self.names)
        self.sigma2 = float(self.sigma2)
        if self.densities.shape != (len(self.names), self.grid.size):
            raise ValueError(
                f"densities must be [B, G] = [{len(self.names)}, {self.grid.size}], "
                f"got {self.densities.shape}"
            )
        if self.scales is not None:
            self.scales = np.asarray(self.scales, dtype=np.float64)
            if self.scales.shape != (len(self.names),):
                raise ValueError(f"scales must be [B] = [{len(self.names)}], got {self.scales.shape}")
        if self.full is not None:
            self.full = np.asarray(self.full, dtype=np.float64)
            if self.full.shape != self.grid.shape:
                raise ValueError(f"full must be [G] = [{self.grid.size}], got {self.full.shape}")
        if self.full_scale is not None:
            self.full_scale = float(self.full_scale)

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (suffix added if missing); returns the path written."""
        arrays = {"grid": self.grid, "densities": self.densities}
        if self.scales is not None:
            arrays["scales"] = self.scales
        if self.full is not None:
            arrays["full"] = self.full
        meta = {"names": self.names, "sigma2": self.sigma2, "full_scale": self.full_scale}
        return _write_npz(path, "hessian-blocks/density", meta, arrays)

    @classmethod
    def load(cls, path: str | Path) -> DensityResult:
        """Read a file written by :meth:`save` (ValueError naming the file for anything else)."""
        meta, arrays = _read_npz(path, "hessian-blocks/density")
        return _build_loaded(path, "hessian-blocks/density", lambda: cls(
            grid=arrays["grid"],
            densities=arrays["densities"],
            names=meta["names"],
            sigma2=meta["sigma2"],
            scales=arrays.get("scales"),
            full=arrays.get("full"),
            full_scale=meta["full_scale"],
        ))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DensityResult):
            return NotImplemented
        return (
            np.array_equal(self.grid, other.grid)
            and np.array_equal(self.densities, other.densities)
            and self.names == other.names
            and self.sigma2 == other.sigma2
            and _optional_equal(self.scales, other.scales)
            and _optional_equal(self.full, other.full)
            and self.full_scale == other.full_scale
        )


@dataclass(eq=False)
class SpectrumResult:
    """SLQ spectra of ``B`` Hessian blocks (and optionally of the full model)."""

    names: list[str]  # block names, e.g. "h.0.attn.q.weight[rows 0:32]"
    params: list[str]  # parameter tensor each block belongs to
    shapes: list[tuple[int, ...]]  # shape of each block's slice
    sizes: np.ndarray  # [B] coordinates per block
    lanczos: LanczosResult
    settings: dict  # JSON-serialisable run settings (model, steps, probes, seed, dtype, ...)
    full: LanczosResult | None = None  # full-model run: B = 1, one block spanning all coordinates
    _ritz: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.params = list(self.params)
        self.shapes = [tuple(int(d) for d in s) for s in self.shapes]
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        # normalise through JSON: rejects what cannot be saved and makes load(save(x)) == x exact
        self.settings = json.loads(json.dumps(self.settings))
        n = self.lanczos.n_blocks
        lengths = {"names": len(self.names), "params": len(self.params), "shapes": len(self.shapes)}
        if any(v != n for v in lengths.values()) or self.sizes.shape != (n,):
            raise ValueError(
                f"lanczos has {n} blocks but got {lengths} and sizes of shape {self.sizes.shape}"
            )
        expected = np.array([int(np.prod(s)) for s in self.shapes], dtype=np.int64)
        if not np.array_equal(self.sizes, expected):
            raise ValueError(
                f"sizes {self.sizes.tolist()} do not match the shapes' products {expected.tolist()}"
            )
        if self.full is not None and self.full.n_blocks != 1:
            raise ValueError(f"full must hold one block, got {self.full.n_blocks}")

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """``(nodes, weights)`` of the blocks, ``[B, K, m]`` (computed once; read-only arrays)."""
        if self._ritz is None:
            nodes, weights = self.lanczos.ritz()
            nodes.setflags(write=False)
            weights.setflags(write=False)
            self._ritz = (nodes, weights)
        return self._ritz

    def lambda_min(self) -> np.ndarray:
        """``[B]`` smallest Ritz value of each block over all probes."""
        return np.nanmin(self.ritz()[0], axis=(1, 2))

    def lambda_max(self) -> np.ndarray:
        """``[B]`` largest Ritz value of each block over all probes."""
        return np.nanmax(self.ritz()[0], axis=(1, 2))

    def trace_estimate(self) -> np.ndarray:
        """``[B]`` Hutchinson trace estimate ``size_b * mean_k sum_i w_ki theta_ki``.

        The quadrature's first moment is ``e1^T T e1 = alpha_0 = v^T H v / v^T v`` exactly, so this
        reads ``alpha[:, :, 0]``; with Rademacher probes ``v^T v = size_b`` and it is the plain
        Hutchinson estimator.
        """
        return self.sizes * self.lanczos.alpha[:, :, 0].mean(axis=1)

    def select(self, indices: Sequence[int]) -> SpectrumResult:
        """The spectra of the blocks at ``indices`` only, in that order (settings and the full-model
        spectrum kept)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        runs = self.lanczos
        return SpectrumResult(
            names=[self.names[i] for i in index], params=[self.params[i] for i in index],
            shapes=[self.shapes[i] for i in index], sizes=self.sizes[index],
            lanczos=LanczosResult(runs.alpha[index], runs.beta[index], runs.steps[index]),
            settings=self.settings, full=self.full,
        )

    def unrescalable(self, rank: int) -> dict[str, str]:
        """The blocks that cannot be divided by their ``rank``-th largest eigenvalue (:meth:`density`
        with ``rescale_rank=rank`` refuses them), in block order, each with the reason: fewer than
        ``rank`` coordinates (a bias of 8), or an estimate at round-off level, at most 100 x the
        machine epsilon of the measurement's dtype x the largest eigenvalue magnitude of any block.
        Such a block has fewer than ``rank`` eigenvalues that the measurement tells from zero: its
        Hessian is zero (a key bias, which softmax ignores) or of low rank at that point, and dividing
        by the estimate would blow round-off up to the others' scale. Empty when all can be rescaled."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        nodes, weights = self.ritz()
        finite = np.isfinite(nodes) & (weights > 0)
        scale = float(np.abs(np.where(finite, nodes, 0.0)).max(initial=0.0))
        eps = np.finfo(np.float32 if self.settings.get("dtype") == "float32" else np.float64).eps
        floor = _ROUNDOFF_FACTOR * float(eps) * scale
        large = np.flatnonzero(self.sizes >= rank)
        kth = {} if not large.size else dict(zip(large.tolist(), kth_largest_eigenvalue(
            nodes[large], weights[large], self.sizes[large], rank, require_positive=False).tolist()))
        reasons = {}
        for i, (name, size) in enumerate(zip(self.names, self.sizes)):
            if size < rank:
                reasons[name] = f"{size} coordinates, fewer than {rank}"
            elif not kth[i] > floor:
                level = "not positive" if not kth[i] > 0 else "round-off level"
                reasons[name] = f"estimate {kth[i]:.2g}, {level}"
        return reasons

    def density(
        self,
        *,
        grid: np.ndarray | None = None,
        sigma2: float = 1e-5,
        n_points: int | None = None,
        rescale_rank: int | None = None,
    ) -> DensityResult:
        """Gaussian-broadened densities of all blocks on one common grid.

        ``rescale_rank=k`` first divides each block's nodes by the SLQ estimate of its ``k``-th
        largest eigenvalue (:func:`~hessian_blocks.density.kth_largest_eigenvalue`; the papers plot
        with k = 10); the full model's nodes by theirs. Without ``grid``, a ``spectral_grid`` of
        ``n_points`` is built over all (rescaled) nodes, the full model's included; ``n_points=None``
        takes the papers' 50,000, or more where the nodes span so wide a range that the Gaussians
        would fall between grid points (:func:`~hessian_blocks.density.grid_points`).

        Blocks whose whole spectrum (largest minus smallest Ritz value) is narrower than two standard
        deviations of the broadening raise a :class:`BroadeningWarning` naming them and the fix: their
        densities are all about the same Gaussian, and their JS distances near 0 say nothing of their
        spectra.
        """
        nodes, weights = self.ritz()
        scales = full_scale = None
        full_nodes = full_weights = None
        if self.full is not None:
            full_nodes, full_weights = self.full.ritz()
        if rescale_rank is not None:
            refused = self.unrescalable(rescale_rank)
            if refused:
                listed = ", ".join(f"'{name}' ({why})" for name, why in list(refused.items())[:5])
                raise ValueError(f"rescale_rank={rescale_rank}: {len(refused)} of {len(self.names)} blocks cannot be "
                                 f"divided by their {rescale_rank}-th largest eigenvalue: {listed}"
                                 f"{' ...' if len(refused) > 5 else ''}; pass a smaller rescale_rank, or leave them "
                                 "out first (select() the blocks that unrescalable() does not list)")
            scales = kth_largest_eigenvalue(nodes, weights, self.sizes, rescale_rank)
            nodes = nodes / scales[:, None, None]
            if full_nodes is not None:
                full_scale = float(kth_largest_eigenvalue(full_nodes, full_weights, self.sizes.sum(), rescale_rank)[0])
                full_nodes = full_nodes / full_scale
        _warn_if_narrower_than_broadening(self.names, nodes, weights, sigma2, rescaled=rescale_rank is not None)
        if grid is None:
            pooled = [nodes.ravel()] + ([full_nodes.ravel()] if full_nodes is not None else [])
            pooled = np.concatenate(pooled)
            grid = spectral_grid(pooled, n_points=grid_points(pooled, sigma2) if n_points is None else n_points)
        densities = gaussian_density(nodes, weights, grid, sigma2)
        full = None if full_nodes is None else gaussian_density(full_nodes, full_weights, grid, sigma2)[0]
        return DensityResult(
            grid=grid, densities=densities, names=self.names, sigma2=sigma2,
            scales=scales, full=full, full_scale=full_scale,
        )

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (suffix added if missing) with all arrays and JSON metadata."""
        arrays = {"sizes": self.sizes, **_lanczos_arrays("lanczos", self.lanczos)}
        if self.full is not None:
            arrays.update(_lanczos_arrays("full", self.full))
        meta = {
            "names": self.names,
            "params": self.params,
            "shapes": [list(s) for s in self.shapes],
            "settings": self.settings,
        }
        return _write_npz(path, "hessian-blocks/spectrum", meta, arrays)

    @classmethod
    def load(cls, path: str | Path) -> SpectrumResult:
        """Read a file written by :meth:`save` (ValueError naming the file for anything else)."""
        meta, arrays = _read_npz(path, "hessian-blocks/spectrum")
        return _build_loaded(path, "hessian-blocks/spectrum", lambda: cls(
            names=meta["names"],
            params=meta["params"],
            shapes=[tuple(s) for s in meta["shapes"]],
            sizes=arrays["sizes"],
            lanczos=_lanczos_from("lanczos", arrays),
            settings=meta["settings"],
            full=_lanczos_from("full", arrays),
        ))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpectrumResult):
            return NotImplemented
        return (
            self.names == other.names
            and self.params == other.params
            and self.shapes == other.shapes
            and np.array_equal(self.sizes, other.sizes)
            and self.lanczos == other.lanczos
            and self.settings == other.settings
            and self.full == other.full
        )

