"""Gradient pass, "rows" formulation: the residual and Rᵀ·X in registers, for small O·D.

The same sums as linear_mse_grad.py (Σ R², Σ_rows R, Rᵀ·X into one partial row per
program, columns [dW (O·D, row-major) | db (O) | loss (1)]), laid out so that the hot
loop has no shared memory, no barrier and no cross-thread sum but the one a row needs:

    tensor axes   [O, J, V, R, T]       (every tensor below is a slice of these)
    T lanes share one row; lane t owns the C = J·V contiguous columns t·C .. t·C + C − 1
    R rows per tile: 32/T per warp, one per lane group, over all warps
    O (every output), J, V: in the thread

Triton's default layout for the 5-D accumulator is exactly that (lanes fill the last
axes, the leading axes stay in the thread), and the x tile [J, V, R, T] loads in it
with V-wide vectors (16 B), so no layout conversion is needed. Per row and output a
lane does C FMAs for X·Wᵀ, log2(T) shuffles to finish the row's sum (every lane of
the row gets it), and C FMAs for Rᵀ·X into its own dW accumulators, which are summed
over rows once, after the loop. W and dW stay in registers (O·C values each per lane),
so the formulation is for O·C <= 32 (blocks.py): tall data (D <= 128 at O <= 8) in
practice; config.py decides where it runs.

The persistent loop over row tiles is software-pipelined (``NUM_STAGES``) like the
default kernel's. Each program writes only its own partial row and the reduction
over programs is the same fixed-order kernel (reduce_update.py): bitwise
deterministic run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import RowsConfig, rows_config
from .device import DeviceProfile, device_profile
from .plan import LaunchPlan
from .specs import GradPartials, accumulator_dtype, gradient_pass


@triton.jit
def _rows_partials_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
    HAS_BIAS: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, STORE_RESIDUAL: tl.constexpr, MASK_D: tl.constexpr,
    MASK_O: tl.constexpr, ALIGNED_T: tl.constexpr,
    NUM_STAGES: tl.constexpr, BLOCK_O: tl.constexpr, J: tl.constexpr, V: tl.constexpr, LANES: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_dtype: tl.constexpr = partials_ptr.dtype.element_ty
    C: tl.constexpr = J * V
    offs_o = tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, ROWS)
    offs_t = tl.arange(0, LANES)
    # Masks on O and D only where the blocks overhang them: a mask that varies inside a lane's
    # vector (or its outputs) splits its loads into scalars and its layout from the others'.
    mask_o = offs_o < O
    # Column of (j, v, t): lane t owns C contiguous columns, read V at a time.
    col = (offs_t[None, None, None, :] * C + tl.arange(0, J)[:, None, None, None] * V
           + tl.arange(0, V)[None, :, None, None])                                   # [J, V, 1, T]
    wcol = tl.reshape(col, (1, J, V, LANES))                                          # [1, J, V, T]
    w_mask = mask_o[:, None, None, None] & (wcol < D)
    w = tl.load(w_ptr + offs_o[:, None, None, None] * stride_wo + wcol * stride_wd, mask=w_mask,
                other=0.0).to(acc_dtype)                                              # [O, J, V, T]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(acc_dtype)
    # The target enters the row's sum on lane 0 only: part − t summed over the lanes is pred − t.
    first_lane = (offs_t == 0)[None, None, :]                                         # [1, 1, T]

    dw_acc = tl.zeros([BLOCK_O, J, V, ROWS, LANES], dtype=acc_dtype)
    db_acc = tl.zeros([BLOCK_O, ROWS], dtype=acc_dtype)
    loss_acc = tl.zeros([BLOCK_O, ROWS], dtype=acc_dtype)
    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in tl.range(pid, n_tiles, n_programs, num_stages=NUM_STAGES):
        offs_n = tile * ROWS + offs_r
        mask_n = offs_n < n_rows
        if HAS_ROW_INDEX:  # mini-batch rows gathered on the fly
            rows = tl.load(row_index_ptr + offs_n.to(tl.int64) * stride_index, mask=mask_n, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        x_mask = mask_n[None, None, :, None]
        if MASK_D:
            x_mask = x_mask & (col < D)
        x = tl.load(x_ptr + rows[None, None, :, None] * stride_xn + col * stride_xd, mask=x_mask,
                    other=0.0).to(acc_dtype)                                          # [J, V, R, T]
        t_mask = mask_n[None, :, None] & first_lane
        if MASK_O:
            t_mask = t_mask & mask_o[:, None, None]
        t_rows = rows * stride_tn
        if ALIGNED_T:  # rows of T start on BLOCK_O-element boundaries: one vector per row and lane
            t_rows = tl.multiple_of(t_rows, BLOCK_O)
        t = tl.load(t_ptr + t_rows[None, :, None] + offs_o[:, None, None] * stride_to, mask=t_mask,
                    other=0.0).to(acc_dtype)
        # X·Wᵀ − T: this lane's C columns in the thread, then the row's lanes.
        part = tl.sum(tl.sum(x[None, :, :, :, :] * w[:, :, :, None, :], axis=2), axis=1)   # [O, R, T]
        r = tl.sum(part - t, axis=2)                                                 # [O, R]
        if HAS_BIAS:
            r += bias[:, None]
        r = tl.where(mask_n[None, :], r, 0.0)  # rows past the end; outputs past O have zero W, b and t
        db_acc += r
        loss_acc = tl.fma(r, r, loss_acc)
        if STORE_RESIDUAL:  # kept only when x (or the target) needs a gradient
            tl.store(residual_ptr + offs_n[None, :].to(tl.int64) * O + offs_o[:, None], r,
                     mask=mask_o[:, None] & mask_n[None, :])
        # Rᵀ·X: each lane into its own accumulators; rows are summed after the loop.
        dw_acc = tl.fma(r[:, None, None, :, None], x[None, :, :, :, :], dw_acc)

    partial_row = partials_ptr + pid.to(tl.int64) * stride_partials
    dw = tl.sum(dw_acc, axis=3)                                                      # [O, J, V, T]
    tl.store(partial_row + offs_o[:, None, None, None] * D + wcol, dw, mask=w_mask)
    tl.store(partial_row + O * D + offs_o, tl.sum(db_acc, axis=1), mask=mask_o)
    tl.store(partial_row + O * D + O, tl.sum(tl.sum(loss_acc, axis=1), axis=0))


def rows_aligned(t: torch.Tensor, block: int) -> bool:
    """Whether each row of t starts ``block`` elements apart from the first, a multiple (its columns
    contiguous): then the kernel may tell the compiler row offsets are multiples of ``block``. (The
    base pointer's alignment is Triton's own specialisation.)"""
    return t.stride(1) == 1 and t.stride(0) % block == 0


def plan_rows_partials(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    store_residual: bool = False,
    config: RowsConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, GradPartials]:
    """The launch of rows_partials and its (not yet written) outputs; IEEE products only
    (FMAs in the accumulator dtype: fp32, or fp64 for fp64 weights)."""
    n_rows = row_index.numel() if row_index is not None else x.shape[0]
    out_features, in_features = weight.shape
    acc = accumulator_dtype(weight.dtype)
    profile = profile or device_profile(x.device)
    cfg = config or rows_config(in_features, out_features, profile, x.element_size())
    if cfg.lanes * cfg.columns < in_features or cfg.block_o < out_features:
        raise ValueError(f"{cfg} does not cover D={in_features}, O={out_features}")
    n_programs = max(1, min(triton.cdiv(n_rows, cfg.rows), cfg.max_programs))
    args, outputs = gradient_pass(x, weight, bias, target, row_index, n_programs, acc, store_residual)
    constexprs = dict(
        HAS_BIAS=bias is not None, HAS_ROW_INDEX=row_index is not None, STORE_RESIDUAL=store_residual,
        MASK_D=cfg.lanes * cfg.columns != in_features,
        MASK_O=cfg.block_o != out_features, ALIGNED_T=rows_aligned(target, cfg.block_o),
        NUM_STAGES=cfg.num_stages, BLOCK_O=cfg.block_o,
        J=cfg.columns // cfg.vec, V=cfg.vec, LANES=cfg.lanes, ROWS=cfg.rows,
    )
    return LaunchPlan(_rows_partials_kernel, (n_programs,), args, constexprs, cfg.num_warps, cfg.num_stages), outputs


def rows_partials(x, weight, bias, target, *, row_index=None, store_residual=False,
                  config: RowsConfig | None = None) -> GradPartials:
    """linear_mse_grad.linear_mse_partials (IEEE), in the rows formulation."""
    plan, partials = plan_rows_partials(x, weight, bias, target, row_index=row_index,
                                        store_residual=store_residual, config=config)
    plan.launch()
    return partials
