"""GaLore-mini: Adam-mini whose matrix states live in a low-rank subspace of the gradient.

For a 2-D weight ``W`` of shape ``[m, n]`` with gradient ``G``, GaLore-mini keeps an orthonormal
basis ``P`` of ``r`` directions of one side of ``G`` (the *projector*, recomputed from the current
gradient every ``update_proj_gap`` steps: at steps 1, 1 + gap, 1 + 2 gap, ...) and runs Adam-mini on
the projected gradient::

    right projection:  R = G P   [m, r]   (P: [n, r])      update  W -= scale * U P^T
    left projection:   R = P^T G [r, n]   (P: [m, r])      update  W -= scale * P U

where ``U`` is Adam-mini's step on ``R`` (first moment ``[m, r]`` / ``[r, n]``, one second moment
per block of ``R``; update rule: :mod:`optim.update`). Weight decay stays decoupled and acts on the
full weight. Moments are carried over a refresh unchanged (GaLore's choice).

How the partition's blocks map to ``R``: the side is chosen so that the partition's blocks survive.

- a rule of groups along axis 0 (rows: output neurons, heads, tokens) keeps the rows: right
  projection, and ``R`` gets the same row groups; groups along axis 1 keep the columns: left
  projection, same column groups;
- "whole": one block, the whole of ``R``; "elements": one block per entry of ``R`` (GaLore with Adam);
  for these the side is GaLore's shape rule: the shorter side is projected (right when ``m >= n``);
- groups along both axes merged (a version-2 rule ``"axis": [0, 1]``): not projected (plain Adam-mini).

So no block is ever lost or invented. The state is ``(m + n) * r`` numbers either way (moment plus
projector), and at a refresh both sides span the same best rank-``r`` approximation of ``G``.

Which parameters are projected: 2-D ones whose sides both have at least ``rank`` entries (``rank``
an int: a rank-``r`` basis of ``G`` needs ``r <= min(m, n)``, and for a smaller matrix any projection
would keep more numbers than plain Adam-mini, which it gets instead, e.g. a 10-class output head
under ``rank=32``), or every 2-D one (``rank`` a fraction in (0, 1]:
``r = round(fraction * min(m, n))``, at least 1). Parameter groups may set their own ``rank``; ``rank=None`` there means plain Adam-mini.
With ``project_embeddings=False`` the weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules (found
by type, so the model is needed) are not projected. Everything else gets plain Adam-mini.

Projectors: ``"svd"`` (``torch.linalg.svd``, in float32, float64 for float64 parameters;
deterministic on CPU) or ``"randomized"`` (a randomized range finder with power iterations, faster on
big matrices; its Gaussian test matrix comes from a generator seeded with ``(projector_seed,
parameter name, step)``, so resuming needs nothing but the saved step and seed).

Implementations: the plain parameters take AdamMini's paths (reference / foreach / fused); the
projected ones are updated by the reference loop when the group has ``foreach=False``, else by the
foreach path (never compiled: their low-rank buffers are new every step).

State per projected parameter: ``step``, ``exp_avg`` (projected shape), ``block_exp_avg_sq`` (one per
block of ``R``) and ``projector`` (``[n, r]`` or ``[m, r]``, in the first moment's dtype). The next
refresh follows from ``step`` and the group's ``update_proj_gap``, so a checkpoint resumes
bit-identically, projectors included.
"""  # noqa: E501 (docstring text: splitting the long line would change it)

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from hessian_blocks.blocks import Rule

from .adam_mini import AdamMini, Params, PartitionArg
from .hooks import ParamTransform, UpdateHook

__all__ = [
    "PROJECTION_DEFAULTS", "PROJECTORS", "RANDOMIZED_OVERSAMPLE", "RANDOMIZED_POWER_ITERATIONS", "choose_projection",
    "GaLoreMini", "Projection", "randomized_basis", "svd_basis"
]

PROJECTORS = ("svd", "randomized")
PROJECTION_DEFAULTS = dict(rank=0.25, update_proj_gap=200, scale=0.25, projector="svd", projector_seed=0)
RANDOMIZED_OVERSAMPLE = 8
RANDOMIZED_POWER_ITERATIONS = 2


@dataclass(frozen=True)
class Projection:
    """Which side of an ``[m, n]`` weight is projected, and onto how many directions."""

    side: str  # "right": R = G P, [m, r]; "left": R = P^T G, [r, n]
    rank: int
    shape: tuple[int, int]

    @property
    def projected_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (m, self.rank) if self.side == "right" else (self.rank, n)

    @property
    def projector_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (n if self.side == "right" else m, self.rank)

    def oriented(self, grad: torch.Tensor) -> torch.Tensor:
        """The matrix whose column space the projector spans (``G^T`` for right, ``G`` for left)."""
        return grad.mT if self.side == "right" else grad

    def project(self, grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
        return grad @ projector if self.side == "right" else projector.mT @ grad

    def project_back(self, low_rank: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
        return low_rank @ projector.mT if self.side == "right" else projector @ low_rank

    def key(self) -> list:
        """As plain data, for state dicts."""
        return [self.side, self.rank]


def choose_projection(rule: Rule, shape: tuple[int, ...], rank: int | float | None) -> Projection | None:
    """The projection of a parameter of ``shape`` under ``rule`` (see the module docstring), or None
    for plain Adam-mini (not 2-D, ``rank`` None, an int ``rank`` above ``min(shape)``, or groups along
    merged axes, which no projection keeps)."""
    if rank is None or len(shape) != 2 or rule.merged:
        return None
    m, n = shape
    if rule.split == "groups":
        side = "right" if rule.axis % 2 == 0 else "left"  # keep the grouped axis
    else:
        side = "right" if m >= n else "left"
    if isinstance(rank, float):
        rank = max(1, round(rank * min(m, n)))
    elif rank > min(m, n):
        return None
    return Projection(side, rank, (m, n))


def svd_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` left singular vectors of ``matrix`` (``[rows, rank]``), by a full SVD."""
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def randomized_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """An approximation of :func:`svd_basis` by a randomized range finder (Halko, Martinsson and
    Tropp 2011): a Gaussian sketch with a few extra columns, power iterations, then an exact SVD of
    the small projected matrix."""
    rows, cols = matrix.shape
    width = min(rank + RANDOMIZED_OVERSAMPLE, rows, cols)
    sketch = matrix @ torch.randn(cols, width, generator=generator, dtype=matrix.dtype, device=matrix.device)
    for _ in range(RANDOMIZED_POWER_ITERATIONS):
        sketch = matrix @ (matrix.mT @ torch.linalg.qr(sketch).Q)
    basis = torch.linalg.qr(sketch).Q
    small_u, _, _ = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return basis @ small_u[:, :rank]


class GaLoreMini(AdamMini):
    """GaLore-mini over the blocks of a partition (see the module docstring): AdamMini with a
    :class:`GaLoreHook` (the declared extension point of :mod:`optim.hooks`).

    Args: those of :class:`~optim.AdamMini`, and

        rank: directions kept per projected weight: an int (weights with a side shorter than
            ``rank`` stay plain Adam-mini), or a fraction in (0, 1] of the weight's smaller
            dimension (default 0.25). A group may set ``rank=None``: plain Adam-mini.
        update_proj_gap: steps between projector refreshes (GaLore's T, default 200).
        scale: factor on the projected-back update (GaLore's alpha, default 0.25).
        projector: "svd" or "randomized".
        projector_seed: seed of the randomized range finder.
        project_embeddings: whether weights of embedding modules are projected (False needs the model).

    ``rank``, ``update_proj_gap``, ``scale``, ``projector`` and ``projector_seed`` are param-group
    options; each group records its parameters' projections (``[side, rank]`` or None) under
    ``"projections"``.
    """

    def __init__(
        self,
        params: Params,
        partition: PartitionArg = "default",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int | float | None = PROJECTION_DEFAULTS["rank"],
        update_proj_gap: int = PROJECTION_DEFAULTS["update_proj_gap"],
        scale: float = PROJECTION_DEFAULTS["scale"],
        projector: str = PROJECTION_DEFAULTS["projector"],
        projector_seed: int = PROJECTION_DEFAULTS["projector_seed"],
        project_embeddings: bool = True,
        model: nn.Module | None = None,
        **adam_mini_options: Any,
    ):
        if adam_mini_options.get("state_dtype") == torch.int8 or adam_mini_options.get("stochastic_rounding"):
            raise ValueError(
                "GaLoreMini keeps its first moments in the low-rank space (already a fraction of the parameter's size) "
                "and writes projected updates itself: state_dtype=torch.int8 and stochastic_rounding are AdamMini "
                "options; use state_dtype=torch.bfloat16 here, or AdamMini"
            )
        types_from = params if isinstance(params, nn.Module) else model
        if not project_embeddings and types_from is None:
            raise ValueError(
                "project_embeddings=False finds embeddings by module type and needs the model: pass it as params or "
                "model="
            )
        unprojected = set() if project_embeddings else {
            id(p)
            for module in types_from.modules()
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
            for p in module.parameters(recurse=False)
        }
        options = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, projector=projector,
                       projector_seed=projector_seed)
        hook = GaLoreHook(options, unprojected)
        super().__init__(params, partition, lr, betas, eps, weight_decay, model=model, hook=hook, **adam_mini_options)

    def projection(self, param: torch.Tensor) -> Projection | None:
        """How ``param`` is projected (None: plain Adam-mini)."""
        transform = self._transforms.get(param)
        return None if transform is None else transform.projection


class GaLoreHook(UpdateHook):
    """GaLore-mini's hook: the projection options as param-group options, a :class:`Projection` for
    every 2-D parameter that :func:`choose_projection` projects (not those in ``unprojected``, ids)."""

    group_key = "projections"

    def __init__(self, defaults: dict[str, Any], unprojected: set[int]):
        super().__init__(defaults)
        self.unprojected = unprojected

    def check_group(self, group: dict[str, Any]) -> None:
        _check_projection_options(group)

    def transform(self, group: dict[str, Any], name: str, param: torch.Tensor, rule: Rule) -> _LowRank | None:
        rank = None if id(param) in self.unprojected else group["rank"]
        projection = choose_projection(rule, tuple(param.shape), rank)
        return None if projection is None else _LowRank(projection)


class _LowRank(ParamTransform):
    """Adam-mini on the projected gradient; the step projected back, scaled, onto the weight."""

    def __init__(self, projection: Projection):
        self.projection = projection
        self.shape = projection.projected_shape

    def key(self) -> list:
        return self.projection.key()

    def extra_state(self, param: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"projector": torch.zeros(self.projection.projector_shape, dtype=dtype, device=param.device)}

    def gradient(self, group: dict[str, Any], name: str, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """The projected gradient, the projector refreshed first when due (steps 1, 1 + gap, ...)."""
        step = int(state["step"].item())
        if (step - 1) % group["update_proj_gap"] == 0:
            state["projector"].copy_(self._basis(group, name, grad, step))
        return self.projection.project(grad, state["projector"])

    def apply(self, param: torch.Tensor, state: dict[str, Any], step: torch.Tensor, decay: float,
              group: dict[str, Any]) -> None:
        if decay != 1.0:
            param.mul_(decay)
        param.add_(self.projection.project_back(step, state["projector"]), alpha=group["scale"])

    def _basis(self, group: dict[str, Any], name: str, grad: torch.Tensor, step: int) -> torch.Tensor:
        matrix = self.projection.oriented(grad).to(torch.promote_types(grad.dtype, torch.float32))
        if group["projector"] == "svd":
            return svd_basis(matrix, self.projection.rank)
        generator = torch.Generator(device=grad.device)
        generator.manual_seed(_refresh_seed(group["projector_seed"], name, step))
        return randomized_basis(matrix, self.projection.rank, generator)


def _refresh_seed(seed: int, name: str, step: int) -> int:
    """A seed for the randomized range finder at ``step`` of parameter ``name`` (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 65_537 + step) % (2**63)


def _check_projection_options(group: dict[str, Any]) -> None:
    rank, gap = group["rank"], group["update_proj_gap"]
    checks = {
        "rank": rank is None
        or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)
        or (isinstance(rank, float) and 0.0 < rank <= 1.0 and math.isfinite(rank)),
        "update_proj_gap": isinstance(gap, int) and not isinstance(gap, bool) and gap >= 1,
        "scale": isinstance(group["scale"], (int, float)) and group["scale"] > 0,
        "projector": group["projector"] in PROJECTORS,
        "projector_seed": isinstance(group["projector_seed"], int),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(
            f"invalid GaLoreMini option(s) {bad}: need rank an int >= 1, a fraction in (0, 1] or None, "
            f"update_proj_gap an int >= 1, scale > 0, projector one of {PROJECTORS}, projector_seed an int; "
            f"got rank={rank!r}, update_proj_gap={gap!r}, scale={group['scale']!r}, projector={group['projector']!r}, "
            f"projector_seed={group['projector_seed']!r}"
        )
