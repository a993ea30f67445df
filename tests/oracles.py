"""Independent references for the tests: dense Hessians, losses with a planted Hessian, and the
paper's partition written by hand.

The dense Hessian comes from ``torch.autograd.functional.hessian`` (reverse-over-reverse, one
backward per column). ``torch.func.hessian`` is not used: in torch 2.13 it returns a non-symmetric,
wrong matrix for models with LayerNorm (the cross terms between the LayerNorm weight and the
parameters feeding its input; see ``test_hvp.py::test_layer_norm_cross_terms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class DenseHessian:
    matrix: torch.Tensor          # [N, N] float64 over every parameter, flattened in named_parameters order
    offsets: dict[str, int]       # where each parameter starts

    def restrict(self, blocks, block_diagonal: bool) -> torch.Tensor:
        """The dense matrix on the blocks' coordinates, in BlockHessian layout order."""
        index = torch.cat([self.offsets[b.param] + b.flat_indices() for b in blocks])
        sub = self.matrix[index][:, index]
        if not block_diagonal:
            return sub
        ids = torch.cat([torch.full((b.numel,), i) for i, b in enumerate(blocks)])
        return sub * (ids[:, None] == ids[None, :])


def dense_hessian(model, loss_fn, batches) -> DenseHessian:
    """Dense float64 Hessian of the sample-weighted mean loss over ``batches``."""
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    names = list(params)
    sizes = [params[n].numel() for n in names]
    total = sum(int(y.shape[0]) for _, y in batches)

    def loss_of(flat):
        state = {**buffers, **params}
        for name, piece in zip(names, flat.split(sizes)):
            state[name] = piece.reshape(params[name].shape)
        value = 0.0
        for x, y in batches:
            y = y.double() if y.is_floating_point() else y
            if isinstance(x, dict):  # keyword inputs (Hugging Face models)
                output = torch.func.functional_call(model, state, (), x)
            else:
                output = torch.func.functional_call(model, state, (x.double() if x.is_floating_point() else x,))
            value = value + y.shape[0] * loss_fn(output, y)
        return value / total

    flat = torch.cat([params[n].reshape(-1) for n in names])
    with sdpa_kernel([SDPBackend.MATH]):
        matrix = torch.autograd.functional.hessian(loss_of, flat)
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    return DenseHessian(matrix, dict(zip(names, starts)))


def planted_block_diagonal(n: int, groups, generator: torch.Generator) -> torch.Tensor:
    """[n, n] symmetric positive definite matrix, dense inside each index group, zero between groups."""
    a = torch.zeros(n, n, dtype=torch.float64)
    for g in groups:
        root = torch.rand(len(g), len(g), generator=generator, dtype=torch.float64)
        a[g[:, None], g[None, :]] = root @ root.T + 0.1 * torch.eye(len(g), dtype=torch.float64)
    return a


def planted_loss(matrices: dict):
    """Loss 0.5 * theta^T A theta of the model outputs ``out[name]`` (a parameter times a constant),
    so the Hessian of parameter ``name`` is ``matrices[name]`` times that constant squared."""

    def loss(out, y):
        return sum(0.5 * out[n].reshape(-1) @ matrices[n] @ out[n].reshape(-1) for n in matrices) + 0 * y.sum()

    return loss


def hand_written_partition(model, table: dict[str, dict]) -> dict[str, dict]:
    """The paper's partition of ``model`` written by hand, as the official implementation reads names:
    biases one block per element, every other parameter by the longest matching name suffix in ``table``
    (``{"q_proj.weight": {"split": "groups", "axis": 0, "size": 8}, ...}``); rules as partition-file dicts."""
    rules = {}
    for name, _ in model.named_parameters():
        if name.endswith("bias"):
            rules[name] = {"param": name, "split": "elements"}
            continue
        suffix = max((key for key in table if name == key or name.endswith("." + key)), key=len, default=None)
        assert suffix is not None, f"no hand-written rule for {name}"
        rules[name] = {"param": name, **table[suffix]}
    return rules
