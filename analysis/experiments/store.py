"""Resumable experiment results: one JSON file per finished work unit, written atomically.

An experiment is a list of independent *work units* (one training run, one optimizer on one
quadratic, one model's spectra). :class:`ResultStore` keeps each finished unit as
``<folder>/<key>.json`` holding the unit's parameters and its record. Re-running an experiment
with the same store skips every unit whose file exists *with the same parameters* and computes the
rest, so a long run that was stopped resumes where it stopped; a unit whose parameters changed is
recomputed (its old file is replaced). Units computed from a model also store the model's
:func:`model_fingerprint` (a hash of its seeded initial state), and a stored unit whose fingerprint
differs, or that has none, is recomputed too: parameters alone would not notice that a newer version
builds or initialises the same-named model differently. Files are written to a temporary name and
renamed, so a run killed mid-write never leaves a half-written result.

Also here: the experiment sizes shared by every experiment ("small": CPU, seconds to minutes, used
by the tests and notebooks; "medium": what ``hessian-blocks figures`` commits; "paper": closer to
the papers' scale, for a GPU or a long CPU run).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from hessian_blocks.files import atomic_write_text

if TYPE_CHECKING:
    import torch

__all__ = ["SIZES", "ResultStore", "atomic_write_text", "check_size", "model_fingerprint", "params_key",
           "progress_bar"]

SIZES: tuple[str, ...] = ("small", "medium", "paper")

T = TypeVar("T")


def check_size(size: str) -> str:
    """Return ``size`` if it is one of SIZES, else raise a ValueError naming the choices."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    return size


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and tuples as plain JSON types (NaN and infinities stay: Python's json
    module writes and reads them back exactly)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def model_fingerprint(module: torch.nn.Module) -> str:
    """16 hex digits of a SHA-256 over a module's state (parameters and buffers): names, dtypes,
    shapes and values. Two builds of a model agree exactly when they hold the same initial state."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ResultStore:
    """A folder of finished work units (see the module docstring). ``folder=None``: keep nothing."""

    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder)

    def _path(self, key: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", key):
            raise ValueError(f"result key {key!r} may only hold letters, digits and _ . = + -")
        assert self.folder is not None
        return self.folder / f"{key}.json"

    def load(self, key: str, params: Mapping[str, Any], fingerprint: str | None = None) -> dict | None:
        """The stored record of ``key`` if it was computed with these ``params`` (and, when given, from
        a model with this ``fingerprint``), else None."""
        if self.folder is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("params") != _jsonable(params):
            return None
        if fingerprint is not None and stored.get("fingerprint") != fingerprint:
            return None
        return stored["record"]

    def save(self, key: str, params: Mapping[str, Any], record: Mapping[str, Any],
             fingerprint: str | None = None) -> None:
        """Store ``record`` (JSON-serialisable: numbers, strings, lists, dicts, numpy values) atomically."""
        if self.folder is None:
            return
        payload = {"key": key, "params": _jsonable(params), "record": _jsonable(record)}
        if fingerprint is not None:
            payload["fingerprint"] = fingerprint
        atomic_write_text(self._path(key), json.dumps(payload) + "\n")

    def run(self, key: str, params: Mapping[str, Any], compute: Callable[[], Mapping[str, Any]], *,
            fingerprint: str | None = None) -> dict:
        """The stored record of ``key`` (same ``params`` and model ``fingerprint``), or ``compute()``
        stored and returned."""
        record = self.load(key, params, fingerprint)
        if record is None:
            record = _jsonable(dict(compute()))
            self.save(key, params, record, fingerprint)
        return record

    def run_file(
        self, key: str, params: Mapping[str, Any], compute: Callable[[], T], *,
        save: Callable[[T, Path], Any], load: Callable[[Path], T], suffix: str, fingerprint: str | None = None,
    ) -> T:
        """Like :meth:`run` for results kept in their own file (e.g. a SpectrumResult ``.npz``).

        ``save(result, path)`` writes a temporary file that is renamed to ``<key><suffix>``; the
        JSON marker naming it is written afterwards, so an interrupted save is simply redone.
        """
        if self.folder is None:
            return compute()
        target = self._path(key).with_suffix(suffix)
        if self.load(key, params, fingerprint) is not None and target.exists():
            return load(target)
        result = compute()
        tmp = target.with_name(f".{target.stem}.tmp{suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        save(result, tmp)
        os.replace(tmp, target)
        self.save(key, params, {"file": target.name}, fingerprint)
        return result


def params_key(prefix: str, params: Mapping[str, Any]) -> str:
    """``prefix-<10 hex digits>``: a file-name key that changes whenever ``params`` change."""
    import hashlib

    digest = hashlib.sha256(json.dumps(_jsonable(params), sort_keys=True).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.=+-]", "_", prefix)
    return f"{safe}-{digest}"


def progress_bar(items: Iterable[T], *, total: int | None = None, desc: str, enabled: bool) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar on stderr (an ETA for long experiments), or as they are."""
    if not enabled:
        return items
    import sys

    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)
