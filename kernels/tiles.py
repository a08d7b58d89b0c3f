"""Tile helpers shared by the kernels: loads that upcast, exact fp64 scalars,
and the two tile products, each either a tl.dot or exact FMAs over a 3-D broadcast.

tl.dot needs every block dimension >= 16 and has no fp64 path on every
Triton release; the broadcast form has neither limit, computes each product
with plain FMAs (IEEE, like PyTorch's fp32 matmul) and wastes nothing when
O is small. Which one runs is a compile-time choice (USE_DOT) made with the
block sizes in config.py.

Triton's combiner rewrites ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)``
into a tl.dot (which some releases lower to TF32 tensor cores). The
broadcast products below never reduce over the middle axis of such a
pattern, so they stay FMAs whatever the block sizes.
"""

import triton
import triton.language as tl

DOT_K_CHUNK = tl.constexpr(32)  # K per chunk of an IEEE (FMA) dot


@triton.jit
def load_rows(ptr, rows, offs_c, mask_r, mask_c, stride_r, stride_c, dtype: tl.constexpr):
    """(len(rows), len(offs_c)) tile of a row-major-ish matrix, upcast to ``dtype``
    (half-precision inputs are upcast on chip: exact)."""
    ptrs = ptr + rows[:, None] * stride_r + offs_c[None, :].to(tl.int64) * stride_c
    return tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(dtype)


@triton.jit
def f64_scalar(value, dtype: tl.constexpr):
    """A runtime scalar argument annotated ``tl.float64``, as ``dtype``.

    Kernels declare their float arguments (learning rate, momentum, loss
    scales) as tl.float64, so a GPU receives the exact Python double, as the
    interpreter does; fp32 kernels round it here once, as PyTorch does.
    (In the interpreter the argument arrives as a Python float: tl.full
    makes it an fp64 scalar in both cases.)
    """
    return tl.full([], value, tl.float64).to(dtype)


@triton.jit
def x_times_wt(x, w, INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """X·Wᵀ: x (BLOCK_N, BLOCK_D), w (BLOCK_O, BLOCK_D) -> (BLOCK_N, BLOCK_O), in x's dtype."""
    if USE_DOT:
        BLOCK_N: tl.constexpr = x.shape[0]
        BLOCK_D: tl.constexpr = x.shape[1]
        BLOCK_O: tl.constexpr = w.shape[0]
        if INPUT_PRECISION != "tf32" and BLOCK_D > DOT_K_CHUNK:
            # An IEEE fp32 dot runs on the FMA units and holds the whole K extent of its
            # operands in registers: with K = BLOCK_D it would spill. Split K into chunks
            # (a batched dot, then a sum over the chunks): same FMAs, chunk-sized operands.
            CHUNKS: tl.constexpr = BLOCK_D // DOT_K_CHUNK
            xc = tl.permute(tl.reshape(x, (BLOCK_N, CHUNKS, DOT_K_CHUNK)), (1, 0, 2))
            wc = tl.permute(tl.reshape(w, (BLOCK_O, CHUNKS, DOT_K_CHUNK)), (1, 2, 0))
            return tl.sum(tl.dot(xc, wc, input_precision=INPUT_PRECISION, out_dtype=x.dtype), axis=0)
        else:
            return tl.dot(x, tl.trans(w), input_precision=INPUT_PRECISION, out_dtype=x.dtype)
    else:
        return tl.sum(x[:, None, :] * w[None, :, :], axis=2)


@triton.jit
def rt_times_x(r, x, INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """Rᵀ·X: (BLOCK_N, BLOCK_O), (BLOCK_N, BLOCK_D) -> (BLOCK_O, BLOCK_D), in x's dtype (K = BLOCK_N: small)."""
    if USE_DOT:
        return tl.dot(tl.trans(r), x, input_precision=INPUT_PRECISION, out_dtype=x.dtype)
    else:
        return tl.sum(r[:, :, None] * x[:, None, :], axis=0)


@triton.jit
def accumulate(acc, product, INPUT_PRECISION: tl.constexpr):
    """acc + product, rounded to nearest in registers.

    Triton folds ``acc + tl.dot(...)`` into the dot's accumulator; on tensor
    cores ("tf32", "tf32x3") that sum is the MMA's, whose additions need not
    round to nearest, and over the thousands of row tiles of one program a
    biased rounding would add up. tl.fma keeps the sum out of the MMA. IEEE
    products run on the FMA units, where the folded sum is already exact FMAs.
    """
    if INPUT_PRECISION == "ieee":
        return acc + product
    else:
        return tl.fma(product, 1.0, acc)
