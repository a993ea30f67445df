"""One training run of a zoo (or user) model with one optimizer; :func:`run_steps` is the training
loop every experiment, benchmark and training test shares.

The model is trained on a fixed list of offline batches (cycled in order), and evaluated on the
whole training list and on validation batches held out from the same source: the last 10 % of the
bundled text or of a data file, 10 % of the digits (``make_batches(split=...)``). Final losses are
measured without dropout but with the normalisation the model trains with: eval mode, except that
BatchNorm layers keep using batch statistics (for the bundled models, which have no dropout, this is
exactly training mode). The random number generator is seeded per run, so a model that draws random
numbers while training (dropout) gives the same numbers whatever ran before it.
A run records the loss at every step, the final train / validation loss, the optimizer-state bytes
and the mean wall-clock seconds per step (after the first step, which includes warm-up; NaN when
no later step ran).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import optim
from hessian_blocks import build_model, make_batches
from hessian_blocks.data import DATA_SOURCES, batch_to, call_model, samples_available
from hessian_blocks.guards import check_batches, check_device

from .store import ResultStore, model_fingerprint, params_key, progress_bar

__all__ = ["OPTIMIZERS", "PARTITIONED", "RUN_COLUMNS", "UNSTABLE_FACTOR", "TrainSetup", "best_runs", "make_optimizer",
           "mean_loss", "run_steps", "train_grid", "train_run", "unstable"]

OPTIMIZERS: tuple[str, ...] = optim.OPTIMIZERS  # the one registry (optim.make), re-exported for the experiments
PARTITIONED: tuple[str, ...] = optim.PARTITIONED  # the optimizers that take a partition


def make_optimizer(name: str, model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
                   partition="default") -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9), ``adamw``, ``adam_mini`` or ``galore_mini`` (its defaults: rank 1/4 of
    each matrix's smaller side, refresh every 200 steps, scale 0.25) through the project's ``optim.make``
    (no weight decay on norms and biases); ``partition`` ("default", a Partition or a partition file)
    applies to Adam-mini and GaLore-mini only."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    extra = {"partition": partition} if name in PARTITIONED else {}
    return optim.make(name, model, lr=lr, weight_decay=weight_decay, **extra)


@dataclass(frozen=True)
class TrainSetup:
    """What to train on: a model name (zoo or ``package.module:factory``), overrides and data."""

    model: str
    overrides: dict
    data: str = "auto"
    batch_size: int = 8
    train_batches: int = 8
    val_batches: int = 2
    validation_fraction: float = 0.1  # the part of the data source held out for the validation batches

    def build(self, seed: int):
        """(ModelSpec, train batches, validation batches); the model is seeded, float32. The two are
        drawn from disjoint parts of the data source (``make_batches(split=...)``). A source with
        fewer training samples than ``train_batches`` batches (the digits' training part holds 1617
        images) gives as many whole batches as it holds; a run cycles over them."""
        spec = build_model(self.model, seed=seed, **self.overrides)
        train_batches = self.train_batches
        available = samples_available(spec, self.data, split="train", validation_fraction=self.validation_fraction)
        if available is not None and available >= self.batch_size:
            train_batches = min(train_batches, available // self.batch_size)
        train, val = (make_batches(spec, self.data, batch_size=self.batch_size, n_batches=count, seed=seed,
                                   split=split, validation_fraction=self.validation_fraction)
                      for split, count in (("train", train_batches), ("validation", self.val_batches)))
        return spec, train, val

    def fingerprint(self, seed: int) -> str:
        """:func:`.store.model_fingerprint` of the model :meth:`build` makes for ``seed`` (stored with
        each run, so that a model built differently by a newer version is retrained, not read back).

        The model is built twice: a factory whose initial state is not a function of the seed (it draws
        from an unseeded generator) would give runs that no rerun reproduces, and is refused."""
        first, second = (model_fingerprint(build_model(self.model, seed=seed, **self.overrides).model)
                         for _ in range(2))
        if first != second:
            raise ValueError(f"{self.model}: two builds with seed {seed} have different initial parameters; "
                             "initialise the model from torch's default generator only (build_model seeds it) "
                             "or from a generator seeded inside the factory")
        return first

    def data_digest(self) -> str | None:
        """SHA-256 (16 hex digits) of the data file's contents, or None for a bundled source: stored with
        every run, so that a file changed in place is trained on again instead of read back."""
        path = Path(self.data)
        if self.data in ("auto", *DATA_SOURCES) or not path.is_file():
            return None
        return file_digest(path)


def file_digest(path: str | Path) -> str:
    """16 hex digits of the SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def mean_loss(spec, batches) -> float:
    """Sample-weighted mean loss without dropout: eval mode, except BatchNorm keeps batch statistics."""
    model = spec.model
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
    try:
        with torch.no_grad():
            total = sum(float(spec.loss_fn(call_model(model, x), y)) * len(y) for x, y in batches)
    finally:
        model.train()
    return total / sum(len(y) for _, y in batches)


def run_steps(model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, batches: list, steps: int, *,
              synchronize: Callable[[], None] | None = None,
              on_step: Callable[[int], Any] | None = None) -> tuple[list[float], list[float]]:
    """Train ``model`` in place for ``steps`` steps on ``batches`` (cycled in order).

    Returns the loss before each step and each step's wall-clock seconds (measured after
    ``synchronize``, e.g. ``torch.cuda.synchronize``). A non-finite loss stops the run: the
    remaining losses are NaN and no further step is timed. ``on_step(1)`` is called after every
    step (e.g. a progress bar's ``update``).
    """
    losses, times = [math.nan] * steps, []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(call_model(model, x), y)
        loss.backward()
        optimizer.step()
        if synchronize is not None:
            synchronize()
        times.append(time.perf_counter() - started)
        losses[step] = float(loss.detach())
        if on_step is not None:
            on_step(1)
        if not math.isfinite(losses[step]):
            break
    return losses, times


def train_run(setup: TrainSetup, optimizer: str, lr: float, steps: int, *, seed: int = 0,
              weight_decay: float = 0.0, partition="default", device: str = "cpu", progress: bool = False) -> dict:
    """Train ``steps`` steps on ``device``; return losses (per step), train_loss, val_loss,
    state_bytes, seconds_per_step and diverged (a non-finite loss stops the run; later losses NaN).
    On CUDA the step time is measured after synchronising the device. ``progress``: a bar over the
    steps on stderr (a paper-size run takes minutes)."""
    target = check_device(device)
    spec, train, val = setup.build(seed)
    spec.model.to(target).train()
    train = [(batch_to(x, target), batch_to(y, target)) for x, y in train]
    val = [(batch_to(x, target), batch_to(y, target)) for x, y in val]
    # every batch is checked before any step: NaN in a later training batch would otherwise look like a
    # diverging optimizer, in a validation batch like a NaN loss; labels that do not fit fail here, not mid-run
    # (the model runs on the first training batch only: a comparison draws one batch per step)
    check_batches(spec.model, spec.loss_fn, train, f"{setup.data}: training batch", forward_batches=1)
    check_batches(spec.model, spec.loss_fn, val, f"{setup.data}: validation batch")
    opt = make_optimizer(optimizer, spec.model, lr=lr, weight_decay=weight_decay, partition=partition)
    synchronize = torch.cuda.synchronize if target.type == "cuda" else None
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout masks and other draws while training: the same in every rerun
        with tqdm(total=steps, desc=f"{optimizer} lr {lr:g} seed {seed}", unit="step", disable=not progress,
                  file=sys.stderr, leave=False) as bar:
            losses, times = run_steps(spec.model, spec.loss_fn, opt, train, steps, synchronize=synchronize,
                                      on_step=bar.update)
        diverged = any(not math.isfinite(loss) for loss in losses)
        finals = (math.nan, math.nan) if diverged else (mean_loss(spec, train), mean_loss(spec, val))
    return {"losses": losses, "train_loss": finals[0], "val_loss": finals[1],
            "state_bytes": optim.state_memory(opt).total_bytes,
            "seconds_per_step": sum(times[1:]) / (len(times) - 1) if len(times) > 1 else math.nan,
            "diverged": diverged}


RUN_COLUMNS: tuple[str, ...] = ("train_loss", "val_loss", "state_bytes", "seconds_per_step", "diverged")
UNSTABLE_FACTOR = 2.0  # a run whose final training loss is above this many times its first step's is unstable


def unstable(record: Mapping[str, Any]) -> bool:
    """Whether a finished run ended far above where it started: its final training loss (``train_loss``,
    finite) is more than :data:`UNSTABLE_FACTOR` times the loss of its first step (e.g. 6.3 -> 940). A
    diverged run (a loss that stopped being finite) is not counted here but as ``diverged``."""
    first, final = record["losses"][0] if record["losses"] else math.nan, record["train_loss"]
    return bool(math.isfinite(first) and math.isfinite(final) and final > UNSTABLE_FACTOR * max(first, 0.0))


def train_grid(
    store: ResultStore, setups: Mapping[Hashable, TrainSetup], lrs: Mapping[str, Sequence[float]],
    seeds: Sequence[int], steps: int, *, key: Callable[[Hashable, str], str], device: str = "cpu",
    recorded: Callable[[str], Mapping[str, Any]] = lambda optimizer: {},
    options: Callable[[str], Mapping[str, Any]] = lambda optimizer: {},
    desc: str = "training", progress: bool = True,
) -> tuple[pd.DataFrame, list[dict]]:
    """Every (setup, optimizer, lr, seed) run of a grid through ``store``: (runs, records).

    ``setups`` maps a label (a model name, a level) to what to train; ``lrs`` maps each optimizer to
    its learning rates. A run's stored parameters are its setup, optimizer, lr, seed, steps, device,
    ``recorded(optimizer)`` and the data file's digest (for a file); its key is ``key(label,
    optimizer)`` plus their hash; it keeps the fingerprint of its seeded model (one check per label and
    seed). ``options(optimizer)`` are extra keyword arguments of :func:`train_run` (weight decay,
    partition). ``runs`` has one row per run: model (the label), optimizer, lr, seed,
    :data:`RUN_COLUMNS` and unstable (:func:`unstable`); ``records`` the stored records (with the per-step
    losses) in the same order.
    """
    fingerprints = {(label, seed): setup.fingerprint(seed) for label, setup in setups.items() for seed in seeds}
    data_digests = {label: setup.data_digest() for label, setup in setups.items()}
    units = [(label, opt, lr, seed) for label in setups for opt, grid in lrs.items() for lr in grid
             for seed in seeds]
    rows, records = [], []
    for label, opt, lr, seed in progress_bar(units, desc=desc, enabled=progress):
        setup = setups[label]
        params = {"setup": asdict(setup), "optimizer": opt, "lr": lr, "seed": seed, "steps": steps,
                  "device": device, **recorded(opt)}
        if data_digests[label] is not None:
            params["data_sha256"] = data_digests[label]
        record = store.run(params_key(key(label, opt), params), params,
                           lambda: train_run(setup, opt, lr, steps, seed=seed, device=device, progress=progress,
                                             **options(opt)),
                           fingerprint=fingerprints[label, seed])
        rows.append({"model": label, "optimizer": opt, "lr": lr, "seed": seed,
                     **{column: record[column] for column in RUN_COLUMNS}, "unstable": unstable(record)})
        records.append(record)
    return pd.DataFrame(rows), records


def best_runs(runs: pd.DataFrame, by: str = "train_loss") -> pd.DataFrame:
    """Per (model, optimizer): the lr with the lowest mean ``by`` over seeds. A diverged run's losses
    count as +inf, so an lr with a diverged seed has an infinite mean (it is chosen only when every lr
    has one). Columns: model, optimizer, lr, the seed-means of train_loss, val_loss, state_bytes and
    seconds_per_step, seeds (runs at that lr), diverged (how many of them diverged) and unstable (how many
    ended far above their start, :func:`unstable`)."""
    losses = {column: runs[column].where(~runs["diverged"], np.inf) for column in ("train_loss", "val_loss")}
    means = (runs.assign(**losses, seeds=1, diverged=runs["diverged"].astype(int),
                         unstable=runs["unstable"].astype(int))
             .groupby(["model", "optimizer", "lr"], sort=False)
             .agg({"train_loss": "mean", "val_loss": "mean", "state_bytes": "mean", "seconds_per_step": "mean",
                   "seeds": "sum", "diverged": "sum", "unstable": "sum"})
             .reset_index())
    best = means.sort_values(by, kind="stable").groupby(["model", "optimizer"], sort=False).head(1)
    return best.reset_index(drop=True)
