"""Near-block-diagonal Hessians: the dense Hessian of a small MLP and of a small GPT-2-style model.

For a few parameter tensors of each model at initialisation, the dense Hessian (one exact
Hessian-vector product per coordinate, ``analysis.hessian_map``) is laid out block by block with
the blocks of Adam-mini's default partition (per output neuron for the MLP's hidden weights; per
head for the query / key weights, per neuron for the value weights of GPT-2's first layer). The
table measures how block-diagonal it is: the share of the squared Frobenius norm inside the
diagonal blocks, against the share of entries they hold (what an unstructured matrix would give).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hessian_blocks.guards import check_device

from .store import ResultStore, check_size, model_fingerprint, params_key
from .zoo import zoo_models

__all__ = ["StructureConfig", "block_mass", "structure_experiment", "plot_structure"]


def block_mass(matrix: np.ndarray, boundaries: list[int]) -> tuple[float, float]:
    """(share of ``||H||_F^2`` in the diagonal blocks, share of the entries they hold).

    ``boundaries`` are the indices where each block after the first starts."""
    m = np.asarray(matrix, dtype=np.float64)
    edges = [0, *boundaries, m.shape[0]]
    inside = sum(float(np.square(m[a:b, a:b]).sum()) for a, b in zip(edges[:-1], edges[1:]))
    entries = sum((b - a) ** 2 for a, b in zip(edges[:-1], edges[1:]))
    return inside / float(np.square(m).sum()), entries / m.size


@dataclass(frozen=True)
class StructureConfig:
    """The two models, the tensors whose Hessian is mapped, and the data (``preset(size)``)."""

    mlp_overrides: dict = field(default_factory=lambda: dict(in_features=16, hidden_sizes=(8,), num_classes=4))
    mlp_params: tuple[str, ...] = ("hidden.0.weight",)
    gpt2_overrides: dict = field(default_factory=lambda: zoo_models("small", ("gpt2-nano",))["gpt2-nano"])
    gpt2_params: tuple[str, ...] = ("blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight",
                                    "blocks.0.attn.v_proj.weight")
    batch_size: int = 16
    n_batches: int = 1
    seed: int = 0
    device: str = "cpu"  # where the Hessian-vector products run (not part of the stored key: float64)

    @classmethod
    def preset(cls, size: str, **changes) -> "StructureConfig":
        check_size(size)
        base = {
            "small": dict(batch_size=8),
            "medium": dict(mlp_overrides=dict(in_features=32, hidden_sizes=(16,), num_classes=4), batch_size=32),
            "paper": dict(mlp_overrides=dict(in_features=64, hidden_sizes=(32,), num_classes=10), batch_size=64,
                          n_batches=4,
                          gpt2_overrides=dict(n_layer=2, n_embd=32, n_head=4, vocab_size=256, context=32)),
        }[size]
        return cls(**{**base, **changes})


def _save_map(hmap, path: Path) -> None:
    meta = {"blocks": hmap.blocks, "params": hmap.params, "boundaries": hmap.boundaries,
            "tensor_boundaries": hmap.tensor_boundaries}
    with open(path, "wb") as fh:
        np.savez(fh, matrix=hmap.matrix, meta=np.array(json.dumps(meta)))


def _load_map(path: Path):
    from analysis.hessian_map import HessianMap

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        return HessianMap(data["matrix"], meta["blocks"], meta["params"], meta["boundaries"],
                          meta["tensor_boundaries"])


def _measure(spec, tensors: tuple[str, ...], config: StructureConfig):
    import torch

    import optim
    from analysis.hessian_map import hessian_map
    from hessian_blocks import make_batches

    batches = make_batches(spec, batch_size=config.batch_size, n_batches=config.n_batches, seed=config.seed,
                           dtype=torch.float64)
    return hessian_map(spec.model, spec.loss_fn, batches, optim.default_partition(spec.model), params=list(tensors),
                       device=config.device)


def structure_experiment(config: StructureConfig, *, out: str | None = None, progress: bool = True):
    """(table, maps): per model the mapped tensors, coordinates, blocks, in-block share of the
    squared Frobenius norm and the share of entries in the blocks; ``maps`` model -> HessianMap."""
    from hessian_blocks import build_model

    check_device(config.device)
    store = ResultStore(out)
    maps, rows = {}, []
    for model, overrides, tensors in (("mlp", config.mlp_overrides, config.mlp_params),
                                      ("gpt2-nano", config.gpt2_overrides, config.gpt2_params)):
        params = {"model": model, "overrides": overrides, "tensors": tensors, "batch_size": config.batch_size,
                  "n_batches": config.n_batches, "seed": config.seed}
        spec = build_model(model, seed=config.seed, **overrides)
        hmap = store.run_file(params_key(f"hessian-{model}", params), params,
                              lambda: _measure(spec, tensors, config),
                              save=_save_map, load=_load_map, suffix=".npz", fingerprint=model_fingerprint(spec.model))
        inside, entries = block_mass(hmap.matrix, hmap.boundaries)
        maps[model] = hmap
        rows.append({"model": model, "tensors": ", ".join(tensors), "coordinates": hmap.matrix.shape[0],
                     "blocks": len(hmap.blocks), "in_block_mass": inside, "in_block_entries": entries,
                     "concentration": inside / entries})
    return pd.DataFrame(rows), maps


def plot_structure(hmap, title: str):
    """Heatmap of |H| with block (white) and tensor (red) boundaries."""
    from analysis.hessian_map import plot_hessian_blocks

    return plot_hessian_blocks(hmap.matrix, hmap.boundaries, major=hmap.tensor_boundaries, title=title)
