"""Single-pass gradient kernel: fused linear forward + MSE + partial dW/db.

For each tile of BLOCK_N rows a program forms the residual

    R = X·Wᵀ + b − T                                  (BLOCK_N × O)

and, while the tile is still on chip, accumulates the three sums that the
loss and both parameter gradients need:

    Σ R²  (loss)      Σ_rows R  (db)      Rᵀ·X  (dW)

The programs are persistent: each walks every n_programs-th row tile, and
that loop is software-pipelined (the next tiles load while one is computed).
X and T are read once when D fits one block (ONE_D_BLOCK, a compile-time
constant: the usual case); otherwise each D chunk is read twice, the second
time mostly from cache. Each program owns one row of a partial buffer
``partials[P, K]`` with K = O·D + O + 1: dW flattened row-major, then db,
then the loss. The reduction over programs (reduce_update.py) is a
fixed-order sum, so there are no float atomics and the same inputs give
bitwise the same results on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import DeviceProfile, TileConfig, device_profile, grad_config
from .plan import LaunchPlan, fitted
from .specs import GradPartials, accumulator_dtype, gradient_pass
from .tiles import accumulate, load_rows, rt_times_x, x_times_wt


@triton.jit
def _linear_mse_partials_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
    HAS_BIAS: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr, ONE_D_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    partial_sums(x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
                 n_rows, D, O, n_programs,
                 stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
                 HAS_BIAS, HAS_ROW_INDEX, STORE_RESIDUAL, INPUT_PRECISION, USE_DOT, ONE_D_BLOCK, NUM_STAGES,
                 BLOCK_N, BLOCK_D, BLOCK_O)


@triton.jit
def partial_sums(
    x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
    HAS_BIAS: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr, ONE_D_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """One program's share of the pass: its row tiles summed into its row of the partial buffer
    (the kernel above; kernels/sgd_step.py runs it before finishing the sums in the same launch)."""
    pid = tl.program_id(0)
    # n_programs is the grid, passed in: Triton 3.6's interpreter gives tl.num_programs as a 1-element array.
    # Products run in the accumulator dtype: half-precision inputs are upcast on
    # chip (exact), so fp32 master weights keep their precision in both products.
    acc_dtype: tl.constexpr = partials_ptr.dtype.element_ty

    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    partial_row = partials_ptr + pid.to(tl.int64) * stride_partials

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(acc_dtype)
    loss_acc = tl.zeros([BLOCK_O], dtype=acc_dtype)
    db_acc = tl.zeros([BLOCK_O], dtype=acc_dtype)
    dw_acc = tl.zeros([BLOCK_O, BLOCK_D], dtype=acc_dtype)
    w = load_rows(w_ptr, offs_o, offs_d, mask_o, mask_d, stride_wo, stride_wd, acc_dtype)
    if not ONE_D_BLOCK:
        # The chunks of dW after the first are summed in this program's partial row: zero it first.
        for d0 in tl.range(BLOCK_D, D, BLOCK_D, num_stages=1):
            dd = d0 + offs_d
            tl.store(partial_row + offs_o[:, None] * D + dd[None, :], tl.zeros([BLOCK_O, BLOCK_D], dtype=acc_dtype),
                     mask=mask_o[:, None] & (dd < D)[None, :])
        # The chunked dW below read-modify-writes this row; the thread that reads an
        # element need not be the one that wrote it, so order the writes first.
        tl.debug_barrier()

    for tile in tl.range(pid, n_tiles, n_programs, num_stages=NUM_STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        if HAS_ROW_INDEX:  # mini-batch rows gathered on the fly: no copy of X per batch
            rows = tl.load(row_index_ptr + offs_n.to(tl.int64) * stride_index, mask=mask_n, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)

        # Forward: pred = X·Wᵀ (+ the later D chunks when D does not fit one block).
        x = load_rows(x_ptr, rows, offs_d, mask_n, mask_d, stride_xn, stride_xd, acc_dtype)
        pred = x_times_wt(x, w, INPUT_PRECISION, USE_DOT)
        if not ONE_D_BLOCK:
            # The D chunks inside a row tile are not pipelined (num_stages=1): pipeline buffers
            # for a W chunk would take BLOCK_O·BLOCK_D·4 bytes of shared memory per stage.
            for d0 in tl.range(BLOCK_D, D, BLOCK_D, num_stages=1):
                dd = d0 + offs_d
                md = dd < D
                xc = load_rows(x_ptr, rows, dd, mask_n, md, stride_xn, stride_xd, acc_dtype)
                wc = load_rows(w_ptr, offs_o, dd, mask_o, md, stride_wo, stride_wd, acc_dtype)
                pred += x_times_wt(xc, wc, INPUT_PRECISION, USE_DOT)
        if HAS_BIAS:
            pred += bias[None, :]

        mask_no = mask_n[:, None] & mask_o[None, :]
        target = load_rows(t_ptr, rows, offs_o, mask_n, mask_o, stride_tn, stride_to, acc_dtype)
        r = tl.where(mask_no, pred - target, 0.0)
        loss_acc += tl.sum(r * r, axis=0)
        db_acc += tl.sum(r, axis=0)
        if STORE_RESIDUAL:  # kept only when x (or the target) needs a gradient
            tl.store(residual_ptr + offs_n[:, None].to(tl.int64) * O + offs_o[None, :], r, mask=mask_no)

        # dW += Rᵀ·X. The first chunk is still in registers; later chunks are
        # re-read and summed into this program's own partial row (it alone
        # touches that row, so the read-modify-write needs no atomics).
        dw_acc = accumulate(dw_acc, rt_times_x(r, x, INPUT_PRECISION, USE_DOT), INPUT_PRECISION)
        if not ONE_D_BLOCK:
            for d0 in tl.range(BLOCK_D, D, BLOCK_D, num_stages=1):
                dd = d0 + offs_d
                md = dd < D
                xc = load_rows(x_ptr, rows, dd, mask_n, md, stride_xn, stride_xd, acc_dtype)
                contrib = rt_times_x(r, xc, INPUT_PRECISION, USE_DOT)
                ptrs = partial_row + offs_o[:, None] * D + dd[None, :]
                mask_od = mask_o[:, None] & md[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=mask_od) + contrib, mask=mask_od)
            tl.debug_barrier()  # this tile's writes land before the next tile reads them

    tl.store(partial_row + offs_o[:, None] * D + offs_d[None, :], dw_acc, mask=mask_o[:, None] & mask_d[None, :])
    tl.store(partial_row + O * D + offs_o, db_acc, mask=mask_o)
    tl.store(partial_row + O * D + O, tl.sum(loss_acc, axis=0))


def plan_linear_mse_partials(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    store_residual: bool = False,
    input_precision: str = "ieee",
    config: TileConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, GradPartials]:
    """The launch of linear_mse_partials and its (not yet written) outputs.

    profile: the device to plan for (default: x's device); the compile report
    plans for a GPU with tensors on the meta device.
    """
    n_rows = row_index.numel() if row_index is not None else x.shape[0]
    out_features, in_features = weight.shape
    acc = accumulator_dtype(weight.dtype)
    if acc == torch.float64:
        input_precision = "ieee"  # tf32 is a float32 mode
    profile = profile or device_profile(x.device)
    cfg = config or grad_config(in_features, out_features, profile, acc, input_precision, x.element_size())
    if cfg.block_o < out_features:
        raise ValueError(f"block_o={cfg.block_o} < out_features={out_features}: one program holds every output")

    def make(cfg: TileConfig) -> tuple[LaunchPlan, GradPartials]:
        n_programs = triton.cdiv(n_rows, cfg.block_n)
        if cfg.max_programs:
            n_programs = min(n_programs, cfg.max_programs)
        args, outputs = gradient_pass(x, weight, bias, target, row_index, n_programs, acc, store_residual)
        constexprs = dict(
            HAS_BIAS=bias is not None, HAS_ROW_INDEX=row_index is not None, STORE_RESIDUAL=store_residual,
            INPUT_PRECISION=input_precision, USE_DOT=cfg.use_dot, ONE_D_BLOCK=cfg.block_d >= in_features,
            NUM_STAGES=cfg.num_stages, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_O=cfg.block_o,
        )
        plan = LaunchPlan(_linear_mse_partials_kernel, (n_programs,), args, constexprs, cfg.num_warps,
                          cfg.num_stages)
        return plan, outputs

    if config is not None:  # the caller's config, as given
        return make(cfg)
    key = ("grad", cfg, profile, x.device, x.dtype, weight.dtype, target.dtype, bias is not None,
           row_index is not None, store_residual, input_precision)
    return fitted(make, cfg, profile, x.device, key)


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
    row_index: optional (n,) int tensor, any stride; the batch is then rows
    x[row_index], target[row_index], gathered inside the kernel.
    """
    plan, partials = plan_linear_mse_partials(x, weight, bias, target, row_index=row_index,
                                              store_residual=store_residual, input_precision=input_precision,
                                              config=config)
    plan.launch()
    return partials
