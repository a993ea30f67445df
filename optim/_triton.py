"""The Triton kernels of the Adam-mini update; :mod:`optim.kernels` builds their work tables and
launches them (its docstring says how the work is cut). Defined when this module is first imported:
with ``TRITON_INTERPRET=1`` set then, they run in Triton's interpreter (on CPU tensors).

``ALIGNED`` specialisations are launched only when the host has checked that every tensor of the
table starts on 16 bytes and that the items' first coordinates and block sizes are multiples of 8:
the hints then let Triton load and store 16 bytes at a time.
"""

import triton
import triton.language as tl

__all__ = ["chunk_sums", "chunk_updates", "tiles"]


@triton.jit
def step_scalars(slot_row, hyper):
    """The step's numbers for one parameter: float32, from float64 bias corrections."""
    row = hyper + tl.load(slot_row + 5) * 6
    lr = tl.load(row)
    beta1 = tl.load(row + 1)
    beta2 = tl.load(row + 2)
    decay = 1.0 - lr * tl.load(row + 4)
    t = tl.load(tl.load(slot_row + 4).to(tl.pointer_type(tl.float32))).to(tl.float64)
    step_size = lr / (1.0 - tl.exp2(t * tl.log2(beta1)))
    inv_bias_correction2 = 1.0 / (1.0 - tl.exp2(t * tl.log2(beta2)))
    return (decay.to(tl.float32), (1.0 - beta1).to(tl.float32), beta2.to(tl.float32), (1.0 - beta2).to(tl.float32),
            inv_bias_correction2.to(tl.float32), step_size.to(tl.float32), tl.load(row + 3).to(tl.float32),
            tl.load(row + 5).to(tl.float32))


@triton.jit
def tensor(slot_row, column, first, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The slot's tensor in ``column``, from its coordinate ``first`` on."""
    pointer = tl.load(slot_row + column).to(tl.pointer_type(DTYPE)) + first
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """float32 ``x`` in ``dtype``, rounded to nearest, ties to even (bfloat16 by its bits: Triton's
    interpreter truncates a plain conversion, the GPU rounds; this is exact on both)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return tl.where(x == x, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))
    else:
        return x.to(dtype)


@triton.jit
def move(p_ptr, g, m_ptr, offsets, mask, scale, decay, weight):
    """Decay, first moment (torch.lerp's formula) and step of the coordinates at ``offsets``; the
    step uses the first moment as stored (a bf16 first moment: rounded), as the plain path does."""
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p = p * decay
    if weight < 0.5:
        m = m + weight * (g - m)
    else:
        m = g - (g - m) * (1.0 - weight)
    m = rounded(m, m_ptr.dtype.element_ty)
    p = p - m.to(tl.float32) * scale
    tl.store(p_ptr + offsets, rounded(p, p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, m, mask=mask)


@triton.jit
def tiles(work, slots, hyper, N: tl.constexpr, R: tl.constexpr, CONTIGUOUS: tl.constexpr, ALIGNED: tl.constexpr,
          P_TYPE: tl.constexpr, G_TYPE: tl.constexpr, M_TYPE: tl.constexpr):
    """One program: up to R blocks of at most N coordinates, each element read and written once."""
    item = work + tl.program_id(0).to(tl.int64) * 7
    slot_row = slots + tl.load(item) * 6
    first = tl.load(item + 1)
    first_block = tl.load(item + 2)
    n_blocks = tl.load(item + 3)
    size = tl.load(item + 4)
    if ALIGNED:
        size = tl.multiple_of(size, 8)
    decay, weight, beta2, one_minus_beta2, inv_bc2, step_size, eps, sign = step_scalars(slot_row, hyper)
    blocks = tl.arange(0, R)
    coordinates = tl.arange(0, N)[None, :]
    mask = (blocks[:, None] < n_blocks) & (coordinates < size)
    if CONTIGUOUS:
        starts = blocks[:, None] * size
        if ALIGNED:
            starts = tl.multiple_of(starts, [8, 8])
        offsets = starts + coordinates
    else:
        run = tl.load(item + 5)
        offsets = blocks[:, None] * run + (coordinates // run) * tl.load(item + 6) + coordinates % run
    g = tl.load(tensor(slot_row, 1, first, G_TYPE, ALIGNED) + offsets, mask=mask, other=0.0).to(tl.float32) * sign
    v_at = tl.load(slot_row + 3).to(tl.pointer_type(tl.float32)) + first_block + blocks
    mean = tl.sum(g * g, axis=1) / size.to(tl.float32)
    v = tl.load(v_at, mask=blocks < n_blocks, other=0.0) * beta2 + mean * one_minus_beta2
    tl.store(v_at, v, mask=blocks < n_blocks)
    scale = step_size * (1.0 / (tl.sqrt(v * inv_bc2) + eps))
    move(tensor(slot_row, 0, first, P_TYPE, ALIGNED), g, tensor(slot_row, 2, first, M_TYPE, ALIGNED), offsets, mask,
         scale[:, None], decay, weight)


@triton.jit
def chunk_offsets(item, chunk, size, CHUNK: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """Offsets (from the block's first coordinate) and mask of a chunk of a large block."""
    coordinates = chunk * CHUNK + tl.arange(0, CHUNK)
    if CONTIGUOUS:
        offsets = coordinates
    else:
        run = tl.load(item + 4)
        offsets = (coordinates // run) * tl.load(item + 5) + coordinates % run
    return offsets, coordinates < size


@triton.jit
def chunk_item(work, slots, ALIGNED: tl.constexpr):
    """This program's chunk work item: (item, its slot row, block size, chunk index, first partial sum,
    chunks in the block)."""
    item = work + tl.program_id(0).to(tl.int64) * 9
    size = tl.load(item + 3)
    if ALIGNED:
        size = tl.multiple_of(size, 8)
    return item, slots + tl.load(item) * 6, size, tl.load(item + 6), tl.load(item + 7), tl.load(item + 8)


@triton.jit
def chunk_sums(work, slots, partials, CHUNK: tl.constexpr, CONTIGUOUS: tl.constexpr, ALIGNED: tl.constexpr,
               G_TYPE: tl.constexpr):
    """First launch for large blocks: each chunk's sum of g**2; chunk 0 keeps the old second moment."""
    item, slot_row, size, chunk, first_partial, n_chunks = chunk_item(work, slots, ALIGNED)
    offsets, mask = chunk_offsets(item, chunk, size, CHUNK, CONTIGUOUS)
    g = tl.load(tensor(slot_row, 1, tl.load(item + 1), G_TYPE, ALIGNED) + offsets, mask=mask, other=0.0)
    g = g.to(tl.float32)
    tl.store(partials + first_partial + chunk, tl.sum(g * g, axis=0))
    v_ptr = tl.load(slot_row + 3).to(tl.pointer_type(tl.float32))
    tl.store(partials + first_partial + n_chunks, tl.load(v_ptr + tl.load(item + 2)), mask=chunk == 0)


@triton.jit
def chunk_updates(work, slots, hyper, partials, CHUNK: tl.constexpr, CONTIGUOUS: tl.constexpr,
                  ALIGNED: tl.constexpr, P_TYPE: tl.constexpr, G_TYPE: tl.constexpr, M_TYPE: tl.constexpr):
    """Second launch for large blocks: the block's mean from its partial sums (fixed order), the update."""
    item, slot_row, size, chunk, first_partial, n_chunks = chunk_item(work, slots, ALIGNED)
    first = tl.load(item + 1)
    decay, weight, beta2, one_minus_beta2, inv_bc2, step_size, eps, sign = step_scalars(slot_row, hyper)
    total = tl.zeros([1024], dtype=tl.float32)
    for start in range(0, n_chunks, 1024):
        index = start + tl.arange(0, 1024)
        total += tl.load(partials + first_partial + index, mask=index < n_chunks, other=0.0)
    mean = tl.sum(total, axis=0) / size.to(tl.float32)
    v = tl.load(partials + first_partial + n_chunks) * beta2 + mean * one_minus_beta2
    v_ptr = tl.load(slot_row + 3).to(tl.pointer_type(tl.float32))
    tl.store(v_ptr + tl.load(item + 2), v, mask=chunk == 0)
    scale = step_size * (1.0 / (tl.sqrt(v * inv_bc2) + eps))
    offsets, mask = chunk_offsets(item, chunk, size, CHUNK, CONTIGUOUS)
    g = tl.load(tensor(slot_row, 1, first, G_TYPE, ALIGNED) + offsets, mask=mask, other=0.0).to(tl.float32) * sign
    move(tensor(slot_row, 0, first, P_TYPE, ALIGNED), g, tensor(slot_row, 2, first, M_TYPE, ALIGNED), offsets, mask,
         scale, decay, weight)
