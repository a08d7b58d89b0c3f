"""Inference kernel: Y = X·Wᵀ + b, one read of X, one write of Y.

One program per tile of BLOCK_N rows; D is walked in chunks of BLOCK_D and O
in blocks of BLOCK_O (a second grid axis). Half-precision inputs are upcast
on chip; products and sums run in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import TileConfig, forward_config
from .specs import accumulator_dtype
from .tiles import load_rows, load_w_transposed, x_times_wt


@triton.jit
def _linear_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    n_rows, D, O,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_yn, stride_yo,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_n = offs_n < n_rows
    mask_o = offs_o < O
    rows = offs_n.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        md = dd < D
        x = load_rows(x_ptr, rows, dd, mask_n, md, stride_xn, stride_xd, ACC_DTYPE)
        w_t = load_w_transposed(w_ptr, offs_o, dd, mask_o, md, stride_wo, stride_wd, ACC_DTYPE)
        acc += x_times_wt(x, w_t, INPUT_PRECISION, USE_DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yn + offs_o[None, :] * stride_yo, acc,
             mask=mask_n[:, None] & mask_o[None, :])


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    input_precision: str = "ieee",
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x: (N, D) any strides, weight: (O, D), bias: (O,) or None -> (N, O) contiguous, out_dtype."""
    n_rows, in_features = x.shape
    out_features = weight.shape[0]
    acc = accumulator_dtype(weight.dtype)
    if acc == torch.float64:
        input_precision = "ieee"  # tf32 is a float32 mode
    cfg = config or forward_config(in_features, out_features, x.device, acc, input_precision)
    y = torch.empty((n_rows, out_features), device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(n_rows, cfg.block_n), triton.cdiv(out_features, cfg.block_o))
    _linear_forward_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        n_rows, in_features, out_features,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=input_precision, USE_DOT=cfg.use_dot,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_O=cfg.block_o, num_warps=cfg.num_warps,
    )
    return y
