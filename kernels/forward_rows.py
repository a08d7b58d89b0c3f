"""Inference, "rows" formulation: Y = X·Wᵀ + b with W in registers, for small O·D.

The layout of grad_rows.py without the gradient: T lanes share a row, each owning C
contiguous columns (read V at a time) and every output; a lane forms its C-column
part of each output in the thread, log2(T) shuffles finish the row (every lane of
the row gets it), and the row's outputs are stored once. Programs are persistent
(W is loaded once per program, not once per tile) and the loop over row tiles is
software-pipelined. No shared memory and no barrier in the loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import RowsConfig, rows_forward_config
from .device import DeviceProfile, device_profile
from .grad_rows import rows_aligned
from .plan import LaunchPlan
from .specs import accumulator_dtype


@triton.jit
def _rows_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_yn, stride_yo,
    HAS_BIAS: tl.constexpr, MASK_D: tl.constexpr, MASK_O: tl.constexpr, ALIGNED_Y: tl.constexpr,
    ACC_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_O: tl.constexpr, J: tl.constexpr, V: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    C: tl.constexpr = J * V
    offs_o = tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, ROWS)
    mask_o = offs_o < O
    col = (tl.arange(0, LANES)[None, None, None, :] * C + tl.arange(0, J)[:, None, None, None] * V
           + tl.arange(0, V)[None, :, None, None])                                   # [J, V, 1, T]
    wcol = tl.reshape(col, (1, J, V, LANES))
    w = tl.load(w_ptr + offs_o[:, None, None, None] * stride_wo + wcol * stride_wd,
                mask=mask_o[:, None, None, None] & (wcol < D), other=0.0).to(ACC_DTYPE)  # [O, J, V, T]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DTYPE)

    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in tl.range(pid, n_tiles, n_programs, num_stages=NUM_STAGES):
        offs_n = tile * ROWS + offs_r
        mask_n = offs_n < n_rows
        rows = offs_n.to(tl.int64)
        x_mask = mask_n[None, None, :, None]
        if MASK_D:
            x_mask = x_mask & (col < D)
        x = tl.load(x_ptr + rows[None, None, :, None] * stride_xn + col * stride_xd, mask=x_mask,
                    other=0.0).to(ACC_DTYPE)                                          # [J, V, R, T]
        y = tl.sum(tl.sum(tl.sum(x[None, :, :, :, :] * w[:, :, :, None, :], axis=2), axis=1), axis=2)  # [O, R]
        if HAS_BIAS:
            y += bias[:, None]
        y_rows = rows * stride_yn
        if ALIGNED_Y:  # rows of Y start on BLOCK_O-element boundaries: one vector store per row
            y_rows = tl.multiple_of(y_rows, BLOCK_O)
        y_mask = mask_n[None, :]
        if MASK_O:
            y_mask = y_mask & mask_o[:, None]
        tl.store(y_ptr + y_rows[None, :] + offs_o[:, None] * stride_yo, y, mask=y_mask)


def plan_rows_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    config: RowsConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, torch.Tensor]:
    """The launch of rows_forward and its (not yet written) output (IEEE FMAs)."""
    n_rows, in_features = x.shape
    out_features = weight.shape[0]
    acc = accumulator_dtype(weight.dtype)
    profile = profile or device_profile(x.device)
    cfg = config or rows_forward_config(in_features, out_features, profile, x.element_size())
    if cfg.lanes * cfg.columns < in_features or cfg.block_o < out_features:
        raise ValueError(f"{cfg} does not cover D={in_features}, O={out_features}")
    y = torch.empty((n_rows, out_features), device=x.device, dtype=out_dtype)
    n_programs = max(1, min(triton.cdiv(n_rows, cfg.rows), cfg.max_programs))
    args = dict(x_ptr=x, w_ptr=weight, b_ptr=bias if bias is not None else weight, y_ptr=y,
                n_rows=n_rows, D=in_features, O=out_features, n_programs=n_programs,
                stride_xn=x.stride(0), stride_xd=x.stride(1), stride_wo=weight.stride(0), stride_wd=weight.stride(1),
                stride_yn=y.stride(0), stride_yo=y.stride(1))
    constexprs = dict(HAS_BIAS=bias is not None, MASK_D=cfg.lanes * cfg.columns != in_features,
                      MASK_O=cfg.block_o != out_features, ALIGNED_Y=rows_aligned(y, cfg.block_o),
                      ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, NUM_STAGES=cfg.num_stages,
                      BLOCK_O=cfg.block_o, J=cfg.columns // cfg.vec, V=cfg.vec, LANES=cfg.lanes, ROWS=cfg.rows)
    return LaunchPlan(_rows_forward_kernel, (n_programs,), args, constexprs, cfg.num_warps, cfg.num_stages), y


def rows_forward(x, weight, bias, *, out_dtype: torch.dtype, config: RowsConfig | None = None) -> torch.Tensor:
    """linear_forward.linear_forward (IEEE), in the rows formulation."""
    plan, y = plan_rows_forward(x, weight, bias, out_dtype=out_dtype, config=config)
    plan.launch()
    return y
