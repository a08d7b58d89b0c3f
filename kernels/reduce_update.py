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
def _sum_column(partials_ptr, n_partials, stride_partials, column, ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr):
    """Σ_p partials[p, column], in a fixed order."""
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + offs
        acc += tl.load(partials_ptr + p.to(tl.int64) * stride_partials + column, mask=p < n_partials,
                       other=0.0).to(ACC_DTYPE)
    return tl.sum(acc, axis=0)


@triton.jit
def _sum_column_kernel(partials_ptr, n_partials, stride_partials, column, scale: tl.float64, out_ptr,
                       ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr):
    total = _sum_column(partials_ptr, n_partials, stride_partials, column, ACC_DTYPE, BLOCK_P)
    tl.store(out_ptr, total * f64_scalar(scale, ACC_DTYPE))


@triton.jit
def _finish_columns(
    partials_ptr, n_partials, stride_partials, block, col_start, n_cols,
    scale, grad_output_ptr, out_ptr, buf_ptr,
    lr, momentum, weight_decay, buf_decay, grad_weight,
    HAS_GRAD_OUTPUT: tl.constexpr, UPDATE: tl.constexpr, FLAGS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    NUM_STAGES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Block ``block`` of one target's columns: sum over the partial rows in a
    fixed order, scale, then store the gradient or apply the SGD update."""
    cols = block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask_c = cols < n_cols
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_COLS], dtype=ACC_DTYPE)
    for p0 in tl.range(0, n_partials, BLOCK_P, num_stages=NUM_STAGES):
        p = p0 + offs_p
        ptrs = partials_ptr + p[:, None].to(tl.int64) * stride_partials + col_start + cols[None, :]
        acc += tl.load(ptrs, mask=(p[:, None] < n_partials) & mask_c[None, :], other=0.0).to(ACC_DTYPE)
    grad = tl.sum(acc, axis=0) * f64_scalar(scale, ACC_DTYPE)
    if HAS_GRAD_OUTPUT:
        grad = grad * tl.load(grad_output_ptr).to(ACC_DTYPE)
    if UPDATE:  # out_ptr is the parameter, updated in place
        param = tl.load(out_ptr + cols, mask=mask_c).to(ACC_DTYPE)
        buf = grad
        if MOMENTUM & FLAGS:
            buf = tl.load(buf_ptr + cols, mask=mask_c).to(ACC_DTYPE)
        param, buf = sgd_update(param, grad, buf, f64_scalar(buf_decay, ACC_DTYPE), f64_scalar(grad_weight, ACC_DTYPE),
                                f64_scalar(lr, ACC_DTYPE), f64_scalar(momentum, ACC_DTYPE),
                                f64_scalar(weight_decay, ACC_DTYPE), FLAGS)
        tl.store(out_ptr + cols, param, mask=mask_c)  # the one rounding to the parameter's dtype
        if MOMENTUM & FLAGS:
            tl.store(buf_ptr + cols, buf, mask=mask_c)
    else:
        tl.store(out_ptr + cols, grad, mask=mask_c)


@triton.jit
def _reduce_update_kernel(
    partials_ptr, n_partials, stride_partials, scale: tl.float64, grad_output_ptr,
    a_col_start, a_n_cols, a_out_ptr, a_buf_ptr, a_lr: tl.float64, a_momentum: tl.float64,
    a_weight_decay: tl.float64, a_buf_decay: tl.float64, a_grad_weight: tl.float64,
    b_col_start, b_n_cols, b_out_ptr, b_buf_ptr, b_lr: tl.float64, b_momentum: tl.float64,
    b_weight_decay: tl.float64, b_buf_decay: tl.float64, b_grad_weight: tl.float64,
    loss_column, loss_scale: tl.float64, loss_ptr,
    HAS_GRAD_OUTPUT: tl.constexpr, A_UPDATE: tl.constexpr, A_FLAGS: tl.constexpr,
    B_UPDATE: tl.constexpr, B_FLAGS: tl.constexpr, WRITE_LOSS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    NUM_STAGES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    # Two targets (weight and bias) in one launch: the first programs take A's
    # columns, the rest B's; program 0 also sums the loss column if asked.
    pid = tl.program_id(0)
    a_blocks = tl.cdiv(a_n_cols, BLOCK_COLS)
    if pid < a_blocks:
        _finish_columns(partials_ptr, n_partials, stride_partials, pid, a_col_start, a_n_cols,
                        scale, grad_output_ptr, a_out_ptr, a_buf_ptr,
                        a_lr, a_momentum, a_weight_decay, a_buf_decay, a_grad_weight,
                        HAS_GRAD_OUTPUT, A_UPDATE, A_FLAGS, ACC_DTYPE, NUM_STAGES, BLOCK_P, BLOCK_COLS)
    else:
        _finish_columns(partials_ptr, n_partials, stride_partials, pid - a_blocks, b_col_start, b_n_cols,
                        scale, grad_output_ptr, b_out_ptr, b_buf_ptr,
                        b_lr, b_momentum, b_weight_decay, b_buf_decay, b_grad_weight,
                        HAS_GRAD_OUTPUT, B_UPDATE, B_FLAGS, ACC_DTYPE, NUM_STAGES, BLOCK_P, BLOCK_COLS)
    if WRITE_LOSS:
        if pid == 0:
            total = _sum_column(partials_ptr, n_partials, stride_partials, loss_column, ACC_DTYPE, BLOCK_P)
            tl.store(loss_ptr, total * f64_scalar(loss_scale, ACC_DTYPE))


def _acc_of(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any operand is fp64, else fp32 (half-precision values are upcast)."""
    return torch.float64 if any(accumulator_dtype(t.dtype) == torch.float64 for t in tensors) else torch.float32


def plan_sum_column(partials: torch.Tensor, column: int, scale: float, out: torch.Tensor, *,
                    config: ReduceConfig | None = None, profile: DeviceProfile | None = None) -> LaunchPlan:
    """The launch of sum_column; profile: the device to plan for (default: partials' device)."""
    cfg = config or reduce_config(partials.shape[0], 1, profile or device_profile(partials.device))
    args = dict(partials_ptr=partials, n_partials=partials.shape[0], stride_partials=partials.stride(0),
                column=column, scale=float(scale), out_ptr=out)
    constexprs = dict(ACC_DTYPE=_TL_ACC[_acc_of(partials, out)], BLOCK_P=cfg.block_p)
    return LaunchPlan(_sum_column_kernel, (1,), args, constexprs, num_warps=1 if cfg.block_p <= 32 else 4,
                      num_stages=1)


def sum_column(partials: torch.Tensor, column: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out (0-d) = scale · Σ_p partials[p, column], summed in fp32 (fp64 for fp64)."""
    plan_sum_column(partials, column, scale, out).launch()
    return out


def _target_args(prefix: str, target: ColumnTarget | None, fallback: torch.Tensor) -> tuple[dict, bool, int]:
    """(runtime args, UPDATE, FLAGS) of one target slot; an absent target has no columns."""
    names = [f"{prefix}_{n}" for n in ("col_start", "n_cols", "out_ptr", "buf_ptr", "lr", "momentum",
                                       "weight_decay", "buf_decay", "grad_weight")]
    if target is None:
        return dict(zip(names, [0, 0, fallback, fallback, 0.0, 0.0, 0.0, 0.0, 0.0])), False, 0
    h = target.hyper or SGDHyper(lr=0.0)
    buf_decay, grad_weight = (0.0, 1.0) if target.init_buffer else (h.momentum, 1.0 - h.dampening)
    buf = target.momentum_buffer if target.momentum_buffer is not None else target.out
    values = [target.col_start, target.out.numel(), target.out, buf, h.lr, h.momentum, h.weight_decay, buf_decay,
              grad_weight]
    return dict(zip(names, values)), target.hyper is not None, h.flags


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
) -> LaunchPlan:
    """The launch of reduce_update_ (see there); profile: the device to plan for (default: partials' device)."""
    if not 1 <= len(targets) <= 2:
        raise ValueError(f"one launch takes one or two targets, got {len(targets)}")
    n_columns = sum(t.out.numel() for t in targets)
    cfg = config or reduce_config(partials.shape[0], n_columns, profile or device_profile(partials.device))
    a, a_update, a_flags = _target_args("a", targets[0], partials)
    b, b_update, b_flags = _target_args("b", targets[1] if len(targets) == 2 else None, partials)
    grid = (triton.cdiv(a["a_n_cols"], cfg.block_cols) + triton.cdiv(b["b_n_cols"], cfg.block_cols),)
    acc = _acc_of(partials, *(t.out for t in targets))
    args = dict(partials_ptr=partials, n_partials=partials.shape[0], stride_partials=partials.stride(0),
                scale=float(scale), grad_output_ptr=grad_output if grad_output is not None else partials,
                **a, **b, loss_column=loss_column, loss_scale=float(loss_scale),
                loss_ptr=loss_out if loss_out is not None else partials)
    constexprs = dict(HAS_GRAD_OUTPUT=grad_output is not None, A_UPDATE=a_update, A_FLAGS=a_flags,
                      B_UPDATE=b_update, B_FLAGS=b_flags, WRITE_LOSS=loss_out is not None, ACC_DTYPE=_TL_ACC[acc],
                      NUM_STAGES=cfg.num_stages, BLOCK_P=cfg.block_p, BLOCK_COLS=cfg.block_cols)
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
