"""Exact Hessian-vector products of a dataset loss, restricted to parameter blocks.

The loss is the sample-weighted mean over a fixed list of batches,

    L(theta) = sum_i n_i * loss(model(x_i; theta), y_i) / sum_i n_i,

with n_i the number of samples in batch i (the leading dimension of its targets) and ``loss``
the batch mean. :class:`BlockHessian` lays the coordinates of the selected blocks out one after
another (P coordinates) and offers two products on [K, P] tensors of K vectors:

* :meth:`BlockHessian.block_matvec`: block-diagonal product, H_bb v_b for every block b (a
  vector whose part v_b is zero costs nothing for block b: one vector may carry independent probes
  of many blocks, and each block's product is computed only where its part is non-zero);
* :meth:`BlockHessian.matvec`: the Hessian restricted to all selected coordinates (the full-model
  Hessian when every parameter is selected).

Two strategies give the same numbers. Both take the (block, vector) pairs of one parameter together,
in chunks sized to a memory budget (a chunk never spans two parameters, so no pair pays for work below
its parameter's layer or for another parameter's products), each vector masked to its block:

* ``"loop"``: the papers' method (reverse-over-reverse). One forward and one backward with
  ``create_graph`` per batch, shared by every pair; then one backward of the gradient per chunk,
  vectorised over its pairs (``torch.autograd.grad(..., is_grads_batched=True)``), which autograd
  prunes to the part of the graph that leads to the parameter.
* ``"vmap"``: forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) vectorised with
  ``torch.func.vmap`` over the chunk's tangents; the forward and gradient pass is redone per chunk.

``"auto"`` picks by device (:data:`AUTO_STRATEGY`): the loop on both the CPU (vmap is 1.5-3x slower
there) and CUDA (it shares one forward and gradient pass among all chunks, where vmap redoes it per
parameter; benchmarks/gpu_proof.py's ``hvp_sweep_gpt2_small`` part measures both). When vmap cannot run
a model (an ``autograd.Function`` without ``setup_context``, an operation without a batching rule),
``"auto"`` falls back once, with a :class:`VectorizationWarning` naming the module: from vmap to the
loop, from the loop's vectorised backward to one pair per backward. Float32 products run without TF32
(:func:`~hessian_blocks.guards.full_float32_precision`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from .batching import batch_to
from .blocks import Block, Partition
from .choices import STRATEGIES
from .guards import (
    HessianSetupError,
    check_eval_mode,
    check_gradients,
    check_precision,
    check_same_loss,
    explain_double_backward_failure,
    failing_module,
    full_float32_precision,
    twice_differentiable_attention,
)

# How autograd reports an operation without a second (or forward-mode) derivative.
# An operation that drops out of the graph under create_graph (once_differentiable) leaves the
# gradient with no path back to the parameters: autograd reports the parameter as unused.
_MISSING_DERIVATIVE = re.compile(
    r"derivative for .* is not implemented|forward AD .* not been implemented|double backward|differentiate twice"
    r"|appears to not have been used in the graph|does not require grad and does not have a grad_fn",
    re.S,
)
# How functorch reports a model that vmap cannot run (an autograd.Function without setup_context, an
# operation it cannot batch): vectorized products then fall back (see BlockHessian._run).
_VMAP_FAILURE = re.compile(r"functorch|vmap|setup_context|[Bb]atched ?[Tt]ensor|[Bb]atching rule")
AUTO_STRATEGY = {"cpu": "loop", "cuda": "loop"}
"""The strategy ``"auto"`` picks on each device type (see the module docstring)."""
CPU_CHUNK_BYTES = 256 * 1024**2
"""Memory one vectorized call may use on the CPU when no ``memory_budget`` is given. Vectorizing pays on the
CPU where a pair's work is small (the overhead per call dominates: a 2-layer width-16 GPT, 2x faster); where
a pair's activations are tens of MB, bigger batches only cost (GPT2-nano, 10 probes: chunks of 1, 2, 5, 10
pairs 43, 41, 43, 48 s): this budget keeps those one or two pairs per call."""
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Batch = tuple[Any, torch.Tensor]


class VectorizationWarning(UserWarning):
    """vmap cannot run the model, so the products fall back to a slower way (see :class:`BlockHessian`)."""


@dataclass
class Layout:
    """Where each selected block's coordinates sit in the concatenated vector of length P."""

    blocks: list[Block]
    offsets: list[int]                    # start of block b in the concatenated vector
    block_ids: torch.Tensor                # [P] block id of every coordinate
    params: list[str]                     # parameters touched, in order of first appearance
    positions: dict[str, torch.Tensor]    # param -> positions in the concatenated vector
    flat: dict[str, torch.Tensor]         # param -> flat indices in the parameter, aligned with positions
    block_of: dict[str, torch.Tensor]     # param -> [numel] id of the block holding each entry (-1: none)
    block_flat: list[torch.Tensor]        # block -> flat indices in its parameter

    @classmethod
    def of(cls, blocks: Sequence[Block], device: torch.device) -> Layout:
        if not blocks:
            raise ValueError("no blocks selected: select at least one block")
        offsets, block_ids, positions, flat, block_flat = [], [], {}, {}, []
        block_of: dict[str, torch.Tensor] = {}
        offset = 0
        for b, block in enumerate(blocks):
            indices = block.flat_indices()
            if block.param not in block_of:
                block_of[block.param] = torch.full((int(np.prod(block.param_shape)),), -1, dtype=torch.long)
            if (block_of[block.param][indices] >= 0).any():
                raise ValueError(f"block '{block.name}' overlaps a block selected before it (or is selected twice)")
            block_of[block.param][indices] = b
            offsets.append(offset)
            block_ids.append(torch.full((len(indices),), b, dtype=torch.long))
            positions.setdefault(block.param, []).append(torch.arange(offset, offset + len(indices)))
            flat.setdefault(block.param, []).append(indices)
            block_flat.append(indices.to(device))
            offset += len(indices)
        return cls(
            blocks=list(blocks),
            offsets=offsets,
            block_ids=torch.cat(block_ids).to(device),
            params=list(positions),
            positions={p: torch.cat(v).to(device) for p, v in positions.items()},
            flat={p: torch.cat(v).to(device) for p, v in flat.items()},
            block_of={p: v.to(device) for p, v in block_of.items()},
            block_flat=block_flat,
        )

    @property
    def size(self) -> int:
        return int(self.block_ids.numel())

    def block_range(self, b: int) -> slice:
        return slice(self.offsets[b], self.offsets[b] + self.blocks[b].numel)

    def scatter(self, vectors: torch.Tensor, param: str) -> torch.Tensor:
        """[K, P] -> [K, numel(param)]: the param's selected entries, zeros elsewhere."""
        out = vectors.new_zeros(vectors.shape[0], self.block_of[param].numel())
        return out.index_copy_(1, self.flat[param], vectors[:, self.positions[param]])

    def add_gathered(self, result: torch.Tensor, param: str, values: torch.Tensor) -> None:
        """result[:, positions(param)] += values[:, flat(param)] for values of shape [K, numel(param)]."""
        result[:, self.positions[param]] += values[:, self.flat[param]]


class BlockHessian:
    """Exact Hessian of a dataset loss, restricted to blocks of a model's parameters.

    Args:
        model: any ``nn.Module``; it is not modified (its parameters are copied in ``dtype``).
        loss_fn: ``loss_fn(model_output, targets) -> scalar`` mean over the batch.
        batches: (inputs, targets) pairs; inputs are a tensor, a tuple of positional tensors or a
            dict of keyword tensors. Read once into a list, so every pass sees the same batches
            (a shuffling DataLoader is frozen to one order).
        blocks: a :class:`Partition`, a list of its blocks, or None for one block per tensor.
        dtype: precision of parameters, floating inputs and vectors (float64 by default).
        device: where to compute (default: the model's device).
        strategy: "auto", "loop" or "vmap" (see the module docstring).
        chunk_size: (block, vector) pairs (or vectors, for :meth:`matvec`) per vectorised call; default
            from ``memory_budget``; 1 computes one pair per backward (the loop before vectorising).
        memory_budget: bytes one vectorised call may use (default: half the free CUDA memory, or
            :data:`CPU_CHUNK_BYTES` on the CPU).
        check: run the guards (eval mode, determinism, gradients present and finite, second
            derivatives available) before the first product, and warn once (:class:`PrecisionWarning`)
            when the forward computes parameter-dependent values in a lower precision than ``dtype``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Batch],
        blocks: Partition | Sequence[Block] | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        strategy: str = "auto",
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        check: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        self.model = model
        self.loss_fn = loss_fn
        self.dtype = dtype
        first = next(iter(model.parameters()), None)
        if first is None:
            raise ValueError(f"{type(model).__name__} has no parameters")
        self.device = torch.device(device) if device is not None else first.device
        self.batches = [self._prepare_batch(batch, i) for i, batch in enumerate(batches)]
        if not self.batches:
            raise ValueError("no batches given: the loss needs at least one (inputs, targets) batch")
        counts = [int(targets.shape[0]) for _, targets in self.batches]
        self.n_samples = sum(counts)
        self.weights = [c / self.n_samples for c in counts]

        if blocks is None:
            blocks = Partition.per_tensor(model)
        block_list = list(blocks.blocks if isinstance(blocks, Partition) else blocks)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        for block in block_list:
            if shapes.get(block.param) != block.param_shape:
                raise ValueError(
                    f"block '{block.name}' refers to parameter '{block.param}' of shape {block.param_shape}, "
                    f"but the model has {shapes.get(block.param, 'no such parameter')}"
                )
        self.layout = Layout.of(block_list, self.device)
        self.params = {name: p.detach().to(self.device, dtype) for name, p in model.named_parameters()}
        self.buffers = {name: batch_to(b.detach(), self.device, dtype) for name, b in model.named_buffers()}
        self._requested = strategy
        self.strategy = AUTO_STRATEGY[self.device.type] if strategy == "auto" else strategy
        self._batch_pairs = True  # False once vmap failed on the loop's batched backward: one pair at a time
        self._chunk_size = chunk_size
        self._memory_budget = memory_budget
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if check:
            self.check()

    # ----------------------------------------------------------------- public products
    @property
    def blocks(self) -> list[Block]:
        return self.layout.blocks

    @property
    def n_batches(self) -> int:
        """Number of batches in the loss."""
        return len(self.batches)

    @property
    def size(self) -> int:
        """Number of selected coordinates P."""
        return self.layout.size

    @property
    def block_ids(self) -> torch.Tensor:
        """[P] block id of every coordinate (what batched Lanczos needs)."""
        return self.layout.block_ids

    def block_matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """H_bb v_b for every selected block b, for each row of ``vectors`` ([K, P] or [P])."""
        return self._apply(vectors, block_diagonal=True)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """The Hessian on all selected coordinates times each row of ``vectors`` ([K, P] or [P])."""
        return self._apply(vectors, block_diagonal=False)

    def loss(self) -> float:
        """The dataset loss at the model's parameters."""
        total = 0.0
        with torch.no_grad(), twice_differentiable_attention():
            for weight, (inputs, targets) in zip(self.weights, self.batches):
                total += weight * self._loss(self.params, inputs, targets).item()
        return total

    def gradient(self) -> torch.Tensor:
        """[P] gradient of the dataset loss on the selected coordinates."""
        result = torch.zeros(1, self.size, dtype=self.dtype, device=self.device)
        names = self.layout.params
        with twice_differentiable_attention():
            for weight, (inputs, targets) in zip(self.weights, self.batches):
                leaves = self._leaves(names)
                grads = torch.autograd.grad(self._loss(leaves, inputs, targets), [leaves[n] for n in names])
                for name, grad in zip(names, grads):
                    self.layout.add_gathered(result, name, weight * grad.reshape(1, -1))
        return result[0]

    def linear_operator(self, kind: str = "full") -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for ``eigsh`` and friends.

        ``kind="full"`` (default): the Hessian on all selected coordinates (:meth:`matvec`; the
        full-model Hessian when every parameter is selected). ``kind="block_diagonal"``: only its
        diagonal blocks H_bb (:meth:`block_matvec`), whose eigenvalues are those of the blocks, not
        of the Hessian.
        """
        products = {"full": self.matvec, "block_diagonal": self.block_matvec}
        if kind not in products:
            raise ValueError(f"kind must be 'full' (the Hessian) or 'block_diagonal' (its diagonal blocks only), "
                             f"got {kind!r}")
        apply = products[kind]

        def matmat(x: np.ndarray) -> np.ndarray:
            vectors = torch.as_tensor(np.asarray(x).T, dtype=self.dtype, device=self.device)
            return apply(vectors.reshape(-1, self.size)).T.cpu().double().numpy()

        return LinearOperator(
            (self.size, self.size), matvec=lambda x: matmat(x.reshape(-1, 1))[:, 0], matmat=matmat,
            rmatvec=lambda x: matmat(x.reshape(-1, 1))[:, 0], dtype=np.float64,
        )

    def check(self) -> None:
        """Run the guards on the first batch (see :mod:`hessian_blocks.guards`)."""
        check_eval_mode(self.model)
        inputs, targets = self.batches[0]
        names = self.layout.params
        with twice_differentiable_attention():
            first = self._loss(self.params, inputs, targets).detach()
            leaves = self._leaves(names)
            second = self._loss(leaves, inputs, targets)
            check_same_loss(first, second.detach())
            grads = torch.autograd.grad(second, [leaves[n] for n in names], allow_unused=True)
        check_gradients(names, list(grads))
        probe = torch.ones(1, self.size, dtype=self.dtype, device=self.device)
        self._run(lambda: self._block_diagonal(probe, self.batches[:1], [1.0], first_only=True))
        if not getattr(self, "_precision_checked", False):  # one forward, one PrecisionWarning per BlockHessian
            self._precision_checked = True
            with twice_differentiable_attention():
                check_precision(self.model, lambda: self._loss(self._leaves(names), inputs, targets), self.dtype,
                                stacklevel=3)

    # ----------------------------------------------------------------- internals
    def _apply(self, vectors: torch.Tensor, *, block_diagonal: bool) -> torch.Tensor:
        single = vectors.dim() == 1
        vectors = vectors.reshape(-1, self.size) if single else vectors
        if vectors.shape[-1] != self.size:
            raise ValueError(f"vectors must have {self.size} columns (selected coordinates), got shape "
                             f"{tuple(vectors.shape)}")
        vectors = vectors.to(self.device, self.dtype)
        run = self._block_diagonal if block_diagonal else self._full
        out = self._run(lambda: run(vectors, self.batches, self.weights))
        return out[0] if single else out

    def _run(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()`` with autograd's errors explained. When vmap cannot run the model (an operation
        without a batching rule, an autograd.Function without ``setup_context``), an ``auto`` strategy
        falls back, once and with a :class:`VectorizationWarning`: from ``vmap`` to the loop, from
        products batched over (block, vector) pairs to one pair at a time; ``vmap`` asked for is an error."""
        while True:
            try:
                return self._with_explained_errors(run)
            except (RuntimeError, NotImplementedError) as err:
                vectorized = self.strategy == "vmap" or self._batch_pairs
                if not vectorized or not _VMAP_FAILURE.search(str(err)):
                    raise
                self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        where = self._vmap_failure_module()
        place = f" in {where}" if where else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if self.strategy == "vmap" and self._requested == "vmap":
            raise HessianSetupError(
                f"strategy 'vmap' cannot run this model: vmap fails{place} ({reason}). Use strategy='loop' "
                "(--strategy loop), which needs no forward-mode derivatives, or make that module's "
                "autograd.Function define setup_context (see torch.func's 'Extending torch.func with "
                "autograd.Function')"
            ) from err
        if self.strategy == "vmap":
            self.strategy, what = "loop", "computing the products with the loop strategy instead"
        else:
            self._batch_pairs, what = False, "computing one (block, vector) product at a time instead (slower)"
        warnings.warn(f"vmap cannot run this model{place} ({reason}); {what}. For vectorized products, make that "
                      "module vmap-compatible (an autograd.Function needs setup_context)",
                      VectorizationWarning, stacklevel=5)

    def _vmap_failure_module(self) -> str | None:
        """The module whose forward fails under vmap (e.g. one applying an autograd.Function without
        setup_context), found by one vmapped forward-mode product on the first batch; None if it runs."""
        inputs, targets = self.batches[0]
        name = self.layout.params[0]
        tangent = {name: torch.zeros(1, *self.params[name].shape, dtype=self.dtype, device=self.device)}
        return failing_module(self.model, lambda: self._vmapped_hvp([name], tangent, inputs, targets))

    def _with_explained_errors(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        try:
            with twice_differentiable_attention(), full_float32_precision():
                return run()
        except (RuntimeError, NotImplementedError) as err:
            if _MISSING_DERIVATIVE.search(str(err)):
                raise explain_double_backward_failure(err) from err
            raise

    def _block_diagonal(self, vectors: torch.Tensor, batches: list[Batch], weights: list[float],
                        first_only: bool = False) -> torch.Tensor:
        """H_bb v_b of every active (block, vector) pair, the pairs in chunks (see :meth:`_pair_chunks`).

        The loop (the papers' method): one forward and one backward with ``create_graph`` per batch,
        shared by every pair; then one backward of the gradient per chunk, vectorized over its pairs
        (``is_grads_batched``). vmap: forward-over-reverse per chunk, vectorized over its pairs.
        ``first_only``: only the first chunk of the first batch (what the guards try)."""
        result = torch.zeros_like(vectors)
        chunks = self._pair_chunks(vectors)
        for weight, (inputs, targets) in zip(weights, batches):
            leaves, grads = (None, None) if self.strategy == "vmap" else self._first_derivatives(inputs, targets)
            for chunk in chunks:
                names, masks, tangents, vector_ids = self._masked_tangents(chunk, vectors)
                if self.strategy == "vmap":
                    products = self._vmapped_hvp(names, tangents, inputs, targets)
                else:
                    products = self._second_derivatives(leaves, grads, names, tangents)
                for name in names:
                    masked = products[name].reshape(len(chunk), -1) * masks[name]
                    per_vector = masked.new_zeros(vectors.shape[0], masked.shape[1]).index_add_(0, vector_ids, masked)
                    self.layout.add_gathered(result, name, weight * per_vector)
                if first_only:
                    return result
        return result

    def _full(self, vectors: torch.Tensor, batches: list[Batch], weights: list[float]) -> torch.Tensor:
        """The Hessian on all selected coordinates times every vector, the vectors in chunks."""
        layout, result = self.layout, torch.zeros_like(vectors)
        names = layout.params
        size = self._pairs_per_chunk(names)
        chunks = [list(range(start, min(start + size, vectors.shape[0])))
                  for start in range(0, vectors.shape[0], size)]
        for weight, (inputs, targets) in zip(weights, batches):
            leaves, grads = (None, None) if self.strategy == "vmap" else self._first_derivatives(inputs, targets)
            for chunk in chunks:
                rows = vectors[chunk]
                tangents = {n: layout.scatter(rows, n).reshape(len(chunk), *self.params[n].shape) for n in names}
                if self.strategy == "vmap":
                    products = self._vmapped_hvp(names, tangents, inputs, targets)
                else:
                    products = self._second_derivatives(leaves, grads, names, tangents)
                part = torch.zeros_like(rows)
                for name in names:
                    layout.add_gathered(part, name, weight * products[name].reshape(len(chunk), -1))
                result[chunk] += part
        return result

    def _first_derivatives(self, inputs: Any, targets: torch.Tensor) -> tuple[dict, dict]:
        """(leaves, gradients): the selected parameters as leaves and the batch loss's gradient with respect
        to each, with ``create_graph`` (the graph every second derivative of the batch goes back through)."""
        names = self.layout.params
        leaves = self._leaves(names)
        grads = torch.autograd.grad(self._loss(leaves, inputs, targets), [leaves[n] for n in names], create_graph=True)
        return leaves, dict(zip(names, grads))

    def _second_derivatives(self, leaves: dict, grads: dict, names: list[str], tangents: dict) -> dict:
        """For each of the ``C`` tangents (``tangents[n]``: ``[C, *shape]``): the product of the Hessian rows of
        ``names`` with it, by one backward of the gradients of ``names`` vectorized over the tangents."""
        count = next(iter(tangents.values())).shape[0]
        outputs, inputs = [grads[n] for n in names], [leaves[n] for n in names]
        if count == 1:
            products = torch.autograd.grad(outputs, inputs, [tangents[n][0] for n in names], retain_graph=True,
                                           allow_unused=True)
            products = [None if p is None else p.unsqueeze(0) for p in products]
        else:
            products = torch.autograd.grad(outputs, inputs, [tangents[n] for n in names], retain_graph=True,
                                           allow_unused=True, is_grads_batched=True)
        unused = [n for n, p in zip(names, products) if p is None]
        if unused:  # as autograd reports it (a second derivative lost, e.g. by a once_differentiable operation)
            raise RuntimeError(f"One of the differentiated Tensors appears to not have been used in the graph: the "
                               f"gradient does not depend on {', '.join(unused)}")
        return dict(zip(names, products))

    def _masked_tangents(self, chunk: list[tuple[int, int]], vectors: torch.Tensor):
        """(names, masks, tangents, vector_ids) of a chunk of (block, vector) pairs: the parameters the
        chunk touches; per parameter a ``[C, numel]`` mask of each pair's block; per parameter ``[C, *shape]``
        tangents, the pair's vector on its block and zero elsewhere; the pairs' vector ids."""
        layout = self.layout
        block_ids = torch.tensor([b for b, _ in chunk], device=self.device)
        vector_ids = torch.tensor([k for _, k in chunk], device=self.device)
        names = list(dict.fromkeys(layout.blocks[b].param for b, _ in chunk))
        masks = {n: layout.block_of[n].unsqueeze(0) == block_ids.unsqueeze(1) for n in names}
        rows = vectors[vector_ids]
        tangents = {n: (layout.scatter(rows, n) * masks[n]).reshape(len(chunk), *self.params[n].shape)
                    for n in names}
        return names, masks, tangents, vector_ids

    def _pair_chunks(self, vectors: torch.Tensor) -> list[list[tuple[int, int]]]:
        """The active (block, vector) pairs in chunks of at most :meth:`_pairs_per_chunk` pairs, ordered by
        block and vector; a chunk never spans two parameters, so its backward (loop) or forward-mode (vmap)
        work reaches no deeper than that parameter's layer, and no pair pays for another parameter's
        products (chunks spanning the parameters of one layer cost more than they save: measured on CPU)."""
        by_param: dict[str, list[tuple[int, int]]] = {}
        for b, ks in enumerate(self._active_pairs(vectors)):
            by_param.setdefault(self.layout.blocks[b].param, []).extend((b, k) for k in ks)
        chunks = []
        for param, pairs in by_param.items():
            size = self._pairs_per_chunk([param])
            chunks += [pairs[start : start + size] for start in range(0, len(pairs), size)]
        return chunks

    def _active_pairs(self, vectors: torch.Tensor) -> list[list[int]]:
        """For each block, the vectors that are not zero on it (a zero part has a zero product: skipped)."""
        nonzero = torch.stack([vectors[:, self.layout.block_range(b)].ne(0).any(1)
                               for b in range(len(self.layout.blocks))])
        return [row.nonzero().flatten().tolist() for row in nonzero.cpu()]

    def _vmapped_hvp(self, names: list[str], tangents: dict, inputs: Any, targets: torch.Tensor) -> dict:
        primals = {n: self.params[n] for n in names}
        fixed = {n: p for n, p in self.params.items() if n not in primals}

        def loss_of(sub: dict) -> torch.Tensor:
            return self._loss({**fixed, **sub}, inputs, targets)

        grad_fn = torch.func.grad(loss_of)
        return torch.func.vmap(lambda t: torch.func.jvp(grad_fn, (primals,), (t,))[1])(tangents)

    def _pairs_per_chunk(self, names: list[str]) -> int:
        """Pairs (or vectors) per vectorized call that touch the parameters ``names``: ``chunk_size`` if
        given, else what fits ``memory_budget``; 1 once products are computed one at a time.

        Each pair carries a tangent, a product and a mask of the parameters it touches (about 4
        parameter-sized tensors) and, through the forward and backward, a tangent of every activation
        saved for the backward (about 3 activation-sized tensors).
        """
        if self.strategy == "loop" and not self._batch_pairs:
            return 1
        if self._chunk_size is not None:
            return self._chunk_size
        if self._memory_budget is not None:
            budget = self._memory_budget
        elif self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] // 2
        else:
            budget = CPU_CHUNK_BYTES
        itemsize = torch.finfo(self.dtype).bits // 8
        param_bytes = sum(self.params[n].numel() for n in names) * itemsize
        per_pair = 4 * param_bytes + 3 * self._activation_bytes()
        return max(1, int(budget // per_pair))

    def _activation_bytes(self) -> int:
        if not hasattr(self, "_saved_bytes"):
            total = 0

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                nonlocal total
                total += tensor.numel() * tensor.element_size()
                return tensor

            largest = max(self.batches, key=lambda batch: batch[1].shape[0])
            leaves = self._leaves(self.layout.params)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), twice_differentiable_attention():
                self._loss(leaves, *largest)
            self._saved_bytes = total
        return self._saved_bytes

    def _leaves(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        params = dict(self.params)
        for name in names:
            params[name] = self.params[name].detach().requires_grad_()
        return params

    def _loss(self, params: dict[str, torch.Tensor], inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        state = {**self.buffers, **params}
        if isinstance(inputs, dict):
            output = torch.func.functional_call(self.model, state, args=(), kwargs=inputs)
        elif isinstance(inputs, tuple):
            output = torch.func.functional_call(self.model, state, inputs)
        else:
            output = torch.func.functional_call(self.model, state, (inputs,))
        loss = self.loss_fn(output, targets)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar (the batch mean), got shape {tuple(loss.shape)}")
        return loss

    def _prepare_batch(self, batch: Any, index: int) -> Batch:
        try:
            inputs, targets = batch
        except (TypeError, ValueError):
            raise ValueError(f"batch {index} must be an (inputs, targets) pair, got {type(batch).__name__}") from None
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
            raise ValueError(f"batch {index}: targets must be a tensor with a leading sample dimension")
        if targets.shape[0] == 0:
            raise ValueError(f"batch {index} is empty")
        return batch_to(inputs, self.device, self.dtype), batch_to(targets, self.device, self.dtype)


__all__ = ["AUTO_STRATEGY", "BlockHessian", "CPU_CHUNK_BYTES", "HessianSetupError", "Layout", "STRATEGIES",
           "VectorizationWarning"]
