"""Gradient pass, "mma" formulation: bf16 X on the tensor cores, fp32-exact through three-term splits.

The same sums as linear_mse_grad.py (Σ R², Σ_rows R, Rᵀ·X into one partial row per program,
columns [dW (O·D, row-major) | db (O) | loss (1)]) and the same walk as grad_chunks.py (each row
tile as NC chunks of K_CHUNK columns, X·Wᵀ chained over them in one accumulator, NC dW
accumulators in registers for the whole loop). What differs is the product.

A bf16 X is exact in bf16, so each product needs only its fp32 operand split. An fp32 value v is
the sum of three bf16 values (8 significand bits each, fp32's exponent range):

    hi = bf16(v),  mid = bf16(v − hi),  lo = bf16(v − hi − mid),   v = hi + mid + lo exactly

(both subtractions are exact: each leaves the bits the last rounding dropped; for |v| >= 2⁻¹¹⁰,
below which lo is subnormal and keeps fewer bits). So

    X·Wᵀ = X·loᵀ + X·midᵀ + X·hiᵀ          W split once per program, before the row loop
    Rᵀ·X = loᵀ·X + midᵀ·X + hiᵀ·X          R split per tile

are three bf16 MMAs each, whose products are exact and whose sums are fp32: the fp32 products of
the upcast operands, as "tf32x3" promises, on bf16 tensor cores (twice tf32's rate) and with no
fp32 copy of X in registers. (Smallest terms first: the MMA's truncating sums lose least.) The sums
into dW leave the MMA accumulator (tiles.accumulate: rounded to nearest), as on every tensor-core
path.

Triton's interpreter computes bf16 dots wrong (3.9: garbage), so under it NATIVE_BF16 is off and
the same split terms are multiplied as fp32 (exact either way: a bf16 × bf16 product fits fp32):
the twin the parity tests run. The loss and db sums stay elementwise in the tile's layout and are
reduced once, after the loop. Deterministic: each program writes only its own partial row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import ChunksConfig, mma_config
from .device import DeviceProfile, device_profile
from .grad_chunks import load_wt_chunks, load_x_chunk, store_dw_chunks, zero_chunks
from .plan import LaunchPlan
from .specs import GradPartials, gradient_pass
from .tiles import accumulate


@triton.jit
def split3(v):
    """fp32 v -> (lo, mid, hi), bf16 each, with lo + mid + hi == v (to fp32's 24 bits)."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return lo, mid, hi


@triton.jit
def dot3(a, b, acc, SPLIT_A: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """acc + a·b where one operand is a split triple (lo, mid, hi) and the other a bf16 tile."""
    for k in tl.static_range(3):
        if SPLIT_A:
            lhs = a[k]
            rhs = b
        else:
            lhs = a
            rhs = b[k]
        if not NATIVE_BF16:  # the interpreter's twin: the same exact products, as fp32
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        acc = tl.dot(lhs, rhs, acc, input_precision="ieee", out_dtype=tl.float32)
    return acc


@triton.jit
def _mma_partials_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
    HAS_BIAS: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, STORE_RESIDUAL: tl.constexpr, MASK_D: tl.constexpr,
    NATIVE_BF16: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, K_CHUNK: tl.constexpr, NC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    # Wᵀ's chunks [K_CHUNK, BLOCK_O], each as its (lo, mid, hi) split: loaded and split once.
    w_chunks = load_wt_chunks(w_ptr, offs_o, mask_o, D, stride_wo, stride_wd, tl.float32, NC, K_CHUNK)
    wt = ()
    for c in tl.static_range(NC):
        wt = wt + (split3(w_chunks[c]),)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    dw = zero_chunks(BLOCK_O, tl.float32, NC, K_CHUNK)
    sum_r = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
    sum_r2 = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)

    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    for tile in tl.range(pid, n_tiles, n_programs, num_stages=NUM_STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        if HAS_ROW_INDEX:  # mini-batch rows gathered on the fly
            rows = tl.load(row_index_ptr + offs_n.to(tl.int64) * stride_index, mask=mask_n, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        # X·Wᵀ over the chunks in order, three MMAs a chunk, one accumulator. X stays bf16.
        pred = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
        x = ()
        for c in tl.static_range(NC):
            xc = load_x_chunk(x_ptr, rows, mask_n, c, D, stride_xn, stride_xd, tl.bfloat16, MASK_D, K_CHUNK)
            x = x + (xc,)
            pred = dot3(xc, wt[c], pred, False, NATIVE_BF16)
        if HAS_BIAS:
            pred += bias[None, :]
        mask_no = mask_n[:, None] & mask_o[None, :]
        target = tl.load(t_ptr + rows[:, None] * stride_tn + offs_o[None, :] * stride_to, mask=mask_no,
                         other=0.0).to(tl.float32)
        r = tl.where(mask_no, pred - target, 0.0)
        sum_r += r
        sum_r2 = tl.fma(r, r, sum_r2)
        if STORE_RESIDUAL:  # kept only when x (or the target) needs a gradient
            tl.store(residual_ptr + offs_n[:, None].to(tl.int64) * O + offs_o[None, :], r, mask=mask_no)
        # dWₖ += Rᵀ·Xₖ: Rᵀ split once per tile, three MMAs per chunk, summed into dW outside the MMA.
        lo, mid, hi = split3(r)
        rt = (tl.trans(lo), tl.trans(mid), tl.trans(hi))
        new_dw = ()
        for c in tl.static_range(NC):
            product = dot3(rt, x[c], tl.zeros([BLOCK_O, K_CHUNK], dtype=tl.float32), True, NATIVE_BF16)
            new_dw = new_dw + (accumulate(dw[c], product, "tf32x3"),)
        dw = new_dw

    partial_row = partials_ptr + pid.to(tl.int64) * stride_partials
    store_dw_chunks(partial_row, dw, offs_o, mask_o, D, NC, K_CHUNK)
    tl.store(partial_row + O * D + offs_o, tl.sum(sum_r, axis=0), mask=mask_o)
    tl.store(partial_row + O * D + O, tl.sum(tl.sum(sum_r2, axis=1), axis=0))


def plan_mma_partials(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    store_residual: bool = False,
    config: ChunksConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, GradPartials]:
    """The launch of mma_partials and its (not yet written) outputs: bf16 X, fp32 weights and sums."""
    n_rows = row_index.numel() if row_index is not None else x.shape[0]
    out_features, in_features = weight.shape
    if x.dtype != torch.bfloat16 or weight.dtype != torch.float32:
        raise ValueError(f"the mma formulation takes a bfloat16 x and float32 weights (got {x.dtype}, "
                         f"{weight.dtype}): use the chunks or default kernel")
    profile = profile or device_profile(x.device)
    cfg = config or mma_config(in_features, out_features, profile)
    if cfg.k_chunk * cfg.chunks < in_features or cfg.block_o < out_features:
        raise ValueError(f"{cfg} does not cover D={in_features}, O={out_features}")
    n_programs = max(1, min(triton.cdiv(n_rows, cfg.block_n), cfg.max_programs))
    args, outputs = gradient_pass(x, weight, bias, target, row_index, n_programs, torch.float32, store_residual)
    constexprs = dict(
        HAS_BIAS=bias is not None, HAS_ROW_INDEX=row_index is not None, STORE_RESIDUAL=store_residual,
        MASK_D=cfg.k_chunk * cfg.chunks != in_features, NATIVE_BF16=profile.gpu,
        NUM_STAGES=cfg.num_stages, BLOCK_N=cfg.block_n, BLOCK_O=cfg.block_o, K_CHUNK=cfg.k_chunk, NC=cfg.chunks,
    )
    return LaunchPlan(_mma_partials_kernel, (n_programs,), args, constexprs, cfg.num_warps, cfg.num_stages), outputs


def mma_partials(x, weight, bias, target, *, row_index=None, store_residual=False,
                 config: ChunksConfig | None = None) -> GradPartials:
    """linear_mse_grad.linear_mse_partials for a bf16 x, in the mma formulation ("tf32x3" accuracy)."""
    plan, partials = plan_mma_partials(x, weight, bias, target, row_index=row_index,
                                       store_residual=store_residual, config=config)
    plan.launch()
    return partials
