"""Gradient pass, "chunks" formulation: D in separately loaded chunks, for wide and deep data.

The same sums as linear_mse_grad.py (Σ R², Σ_rows R, Rᵀ·X into one partial row per
program, columns [dW (O·D, row-major) | db (O) | loss (1)]). The difference is how X
meets the two products. The default kernel loads a row tile as one [BLOCK_N, D] block
and splits the K = D extent of X·Wᵀ into a batched dot whose chunk sums cross warps
(shared memory and barriers every tile). Here each tile is NC separate loads of
[BLOCK_N, K_CHUNK] columns, and both products walk them in order:

    pred  = X₀·W₀ᵀ + X₁·W₁ᵀ + …        one FMA chain per output (the dot's accumulator)
    dWₖ  += Rᵀ·Xₖ                       NC accumulators, in registers for the whole loop

so no sum crosses a warp until the loop ends. W's chunks are loaded once. The
chunk count is a compile-time constant (D <= NC·K_CHUNK); the accumulators are
a tuple of NC tensors, unrolled by the compiler.

"ieee" products are tl.dot on the FMA units (exact fp32 FMAs, like cuBLAS's IEEE
GEMM); "tf32"/"tf32x3" on tensor cores, whose sums into dW are kept out of the MMA
accumulator (rounded to nearest, as tiles.accumulate explains). Deterministic:
each program writes only its own partial row, reduced in a fixed order by
reduce_update.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import ChunksConfig, chunks_config
from .device import DeviceProfile, device_profile
from .plan import LaunchPlan
from .specs import GradPartials, accumulator_dtype, gradient_pass
from .tiles import accumulate


@triton.jit
def chunk_cols(c, K_CHUNK: tl.constexpr):
    return c * K_CHUNK + tl.arange(0, K_CHUNK)


@triton.jit
def load_wt_chunks(w_ptr, offs_o, mask_o, D, stride_wo, stride_wd, acc_dtype: tl.constexpr, NC: tl.constexpr,
                   K_CHUNK: tl.constexpr):
    """Wᵀ in NC chunks of [K_CHUNK, BLOCK_O]: loaded once, before the row loop. (Transposed here, not
    at the product: the compiler then stages each chunk in shared memory once, not once per tile.)"""
    chunks = ()
    for c in tl.static_range(NC):
        cols = chunk_cols(c, K_CHUNK)
        chunks = chunks + (tl.load(w_ptr + offs_o[None, :] * stride_wo + cols[:, None] * stride_wd,
                                   mask=mask_o[None, :] & (cols < D)[:, None], other=0.0).to(acc_dtype),)
    return chunks


@triton.jit
def zero_chunks(BLOCK_O: tl.constexpr, acc_dtype: tl.constexpr, NC: tl.constexpr, K_CHUNK: tl.constexpr):
    chunks = ()
    for c in tl.static_range(NC):
        chunks = chunks + (tl.zeros([BLOCK_O, K_CHUNK], dtype=acc_dtype),)
    return chunks


@triton.jit
def load_x_chunk(x_ptr, rows, mask_n, c, D, stride_xn, stride_xd, dtype: tl.constexpr, MASK_D: tl.constexpr,
                 K_CHUNK: tl.constexpr):
    """Chunk c of a row tile, [len(rows), K_CHUNK], as ``dtype`` (the D mask compiled in only where needed)."""
    cols = chunk_cols(c, K_CHUNK)
    x_mask = mask_n[:, None]
    if MASK_D:
        x_mask = x_mask & (cols < D)[None, :]
    return tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=x_mask, other=0.0).to(dtype)


@triton.jit
def store_dw_chunks(partial_row, dw, offs_o, mask_o, D, NC: tl.constexpr, K_CHUNK: tl.constexpr):
    """A program's dW chunks into its partial row's [dW (O·D, row-major)] columns."""
    for c in tl.static_range(NC):
        cols = chunk_cols(c, K_CHUNK)
        tl.store(partial_row + offs_o[:, None] * D + cols[None, :], dw[c], mask=mask_o[:, None] & (cols < D)[None, :])


@triton.jit
def _chunks_partials_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
    HAS_BIAS: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, STORE_RESIDUAL: tl.constexpr, MASK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, K_CHUNK: tl.constexpr, NC: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_dtype: tl.constexpr = partials_ptr.dtype.element_ty
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    wt = load_wt_chunks(w_ptr, offs_o, mask_o, D, stride_wo, stride_wd, acc_dtype, NC, K_CHUNK)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(acc_dtype)
    dw = zero_chunks(BLOCK_O, acc_dtype, NC, K_CHUNK)
    db_acc = tl.zeros([BLOCK_O], dtype=acc_dtype)
    loss_acc = tl.zeros([BLOCK_O], dtype=acc_dtype)

    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    for tile in tl.range(pid, n_tiles, n_programs, num_stages=NUM_STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        if HAS_ROW_INDEX:  # mini-batch rows gathered on the fly
            rows = tl.load(row_index_ptr + offs_n.to(tl.int64) * stride_index, mask=mask_n, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        # X·Wᵀ over the chunks in order: one accumulator, no cross-warp sum.
        x = ()
        for c in tl.static_range(NC):
            xc = load_x_chunk(x_ptr, rows, mask_n, c, D, stride_xn, stride_xd, acc_dtype, MASK_D, K_CHUNK)
            x = x + (xc,)
            if c == 0:
                pred = tl.dot(xc, wt[c], input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
            else:
                pred = tl.dot(xc, wt[c], pred, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
        if HAS_BIAS:
            pred += bias[None, :]
        mask_no = mask_n[:, None] & mask_o[None, :]
        target = tl.load(t_ptr + rows[:, None] * stride_tn + offs_o[None, :] * stride_to, mask=mask_no,
                         other=0.0).to(acc_dtype)
        r = tl.where(mask_no, pred - target, 0.0)
        loss_acc += tl.sum(r * r, axis=0)
        db_acc += tl.sum(r, axis=0)
        if STORE_RESIDUAL:  # kept only when x (or the target) needs a gradient
            tl.store(residual_ptr + offs_n[:, None].to(tl.int64) * O + offs_o[None, :], r, mask=mask_no)
        # dWₖ += Rᵀ·Xₖ, each chunk in its own accumulator.
        rt = tl.trans(r)
        new_dw = ()
        for c in tl.static_range(NC):
            product = tl.dot(rt, x[c], input_precision=INPUT_PRECISION, out_dtype=acc_dtype)
            new_dw = new_dw + (accumulate(dw[c], product, INPUT_PRECISION),)
        dw = new_dw

    partial_row = partials_ptr + pid.to(tl.int64) * stride_partials
    store_dw_chunks(partial_row, dw, offs_o, mask_o, D, NC, K_CHUNK)
    tl.store(partial_row + O * D + offs_o, db_acc, mask=mask_o)
    tl.store(partial_row + O * D + O, tl.sum(loss_acc, axis=0))


def plan_chunks_partials(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    store_residual: bool = False,
    input_precision: str = "ieee",
    config: ChunksConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, GradPartials]:
    """The launch of chunks_partials and its (not yet written) outputs (fp32 accumulation)."""
    n_rows = row_index.numel() if row_index is not None else x.shape[0]
    out_features, in_features = weight.shape
    acc = accumulator_dtype(weight.dtype)
    if acc != torch.float32 or input_precision != "ieee":
        raise ValueError("the chunks formulation is IEEE fp32 accumulation (FMA dots); "
                         f"got {acc} with input_precision={input_precision!r}: use the default kernel")
    profile = profile or device_profile(x.device)
    cfg = config or chunks_config(in_features, out_features, profile, x.element_size())
    if cfg.k_chunk * cfg.chunks < in_features or cfg.block_o < out_features:
        raise ValueError(f"{cfg} does not cover D={in_features}, O={out_features}")
    n_programs = max(1, min(triton.cdiv(n_rows, cfg.block_n), cfg.max_programs))
    args, outputs = gradient_pass(x, weight, bias, target, row_index, n_programs, acc, store_residual)
    constexprs = dict(
        HAS_BIAS=bias is not None, HAS_ROW_INDEX=row_index is not None, STORE_RESIDUAL=store_residual,
        MASK_D=cfg.k_chunk * cfg.chunks != in_features, INPUT_PRECISION=input_precision,
        NUM_STAGES=cfg.num_stages, BLOCK_N=cfg.block_n, BLOCK_O=cfg.block_o, K_CHUNK=cfg.k_chunk, NC=cfg.chunks,
    )
    return LaunchPlan(_chunks_partials_kernel, (n_programs,), args, constexprs, cfg.num_warps, cfg.num_stages), outputs


def chunks_partials(x, weight, bias, target, *, row_index=None, store_residual=False, input_precision="ieee",
                    config: ChunksConfig | None = None) -> GradPartials:
    """linear_mse_grad.linear_mse_partials, in the chunks formulation."""
    plan, partials = plan_chunks_partials(x, weight, bias, target, row_index=row_index,
                                          store_residual=store_residual, input_precision=input_precision,
                                          config=config)
    plan.launch()
    return partials
