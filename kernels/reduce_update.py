"""Reduce-and-update kernel: finish the partial sums, then write a gradient
or apply the SGD update in place.

The partial buffer from linear_mse_grad.py holds one row per program. A
program here owns a block of columns and sums them over all rows in a fixed
order (deterministic), scales the sum by the loss factor times grad_output
(read from device memory: no host sync), and then either stores the
gradient or applies torch.optim.SGD's update to the parameter and its
momentum buffer. Weight and bias (and the loss) are finished in one launch:

    g = −g if maximize;  g += weight_decay·p;
    buf = g (first step) or momentum·buf + (1 − dampening)·g
    g = g + momentum·buf if nesterov else buf;  p −= lr·g

All of it runs in fp32 registers (fp64 for fp64 parameters), whatever the
dtype of the partials, parameter and buffer: a bf16/fp16 value is rounded
once, when it is stored. The same kernel serves FusedSGD.step() on ordinary
``.grad`` tensors: a gradient is a partial buffer with one row. Float
arguments are fp64 (tiles.f64_scalar), so fp64 updates are exact on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import specs
from .config import DeviceProfile, ReduceConfig, device_profile, reduce_config
from .plan import LaunchPlan
from .specs import ColumnTarget, SGDHyper, accumulator_dtype
from .tiles import f64_scalar

# The bits of SGDHyper.flags, as compile-time constants of the kernels.
MAXIMIZE = tl.constexpr(specs.MAXIMIZE)
WEIGHT_DECAY = tl.constexpr(specs.WEIGHT_DECAY)
MOMENTUM = tl.constexpr(specs.MOMENTUM)
NESTEROV = tl.constexpr(specs.NESTEROV)

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def sgd_update(param, grad, buf, buf_decay, grad_weight, lr, momentum, weight_decay, FLAGS: tl.constexpr):
    """torch.optim.SGD's update for one block; returns (param, buf).

    buf = buf_decay·buf + grad_weight·g: (momentum, 1 − dampening) on a normal
    step and (0, 1) on the first, where SGD sets the buffer to the gradient
    (the buffer then starts zeroed, so no garbage reaches the product).
    """
    if MAXIMIZE & FLAGS:
        grad = -grad
    if WEIGHT_DECAY & FLAGS:
        grad = grad + weight_decay * param
    if MOMENTUM & FLAGS:
        buf = buf_decay * buf + grad_weight * grad
        if NESTEROV & FLAGS:
            grad = grad + momentum * buf
        else:
            grad = buf
    return param - lr * grad, buf


@triton.jit
def buffer_coefficients(momentum, grad_weight, first_step, INIT_BUFFER: tl.constexpr):
    """sgd_update's (buf_decay, grad_weight): (momentum, grad_weight), or (0, 1) on the first step of a
    kernel that creates the buffer (SGD sets a new buffer to the gradient)."""
    decay, weight = momentum, grad_weight
    if INIT_BUFFER:
        decay = tl.where(first_step, 0.0, decay)
        weight = tl.where(first_step, 1.0, weight)
    return decay, weight


@triton.jit
def column_sums(partials_ptr, n_partials, stride_partials, cols, mask_c, ACC_DTYPE: tl.constexpr,
                LANES: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Σ_p partials[p, cols] over the n_partials rows, in an order fixed by n_partials and LANES alone.

    Lane i sums rows i, i + LANES, i + 2·LANES, ... one after another; the
    LANES lane sums are then added pairwise in a fixed tree ((0+1)+(2+3))+...
    Neither step depends on how Triton lays the tile out over threads (an add
    of two values is the same in either order), so any kernel that sums with
    the same LANES gets the same bits, whatever its warps and blocks: the
    one-launch step (kernels/sgd_step.py) and this file's kernels agree.
    NUM_STAGES pipelines the loads of the row loop; the adds keep their order.
    """
    offs_p = tl.arange(0, LANES)
    acc = tl.zeros([LANES, cols.shape[0]], dtype=ACC_DTYPE)
    for p0 in tl.range(0, n_partials, LANES, num_stages=NUM_STAGES):
        p = p0 + offs_p
        # .cg: the one-launch step reads rows other programs wrote in the same launch (past L1).
        acc += tl.load(partials_ptr + p[:, None].to(tl.int64) * stride_partials + cols[None, :],
                       mask=(p[:, None] < n_partials) & mask_c[None, :], other=0.0, cache_modifier=".cg").to(ACC_DTYPE)
    return pairwise_rows(acc, LANES)


@triton.jit
def pairwise_rows(acc, LANES: tl.constexpr):
    """Σ over the LANES (a power of two, <= 64) rows of acc, added in pairs level by level."""
    COLS: tl.constexpr = acc.shape[1]
    if LANES >= 64:
        acc = tl.sum(tl.reshape(acc, (32, 2, COLS)), axis=1)
    if LANES >= 32:
        acc = tl.sum(tl.reshape(acc, (16, 2, COLS)), axis=1)
    if LANES >= 16:
        acc = tl.sum(tl.reshape(acc, (8, 2, COLS)), axis=1)
    if LANES >= 8:
        acc = tl.sum(tl.reshape(acc, (4, 2, COLS)), axis=1)
    if LANES >= 4:
        acc = tl.sum(tl.reshape(acc, (2, 2, COLS)), axis=1)
    if LANES >= 2:
        acc = tl.sum(tl.reshape(acc, (1, 2, COLS)), axis=1)
    return tl.reshape(acc, (COLS,))


@triton.jit
def loss_sum(partials_ptr, n_partials, stride_partials, column, ACC_DTYPE: tl.constexpr, LANES: tl.constexpr):
    """Σ_p partials[p, column], in column_sums' order."""
    offs = tl.arange(0, 16)
    sums = column_sums(partials_ptr, n_partials, stride_partials, column + offs, offs < 1, ACC_DTYPE, LANES, 1)
    return tl.sum(tl.where(offs == 0, sums, 0.0), axis=0)  # one value plus zeros: exact


@triton.jit
def _sum_column_kernel(partials_ptr, out_ptr, scale: tl.float64, n_partials, stride_partials, column,
                       ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr):
    total = loss_sum(partials_ptr, n_partials, stride_partials, column, ACC_DTYPE, BLOCK_P)
    tl.store(out_ptr, total * f64_scalar(scale, ACC_DTYPE))


@triton.jit
def finish_columns(
    partials_ptr, n_partials, stride_partials, block, col_start, n_cols,
    scale, grad_output_ptr, out_ptr, buf_ptr, lr_ptr,
    lr, momentum, weight_decay, buf_decay, grad_weight,
    HAS_GRAD_OUTPUT: tl.constexpr, UPDATE: tl.constexpr, FLAGS: tl.constexpr, LR_FROM_PTR: tl.constexpr,
    ACC_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Block ``block`` of one target's columns: sum over the partial rows (column_sums), scale,
    then store the gradient or apply the SGD update. LR_FROM_PTR: the learning rate is read
    from lr_ptr (a tensor learning rate, which a schedule changes in place; no host sync)."""
    cols = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask_c = cols < n_cols
    grad = column_sums(partials_ptr, n_partials, stride_partials, col_start + cols, mask_c, ACC_DTYPE, BLOCK_P,
                       NUM_STAGES)
    grad = grad * f64_scalar(scale, ACC_DTYPE)
    if HAS_GRAD_OUTPUT:
        grad = grad * tl.load(grad_output_ptr).to(ACC_DTYPE)
    if UPDATE:  # out_ptr is the parameter, updated in place
        if LR_FROM_PTR:
            step = tl.load(lr_ptr).to(tl.float64).to(ACC_DTYPE)
        else:
            step = f64_scalar(lr, ACC_DTYPE)
        param = tl.load(out_ptr + cols, mask=mask_c).to(ACC_DTYPE)
        buf = grad
        if MOMENTUM & FLAGS:
            buf = tl.load(buf_ptr + cols, mask=mask_c).to(ACC_DTYPE)
        param, buf = sgd_update(param, grad, buf, f64_scalar(buf_decay, ACC_DTYPE), f64_scalar(grad_weight, ACC_DTYPE),
                                step, f64_scalar(momentum, ACC_DTYPE), f64_scalar(weight_decay, ACC_DTYPE), FLAGS)
        tl.store(out_ptr + cols, param, mask=mask_c)  # the one rounding to the parameter's dtype
        if MOMENTUM & FLAGS:
            tl.store(buf_ptr + cols, buf, mask=mask_c)
    else:
        tl.store(out_ptr + cols, grad, mask=mask_c)


@triton.jit
def _reduce_update_kernel(
    # What changes from one launch to the next first (kernels/launch.py relaunches with new values of these).
    partials_ptr, grad_output_ptr, loss_ptr, a_out_ptr, a_buf_ptr, a_lr_ptr, b_out_ptr, b_buf_ptr, b_lr_ptr,
    scale: tl.float64, loss_scale: tl.float64,
    a_lr: tl.float64, a_momentum: tl.float64, a_weight_decay: tl.float64, a_buf_decay: tl.float64,
    a_grad_weight: tl.float64,
    b_lr: tl.float64, b_momentum: tl.float64, b_weight_decay: tl.float64, b_buf_decay: tl.float64,
    b_grad_weight: tl.float64,
    n_partials, stride_partials, a_col_start, a_n_cols, b_col_start, b_n_cols, loss_column,
    HAS_GRAD_OUTPUT: tl.constexpr, A_UPDATE: tl.constexpr, A_FLAGS: tl.constexpr, A_LR_FROM_PTR: tl.constexpr,
    B_UPDATE: tl.constexpr, B_FLAGS: tl.constexpr, B_LR_FROM_PTR: tl.constexpr, WRITE_LOSS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    # Two targets (weight and bias) in one launch: the first programs take A's
    # columns, the rest B's; program 0 also sums the loss column if asked.
    pid = tl.program_id(0)
    a_blocks = tl.cdiv(a_n_cols, BLOCK_COLS)
    if pid < a_blocks:
        finish_columns(partials_ptr, n_partials, stride_partials, pid, a_col_start, a_n_cols,
                       scale, grad_output_ptr, a_out_ptr, a_buf_ptr, a_lr_ptr,
                       a_lr, a_momentum, a_weight_decay, a_buf_decay, a_grad_weight,
                       HAS_GRAD_OUTPUT, A_UPDATE, A_FLAGS, A_LR_FROM_PTR, ACC_DTYPE, NUM_STAGES, BLOCK_P, BLOCK_COLS)
    else:
        finish_columns(partials_ptr, n_partials, stride_partials, pid - a_blocks, b_col_start, b_n_cols,
                       scale, grad_output_ptr, b_out_ptr, b_buf_ptr, b_lr_ptr,
                       b_lr, b_momentum, b_weight_decay, b_buf_decay, b_grad_weight,
                       HAS_GRAD_OUTPUT, B_UPDATE, B_FLAGS, B_LR_FROM_PTR, ACC_DTYPE, NUM_STAGES, BLOCK_P, BLOCK_COLS)
    if WRITE_LOSS:
        if pid == 0:
            total = loss_sum(partials_ptr, n_partials, stride_partials, loss_column, ACC_DTYPE, BLOCK_P)
            tl.store(loss_ptr, total * f64_scalar(loss_scale, ACC_DTYPE))


def _acc_of(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any operand is fp64, else fp32 (half-precision values are upcast)."""
    return torch.float64 if any(accumulator_dtype(t.dtype) == torch.float64 for t in tensors) else torch.float32


def summation_lanes(n_partials: int) -> int:
    """LANES of column_sums for a buffer of n_partials rows: every kernel that finishes the same
    buffer sums with this many lanes, so that all of them give the same bits."""
    return min(triton.next_power_of_2(max(n_partials, 1)), 32)


def plan_sum_column(partials: torch.Tensor, column: int, scale: float, out: torch.Tensor, *,
                    config: ReduceConfig | None = None, profile: DeviceProfile | None = None) -> LaunchPlan:
    """The launch of sum_column; profile: the device to plan for (default: partials' device)."""
    args = dict(partials_ptr=partials, out_ptr=out, scale=float(scale), n_partials=partials.shape[0],
                stride_partials=partials.stride(0), column=column)
    lanes = summation_lanes(partials.shape[0])
    constexprs = dict(ACC_DTYPE=_TL_ACC[_acc_of(partials, out)], BLOCK_P=lanes)
    return LaunchPlan(_sum_column_kernel, (1,), args, constexprs, num_warps=1 if lanes * 16 <= 256 else 4,
                      num_stages=1)


def sum_column(partials: torch.Tensor, column: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out (0-d) = scale · Σ_p partials[p, column], summed in fp32 (fp64 for fp64)."""
    plan_sum_column(partials, column, scale, out).launch()
    return out


def target_args(prefix: str, target: ColumnTarget | None, fallback: torch.Tensor) -> tuple[dict, dict]:
    """(runtime args, compile-time constants) of one target slot; an absent target has no columns."""
    names = [f"{prefix}_{n}" for n in ("col_start", "n_cols", "out_ptr", "buf_ptr", "lr_ptr", "lr", "momentum",
                                       "weight_decay", "buf_decay", "grad_weight")]
    upper = prefix.upper()
    if target is None:
        constants = {f"{upper}_UPDATE": False, f"{upper}_FLAGS": 0, f"{upper}_LR_FROM_PTR": False}
        return dict(zip(names, [0, 0, fallback, fallback, fallback, 0.0, 0.0, 0.0, 0.0, 0.0])), constants
    h = target.hyper or SGDHyper(lr=0.0)
    buf_decay, grad_weight = (0.0, 1.0) if target.init_buffer else (h.momentum, 1.0 - h.dampening)
    buf = target.momentum_buffer if target.momentum_buffer is not None else target.out
    lr_ptr = h.lr_tensor if h.lr_tensor is not None else fallback
    lr = 0.0 if h.lr_tensor is not None else float(h.lr)
    values = [target.col_start, target.out.numel(), target.out, buf, lr_ptr, lr, float(h.momentum),
              float(h.weight_decay), float(buf_decay), float(grad_weight)]
    constants = {f"{upper}_UPDATE": target.hyper is not None, f"{upper}_FLAGS": h.flags,
                 f"{upper}_LR_FROM_PTR": h.lr_tensor is not None}
    return dict(zip(names, values)), constants


def plan_reduce_update(
    partials: torch.Tensor,
    targets: list[ColumnTarget],
    *,
    scale: float,
    grad_output: torch.Tensor | None = None,
    loss_out: torch.Tensor | None = None,
    loss_column: int = 0,
    loss_scale: float = 1.0,
    config: ReduceConfig | None = None,
    profile: DeviceProfile | None = None,
    fallback: torch.Tensor | None = None,
) -> LaunchPlan:
    """The launch of reduce_update_ (see there); profile: the device to plan for (default: partials' device).
    fallback: what the pointers the kernel does not read point at (default: partials; a plan kept for
    later launches gives a small tensor of its own, so as not to keep the first call's partials alive)."""
    if not 1 <= len(targets) <= 2:
        raise ValueError(f"one launch takes one or two targets, got {len(targets)}")
    n_columns = sum(t.out.numel() for t in targets)
    cfg = config or reduce_config(partials.shape[0], n_columns, profile or device_profile(partials.device))
    fallback = partials if fallback is None else fallback
    a, a_constants = target_args("a", targets[0], fallback)
    b, b_constants = target_args("b", targets[1] if len(targets) == 2 else None, fallback)
    grid = (triton.cdiv(a["a_n_cols"], cfg.block_cols) + triton.cdiv(b["b_n_cols"], cfg.block_cols),)
    acc = _acc_of(partials, *(t.out for t in targets))
    args = dict(partials_ptr=partials, grad_output_ptr=grad_output if grad_output is not None else fallback,
                loss_ptr=loss_out if loss_out is not None else fallback, scale=float(scale),
                loss_scale=float(loss_scale), n_partials=partials.shape[0], stride_partials=partials.stride(0),
                loss_column=loss_column, **a, **b)
    # BLOCK_P is the summation's lane count (summation_lanes), not the config's: it fixes the order of the sums.
    constexprs = dict(HAS_GRAD_OUTPUT=grad_output is not None, **a_constants, **b_constants,
                      WRITE_LOSS=loss_out is not None, ACC_DTYPE=_TL_ACC[acc], NUM_STAGES=cfg.num_stages,
                      BLOCK_P=summation_lanes(partials.shape[0]), BLOCK_COLS=cfg.block_cols)
    return LaunchPlan(_reduce_update_kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages)


def reduce_update_(
    partials: torch.Tensor,
    targets: list[ColumnTarget],
    *,
    scale: float,
    grad_output: torch.Tensor | None = None,
    loss_out: torch.Tensor | None = None,
    loss_column: int = 0,
    loss_scale: float = 1.0,
    config: ReduceConfig | None = None,
) -> None:
    """Finish up to two column runs of ``partials`` (P, K) in one launch.

    For each target: g = scale · grad_output · Σ_p partials[p, cols]; then
    write g to target.out, or apply SGD to the parameter target.out in place.
    loss_out (0-d), if given, receives loss_scale · Σ_p partials[p, loss_column].
    Arithmetic in fp32 (fp64 if partials or a target is fp64); partials of
    any float dtype (a bf16 ``.grad`` too).
    """
    plan_reduce_update(partials, targets, scale=scale, grad_output=grad_output, loss_out=loss_out,
                       loss_column=loss_column, loss_scale=loss_scale, config=config).launch()
