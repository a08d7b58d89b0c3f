"""Single-pass gradient kernel: fused linear forward + MSE + partial dW/db.

For each tile of BLOCK_N rows a program forms the residual

    R = X·Wᵀ + b − T                                  (BLOCK_N × O)

and, while the tile is still on chip, accumulates the three sums that the
loss and both parameter gradients need:

    Σ R²  (loss)      Σ_rows R  (db)      Rᵀ·X  (dW)

X and T are read once (when D fits one block; otherwise each D chunk is read
twice, the second time mostly from cache). Each program owns one row of a
partial buffer ``partials[P, K]`` with K = O·D + O + 1: dW flattened row-major,
then db, then the loss. The reduction over programs (reduce_update.py) is a
fixed-order sum, so there are no float atomics and the same inputs give
bitwise the same results on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import TileConfig, grad_config
from .tiles import load_rows, load_w_transposed, rt_times_x, x_times_wt
from .specs import GradPartials, accumulator_dtype


@triton.jit
def _linear_mse_partials_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
    n_rows, D, O,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_partials,
    HAS_BIAS: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    # Products run in the accumulator dtype: half-precision inputs are upcast on
    # chip (exact), so fp32 master weights keep their precision in both dots.
    acc_dtype: tl.constexpr = partials_ptr.dtype.element_ty

    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    partial_row = partials_ptr + pid.to(tl.int64) * stride_partials
    dw_cols = offs_o[:, None] * D + offs_d[None, :]

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(acc_dtype)
    loss_acc = tl.zeros([BLOCK_O], dtype=acc_dtype)
    db_acc = tl.zeros([BLOCK_O], dtype=acc_dtype)
    dw_acc = tl.zeros([BLOCK_O, BLOCK_D], dtype=acc_dtype)
    w_t = load_w_transposed(w_ptr, offs_o, offs_d, mask_o, mask_d, stride_wo, stride_wd, acc_dtype)
    for d0 in range(BLOCK_D, D, BLOCK_D):  # zero the part of dW that is summed in memory (below)
        dd = d0 + offs_d
        tl.store(partial_row + offs_o[:, None] * D + dd[None, :], tl.zeros([BLOCK_O, BLOCK_D], dtype=acc_dtype),
                 mask=mask_o[:, None] & (dd < D)[None, :])
    if D > BLOCK_D:  # D-uniform, so every thread takes it
        # The chunked dW below read-modify-writes this row; the thread that reads an
        # element need not be the one that wrote it, so order the writes first.
        tl.debug_barrier()

    for tile in range(pid, n_tiles, n_programs):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        if HAS_ROW_INDEX:  # mini-batch rows gathered on the fly: no copy of X per batch
            rows = tl.load(row_index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)

        # Forward: pred = X·Wᵀ, D in chunks of BLOCK_D (one chunk when D fits).
        x = load_rows(x_ptr, rows, offs_d, mask_n, mask_d, stride_xn, stride_xd, acc_dtype)
        pred = x_times_wt(x, w_t, INPUT_PRECISION, USE_DOT)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            dd = d0 + offs_d
            md = dd < D
            xc = load_rows(x_ptr, rows, dd, mask_n, md, stride_xn, stride_xd, acc_dtype)
            wc = load_w_transposed(w_ptr, offs_o, dd, mask_o, md, stride_wo, stride_wd, acc_dtype)
            pred += x_times_wt(xc, wc, INPUT_PRECISION, USE_DOT)
        if HAS_BIAS:
            pred += bias[None, :]

        t_ptrs = t_ptr + rows[:, None] * stride_tn + offs_o[None, :] * stride_to
        mask_no = mask_n[:, None] & mask_o[None, :]
        target = tl.load(t_ptrs, mask=mask_no, other=0.0).to(acc_dtype)
        r = tl.where(mask_no, pred - target, 0.0)
        loss_acc += tl.sum(r * r, axis=0)
        db_acc += tl.sum(r, axis=0)
        if STORE_RESIDUAL:  # kept only when x (or the target) needs a gradient
            tl.store(residual_ptr + offs_n[:, None].to(tl.int64) * O + offs_o[None, :], r, mask=mask_no)

        # dW += Rᵀ·X. The first chunk is still in registers; later chunks are
        # re-read and summed into this program's own partial row (it alone
        # touches that row, so the read-modify-write needs no atomics).
        dw_acc += rt_times_x(r, x, INPUT_PRECISION, USE_DOT)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            dd = d0 + offs_d
            md = dd < D
            xc = load_rows(x_ptr, rows, dd, mask_n, md, stride_xn, stride_xd, acc_dtype)
            contrib = rt_times_x(r, xc, INPUT_PRECISION, USE_DOT)
            ptrs = partial_row + offs_o[:, None] * D + dd[None, :]
            mask_od = mask_o[:, None] & md[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=mask_od) + contrib, mask=mask_od)
        if D > BLOCK_D:
            tl.debug_barrier()  # this tile's writes land before the next tile reads them

    tl.store(partial_row + dw_cols, dw_acc, mask=mask_o[:, None] & mask_d[None, :])
    tl.store(partial_row + O * D + offs_o, db_acc, mask=mask_o)
    tl.store(partial_row + O * D + O, tl.sum(loss_acc, axis=0))


def linear_mse_partials(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    store_residual: bool = False,
    input_precision: str = "ieee",
    config: TileConfig | None = None,
) -> GradPartials:
    """One pass over the rows of a batch: partial loss, db and dW sums.

    x: (N, D), any strides; weight: (O, D); bias: (O,) or None; target: (N, O).
    row_index: optional (n,) int tensor; the batch is then rows x[row_index],
    target[row_index], gathered inside the kernel.
    """
    n_rows = row_index.numel() if row_index is not None else x.shape[0]
    out_features, in_features = weight.shape
    acc = accumulator_dtype(weight.dtype)
    if acc == torch.float64:
        input_precision = "ieee"  # tf32 is a float32 mode
    cfg = config or grad_config(in_features, out_features, x.device, acc, input_precision)
    if cfg.block_o < out_features:
        raise ValueError(f"block_o={cfg.block_o} < out_features={out_features}: one program holds every output")
    n_programs = min(triton.cdiv(n_rows, cfg.block_n), cfg.max_programs)
    n_cols = out_features * in_features + out_features + 1
    partials = torch.empty((n_programs, n_cols), device=x.device, dtype=acc)
    residual = torch.empty((n_rows, out_features), device=x.device, dtype=acc) if store_residual else None
    _linear_mse_partials_kernel[(n_programs,)](
        x, weight, bias if bias is not None else weight, target,
        row_index if row_index is not None else partials, partials,
        residual if residual is not None else partials,
        n_rows, in_features, out_features,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        target.stride(0), target.stride(1), partials.stride(0),
        HAS_BIAS=bias is not None, HAS_ROW_INDEX=row_index is not None,
        STORE_RESIDUAL=store_residual, INPUT_PRECISION=input_precision, USE_DOT=cfg.use_dot,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_O=cfg.block_o,
        num_warps=cfg.num_warps,
    )
    return GradPartials(partials, residual, n_rows, out_features, in_features)
