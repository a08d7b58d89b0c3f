"""Reduce-and-update kernels: finish the partial sums, then write a gradient
or apply the SGD update in place.

The partial buffer from linear_mse_grad.py holds one row per program. A
program here owns a block of columns and sums them over all rows in a fixed
order (deterministic), scales the sum by the loss factor times grad_output
(read from device memory: no host sync), and then either stores the
gradient or applies torch.optim.SGD's update to the parameter and its
momentum buffer:

    g = −g if maximize;  g += weight_decay·p;
    buf = g (first step) or momentum·buf + (1 − dampening)·g
    g = g + momentum·buf if nesterov else buf;  p −= lr·g

The same kernel serves FusedSGD.step() on ordinary ``.grad`` tensors: a
gradient is a partial buffer with one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import ReduceConfig, reduce_config

from . import specs
from .specs import SGDHyper

# The bits of SGDHyper.flags, as compile-time constants of the kernels.
MAXIMIZE = tl.constexpr(specs.MAXIMIZE)
WEIGHT_DECAY = tl.constexpr(specs.WEIGHT_DECAY)
MOMENTUM = tl.constexpr(specs.MOMENTUM)
NESTEROV = tl.constexpr(specs.NESTEROV)


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
def _sum_column_kernel(partials_ptr, n_partials, stride_partials, column, scale, out_ptr, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=partials_ptr.dtype.element_ty)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + offs
        acc += tl.load(partials_ptr + p.to(tl.int64) * stride_partials + column, mask=p < n_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _reduce_update_kernel(
    partials_ptr, n_partials, stride_partials, col_start, n_cols,
    scale, grad_output_ptr, out_ptr, buf_ptr,
    lr, momentum, weight_decay, buf_decay, grad_weight,
    HAS_GRAD_OUTPUT: tl.constexpr, UPDATE: tl.constexpr, FLAGS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    acc_dtype: tl.constexpr = partials_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask_c = cols < n_cols
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_COLS], dtype=acc_dtype)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + offs_p
        ptrs = partials_ptr + p[:, None].to(tl.int64) * stride_partials + col_start + cols[None, :]
        acc += tl.load(ptrs, mask=(p[:, None] < n_partials) & mask_c[None, :], other=0.0)
    grad = tl.sum(acc, axis=0) * scale
    if HAS_GRAD_OUTPUT:
        grad = grad * tl.load(grad_output_ptr).to(acc_dtype)
    if UPDATE:  # out_ptr is the parameter, updated in place
        param = tl.load(out_ptr + cols, mask=mask_c).to(acc_dtype)
        buf = grad
        if MOMENTUM & FLAGS:
            buf = tl.load(buf_ptr + cols, mask=mask_c).to(acc_dtype)
        param, buf = sgd_update(param, grad, buf, buf_decay, grad_weight, lr, momentum, weight_decay, FLAGS)
        tl.store(out_ptr + cols, param, mask=mask_c)
        if MOMENTUM & FLAGS:
            tl.store(buf_ptr + cols, buf, mask=mask_c)
    else:
        tl.store(out_ptr + cols, grad, mask=mask_c)


def sum_column(partials: torch.Tensor, column: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """out (0-d) = scale · Σ_p partials[p, column]."""
    cfg = reduce_config(partials.shape[0], partials.device)
    _sum_column_kernel[(1,)](partials, partials.shape[0], partials.stride(0), column, scale, out, BLOCK_P=cfg.block_p)
    return out


def _launch(partials, col_start, n_cols, scale, grad_output, out, buf, init_buffer, hyper, update, config):
    cfg = config or reduce_config(partials.shape[0], partials.device)
    h = hyper or SGDHyper(lr=0.0)
    buf_decay, grad_weight = (0.0, 1.0) if init_buffer else (h.momentum, 1.0 - h.dampening)
    grid = (triton.cdiv(n_cols, cfg.block_cols),)
    _reduce_update_kernel[grid](
        partials, partials.shape[0], partials.stride(0), col_start, n_cols,
        scale, grad_output if grad_output is not None else partials, out,
        buf if buf is not None else out,
        h.lr, h.momentum, h.weight_decay, buf_decay, grad_weight,
        HAS_GRAD_OUTPUT=grad_output is not None, UPDATE=update, FLAGS=h.flags,
        BLOCK_P=cfg.block_p, BLOCK_COLS=cfg.block_cols, num_warps=cfg.num_warps,
    )


def reduce_columns(
    partials: torch.Tensor,
    col_start: int,
    out: torch.Tensor,
    *,
    scale: float,
    grad_output: torch.Tensor | None = None,
    config: ReduceConfig | None = None,
) -> torch.Tensor:
    """out (contiguous, n_cols elements) = scale · grad_output · Σ_p partials[p, col_start : col_start + n_cols]."""
    _launch(partials, col_start, out.numel(), scale, grad_output, out, None, False, None, False, config)
    return out


def reduce_and_sgd_update_(
    partials: torch.Tensor,
    col_start: int,
    param: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    hyper: SGDHyper,
    *,
    init_buffer: bool,
    scale: float,
    grad_output: torch.Tensor | None = None,
    config: ReduceConfig | None = None,
) -> None:
    """Apply SGD in place to ``param`` (contiguous) with gradient
    scale · grad_output · Σ_p partials[p, col_start : col_start + param.numel()].

    momentum_buffer: same shape as param; required when hyper.momentum != 0.
    init_buffer: the buffer is new (zero-filled) and is set to the gradient (SGD's first step).
    """
    if hyper.momentum != 0 and momentum_buffer is None:
        raise ValueError("momentum != 0 needs a momentum buffer")
    _launch(partials, col_start, param.numel(), scale, grad_output, param, momentum_buffer, init_buffer, hyper,
            True, config)
