"""The one-pass R factor of a least-squares problem: Q-less tall-skinny QR (TSQR).

With Z = [1, X − s, T − s_t] (N × P, P = 1 + D + O; s, s_t a shift near the mean,
so that no column sits far from 0), the statistic is the upper-triangular R of
Z = Q·R (Q never formed). RᵀR = ZᵀZ, so R holds everything the normal equations
do, but a solve with R loses digits in proportion to cond(Z), not cond(Z)².

The pass (Demmel, Hoemmen, Grigori and Langou, "Communication-avoiding parallel
and sequential QR factorizations", 2008). Each program walks its share of the rows
in tiles of BLOCK_N rows and folds each tile into its own R: the QR of [R; tile]
by P Householder reflections, the k-th mapping (R[k, k], tile[:, k]) onto
(‖·‖, 0). The reflections are chosen so that R's diagonal stays ≥ 0 (LAPACK's
dlarfgp), which makes R unique for full-rank data. The programs' R factors are
then folded the same way, FAN_IN at a time in a fixed order (the same kernel,
reading the stacked R's as rows), until one is left: no atomics, bitwise the same
every run. All arithmetic is in ACC (fp64 by default; fp32 for precision="fp32").

A program keeps its tile in registers and its R (BLOCK_P × BLOCK_P, at most
64 × 64 fp64 = 32 KB) in its own slot of the output, where step k reads and
writes only row k. Cost per tile: P steps of four reductions and two rank-1
updates over the tile: about 3·P·BLOCK_P fp64 operations per row (the dot-free
form of Householder's 2·P² flops). That is compute-bound on a GPU's fp64 units
for all but the narrowest P -- a prediction, not a measurement (docs/solver.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import next_power_of_2 as p2

from .plan import LaunchPlan
from .tiles import load_rows

MAX_COLUMNS = 64  # P = 1 + D + O beyond this takes the blocked torch QR (linreg_fused/factor.py)
FAN_IN = 8  # R factors folded by one program of a merge level
SHIFT_ROWS = 1024  # the shift is the mean of this many leading rows


@dataclass(frozen=True)
class QRConfig:
    block_n: int
    block_p: int
    n_programs: int  # of the first (data) launch
    num_warps: int = 4


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def qr_config(n_rows: int, n_columns: int, device: torch.device) -> QRConfig:
    """Blocks of the pass: a tile of about 2048 elements on a GPU (a 32 × 64 fp64 tile is 16
    values per thread of 4 warps; compiled for sm_90 without spills, bench/compile_qr.py);
    up to 1024-row tiles under the interpreter, where per-op overhead, not registers, sets the cost."""
    block_p = max(2, p2(n_columns))
    if device.type == "cuda":
        block_n = max(16, min(256, 2048 // block_p))
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = 4 * _multiprocessor_count(index)  # programs in flight: fp64 latency wants several per SM
    else:  # the interpreter: each tl op is a NumPy call, so few large tiles; up to 3 programs and a merge
        block_n = max(16, min(1024, p2(n_rows)))
        target = 3
    tiles = triton.cdiv(n_rows, block_n)
    n_programs = max(1, min(target, tiles))
    return QRConfig(block_n, block_p, n_programs)


# ---------------------------------------------------------------- the kernel
@triton.jit
def _absorb(r_base, a, cols, P, BLOCK_P: tl.constexpr):
    """R <- the R factor of [R; a]: R is this program's (BLOCK_P × BLOCK_P, row-major at
    r_base, upper-triangular, diagonal ≥ 0), a a (BLOCK_N, BLOCK_P) tile of rows (0 beyond P)."""
    for k in range(0, P):
        sel = cols == k
        a_k = tl.sum(tl.where(sel[None, :], a, 0.0), axis=1)  # column k of the tile
        r_k = tl.load(r_base + k * BLOCK_P + cols, mask=cols >= k, other=0.0)  # row k of R
        alpha = tl.sum(tl.where(sel, r_k, 0.0), axis=0)
        # The reflector of (alpha, a_k) scaled by their largest magnitude m: no overflow or
        # underflow in the squares, whatever the data's scale (m = 0: nothing to reflect).
        m = tl.maximum(tl.abs(alpha), tl.max(tl.abs(a_k), axis=0))
        m = tl.where(m > 0, m, 1.0)
        alpha = alpha / m
        a_k = a_k / m
        xx = tl.sum(a_k * a_k, axis=0)
        sigma = tl.sqrt(alpha * alpha + xx)
        # v = (alpha − sigma, a_k); alpha − sigma = −xx / (alpha + sigma) when alpha > 0 (no cancellation)
        v0 = tl.where(alpha > 0, -xx / tl.where(alpha > 0, alpha + sigma, 1.0), alpha - sigma)
        vv = v0 * v0 + xx
        tau = tl.where(vv > 0, 2.0 / tl.where(vv > 0, vv, 1.0), 0.0)  # H = I − tau·v·vᵀ; v = 0: H = I
        # Column j > k of [R; a] takes −v·w_j with w_j = tau·vᵀ(R[k, j], a[:, j]) (m cancels out)
        w = tl.where(cols > k, tau * (v0 * r_k + tl.sum(a_k[:, None] * a, axis=0)), 0.0)
        tl.store(r_base + k * BLOCK_P + cols, tl.where(sel, sigma * m, r_k - v0 * w), mask=cols >= k)
        a = a - a_k[:, None] * w[None, :]


@triton.jit
def _tsqr_kernel(
    src_ptr, t_ptr, shift_ptr, r_ptr,
    n_rows, rows_per_program, D, P, stride_sn, stride_sd, stride_tn, stride_to,
    DATA: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program p folds rows [p·rows_per_program, …) into R slot p (zero on entry).

    DATA: the rows are [1, x − s, t − s_t] built from x (src) and t; otherwise src holds
    rows of P values already (stacked R factors of a previous level)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_P)
    r_base = r_ptr + pid.to(tl.int64) * (BLOCK_P * BLOCK_P)
    row_start = pid.to(tl.int64) * rows_per_program  # 64-bit: N·stride may exceed 2³¹
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    is_x = (cols >= 1) & (cols <= D)
    is_t = (cols > D) & (cols < P)
    shift = tl.load(shift_ptr + cols, mask=is_x | is_t, other=0.0).to(ACC)
    x_col = tl.maximum(cols - 1, 0)
    t_col = tl.maximum(cols - 1 - D, 0)
    for start in range(row_start, row_end, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        live = rows < row_end
        if DATA:
            xv = load_rows(src_ptr, rows, x_col, live, is_x, stride_sn, stride_sd, ACC)
            tv = load_rows(t_ptr, rows, t_col, live, is_t, stride_tn, stride_to, ACC)
            a = tl.where(live[:, None] & (is_x | is_t)[None, :], xv + tv - shift[None, :], 0.0)
            a = tl.where(live[:, None] & (cols == 0)[None, :], 1.0, a)
        else:
            a = load_rows(src_ptr, rows, cols, live, cols < P, stride_sn, stride_sd, ACC)
        tl.debug_barrier()  # the previous tile's stores to R land before this tile reads R
        _absorb(r_base, a, cols, P, BLOCK_P)


# ---------------------------------------------------------------- launch helpers
def plan_data_pass(x: torch.Tensor, target: torch.Tensor, shift: torch.Tensor, *, fp64: bool,
                   config: QRConfig) -> tuple[LaunchPlan, torch.Tensor]:
    """The first launch: (plan, partials (n_programs, BLOCK_P, BLOCK_P) in the accumulator dtype)."""
    n_rows, d = x.shape
    cfg = config
    acc = torch.float64 if fp64 else torch.float32
    partials = torch.zeros((cfg.n_programs, cfg.block_p, cfg.block_p), device=x.device, dtype=acc)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, cfg.n_programs), cfg.block_n) * cfg.block_n
    args = dict(src_ptr=x, t_ptr=target, shift_ptr=shift, r_ptr=partials, n_rows=n_rows,
                rows_per_program=rows_per_program, D=d, P=1 + d + target.shape[1], stride_sn=x.stride(0),
                stride_sd=x.stride(1), stride_tn=target.stride(0), stride_to=target.stride(1))
    constexprs = dict(DATA=True, ACC=tl.float64 if fp64 else tl.float32, BLOCK_N=cfg.block_n, BLOCK_P=cfg.block_p)
    return LaunchPlan(_tsqr_kernel, (cfg.n_programs,), args, constexprs, cfg.num_warps, 1), partials


def plan_merge(partials: torch.Tensor, n_columns: int, *, block_n: int,
               num_warps: int = 4) -> tuple[LaunchPlan, torch.Tensor]:
    """One merge level: FAN_IN consecutive R factors (fp64) per program."""
    count, block_p, _ = partials.shape
    n_programs = triton.cdiv(count, FAN_IN)
    out = torch.zeros((n_programs, block_p, block_p), device=partials.device, dtype=torch.float64)
    rows = partials.view(count * block_p, block_p)
    args = dict(src_ptr=rows, t_ptr=rows, shift_ptr=rows, r_ptr=out, n_rows=count * block_p,
                rows_per_program=FAN_IN * block_p, D=0, P=n_columns, stride_sn=block_p, stride_sd=1,
                stride_tn=block_p, stride_to=1)
    constexprs = dict(DATA=False, ACC=tl.float64, BLOCK_N=block_n, BLOCK_P=block_p)
    return LaunchPlan(_tsqr_kernel, (n_programs,), args, constexprs, num_warps, 1), out


def linear_qr(x: torch.Tensor, target: torch.Tensor, shift: torch.Tensor, *, fp64: bool = True,
              config: QRConfig | None = None) -> torch.Tensor:
    """R (P × P, fp64, upper-triangular, diagonal ≥ 0) of [1, x − shift[:D], target − shift[D:]].

    x (N, D), target (N, O): any strides, fp32/bf16/fp16/fp64 (one dtype), N ≥ 1, 1 + D + O ≤
    MAX_COLUMNS. shift (D + O,) in the accumulator dtype: subtracted exactly as given.
    fp64=False accumulates the first level in fp32 (the merges stay fp64). A few launches
    whose number depends on the shapes only; no host sync."""
    n_rows, d = x.shape
    n_columns = 1 + d + target.shape[1]
    if n_columns > MAX_COLUMNS:
        raise ValueError(f"1 + D + O = {n_columns} > {MAX_COLUMNS}: one program holds the R factor")
    cfg = config or qr_config(n_rows, n_columns, x.device)
    # Slot 0 of the kernel's shift is the ones column's (never read): shift[c − 1] is column c's.
    padded = torch.zeros(cfg.block_p, device=x.device, dtype=shift.dtype)
    padded[1:n_columns] = shift
    plan, partials = plan_data_pass(x, target, padded, fp64=fp64, config=cfg)
    plan.launch()
    partials = partials.double()
    # Merge tiles: the stacked R's are mostly zeros below their diagonals; under the
    # interpreter, fewer and larger tiles cost less.
    merge_rows = cfg.block_n if x.device.type == "cuda" else min(256, FAN_IN * cfg.block_p)
    while partials.shape[0] > 1:
        plan, partials = plan_merge(partials, n_columns, block_n=merge_rows, num_warps=cfg.num_warps)
        plan.launch()
    return partials[0, :n_columns, :n_columns]
