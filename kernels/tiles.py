"""Tile helpers shared by the kernels: loads that upcast, and the two tile
products, each either a tl.dot or exact FMAs over a 3-D broadcast.

tl.dot needs every block dimension >= 16 and has no fp64 path on every
Triton release; the broadcast form has neither limit, computes each product
with plain FMAs (IEEE, like PyTorch's fp32 matmul) and wastes nothing when
O is small. Which one runs is a compile-time choice (USE_DOT) made with the
block sizes in config.py.
"""

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, rows, offs_c, mask_r, mask_c, stride_r, stride_c, dtype: tl.constexpr):
    """(len(rows), len(offs_c)) tile of a row-major-ish matrix, upcast to ``dtype``
    (half-precision inputs are upcast on chip: exact)."""
    ptrs = ptr + rows[:, None] * stride_r + offs_c[None, :].to(tl.int64) * stride_c
    return tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(dtype)


@triton.jit
def load_w_transposed(w_ptr, offs_o, offs_d, mask_o, mask_d, stride_wo, stride_wd, dtype: tl.constexpr):
    """Wᵀ tile, (BLOCK_D, BLOCK_O), upcast to ``dtype``."""
    ptrs = w_ptr + offs_o[None, :] * stride_wo + offs_d[:, None] * stride_wd
    return tl.load(ptrs, mask=mask_o[None, :] & mask_d[:, None], other=0.0).to(dtype)


@triton.jit
def x_times_wt(x, w_t, INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """X·Wᵀ: (BLOCK_N, BLOCK_D) · (BLOCK_D, BLOCK_O) -> (BLOCK_N, BLOCK_O), in x's dtype."""
    if USE_DOT:
        return tl.dot(x, w_t, input_precision=INPUT_PRECISION, out_dtype=x.dtype)
    else:
        return tl.sum(x[:, :, None] * w_t[None, :, :], axis=1)


@triton.jit
def rt_times_x(r, x, INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    """Rᵀ·X: (BLOCK_N, BLOCK_O), (BLOCK_N, BLOCK_D) -> (BLOCK_O, BLOCK_D), in x's dtype."""
    if USE_DOT:
        return tl.dot(tl.trans(r), x, input_precision=INPUT_PRECISION, out_dtype=x.dtype)
    else:
        return tl.sum(r[:, :, None] * x[:, None, :], axis=0)
