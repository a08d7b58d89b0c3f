"""The functional API, on top of the registered ops (linreg_fused.ops).

``linear_mse`` is one fused op: its forward makes a single pass over X and
T (kernels/linear_mse_grad.py) and leaves per-program partial sums of
Σ R², Σ R and Rᵀ·X behind; its backward only finishes that reduction and
scales it by grad_output, read on the device (no host sync). Given an
optimizer (FusedSGD), the backward applies the SGD update in place instead
of producing .grad: the backward + SGD-update step. With a process group
(linreg_fused.distributed), the fused steps all-reduce the finished sums
once, between the gradient kernel and the update kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed, ops, step_cache
from .backend import BACKENDS
from .kernels.specs import ColumnTarget, GradPartials, accumulator_dtype
from .ops import RegisteredOps, loss_scale
from .reference import TORCH_OPS

REDUCTIONS = ("mean", "sum")
PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- input checks
def _check_parameters(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) "
                         f"but the weight expects in_features={in_features}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}; they must match")
    if x.dtype != weight.dtype and not (x.dtype in _HALF and weight.dtype == torch.float32):
        raise TypeError(f"x is {x.dtype} but the weight is {weight.dtype}: use the same dtype, or half-precision x "
                        f"(float16/bfloat16) with float32 weights (mixed precision)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}; move them to one device")


def _check_target(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(target.shape) != expected:
        raise ValueError(f"target has shape {tuple(target.shape)} but the predictions have shape {expected}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    if target.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but target is {target.dtype}; they must match")
    if target.device != x.device:
        raise ValueError(f"x is on {x.device} but target is on {target.device}; move them to one device")
    if x.numel() == 0 or target.numel() == 0:
        raise ValueError(f"empty batch: x has shape {tuple(x.shape)}")


def _check_options(reduction: str, input_precision: str, backend: str = "auto") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming the problem; runs no kernel and syncs nothing."""
    _check_parameters(x, weight, bias)
    _check_target(x, weight, target)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (N, F); a view whenever the strides allow it (kernels take any 2-D strides)."""
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------- linear + MSE
@dataclass(frozen=True)
class _LossPlan:
    """What the Function needs besides tensors (keeps apply() to five arguments)."""

    ops: RegisteredOps
    reduction: str
    input_precision: str
    update: Any = None  # from FusedSGD.fused_update(): applied in backward instead of returning grads
    group: Any = None  # with update: the process group to all-reduce over, or None


class LinearMSEFunction(torch.autograd.Function):
    """loss = mse(x·Wᵀ + b, target) for 2-D x (N, D), target (N, O): the op
    linreg_fused::linear_mse forward; its partial sums finished backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, plan: _LossPlan):
        keep_residual = ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
        loss, partials, residual = ops.linear_mse(x, weight, bias, target, reduction=plan.reduction,
                                                  keep_residual=keep_residual,
                                                  input_precision=plan.input_precision, backend=plan.ops.backend)
        # x and target are saved only for a double backward (create_graph=True); saving costs no memory.
        ctx.save_for_backward(x, weight, bias, target, partials, residual)
        ctx.plan, ctx.grad_scale = plan, 2.0 * loss_scale(plan.reduction, x.shape[0], weight.shape[0])
        # The partial sums are returned too (not differentiable; callers drop them): a tracer wants the
        # buffer whose row count the kernel's launch helper picks among a traced function's outputs.
        ctx.mark_non_differentiable(partials, residual)
        return loss, partials, residual

    @staticmethod
    def backward(ctx, grad_loss, _grad_partials, _grad_residual):
        x, weight, bias, target, buffer, residual = ctx.saved_tensors
        plan, grad_scale = ctx.plan, ctx.grad_scale
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            if plan.update is not None:
                raise RuntimeError("a loss built with optimizer= applies the SGD step in its backward; it has no "
                                   "second derivative (call backward() without create_graph=True)")
            return (*_differentiable_grads(ctx, x, weight, bias, target, grad_loss), None)
        need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_t = None
        if need_x or need_t:  # dL/dpred = scale·R; computed before any in-place update of W
            d_pred = residual * (grad_loss.to(residual.dtype) * grad_scale)
            if need_x:
                grad_x = (d_pred @ weight.to(d_pred.dtype)).to(x.dtype)
            if need_t:
                grad_t = (-d_pred).to(x.dtype)
        partials = GradPartials(buffer, None, x.shape[0], weight.shape[0], weight.shape[1])
        if plan.update is not None:
            _step_in_backward(plan, partials, grad_loss, grad_scale)
            # A parameter outside the optimizer gets its .grad, as loss.backward() would give it.
            need_w, need_b = need_w and plan.update.left_out[0], need_b and plan.update.left_out[1]
        if need_w or need_b:
            grad_w, grad_b = _reduce_grads(plan.ops, partials, grad_loss, grad_scale, need_w, need_b)
            grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
            grad_b = grad_b.to(weight.dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_b, grad_t, None


def _step_in_backward(plan: _LossPlan, partials: GradPartials, grad_loss: torch.Tensor, grad_scale: float) -> None:
    """The optimizer's step from this batch's sums; under a process group, from all ranks' sums."""
    if plan.group is None:
        plan.update.apply_(plan.ops, partials, grad_loss, grad_scale)
        return
    batch = distributed.all_reduce_partials(partials, plan.group)
    scale, factor = batch.grad_scales(plan.reduction)
    plan.update.apply_(plan.ops, batch.partials, grad_loss if factor is None else grad_loss * factor, scale)


def _differentiable_grads(ctx, x, weight, bias, target, grad_loss):
    """The four gradients as plain torch ops, recorded by autograd (second order)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
    d_pred = (F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc)) - target.to(acc)) * (
        grad_loss.to(acc) * ctx.grad_scale)
    grad_x = (d_pred @ weight.to(acc)).to(x.dtype) if need_x else None
    grad_w = (d_pred.t() @ x.to(acc)).to(weight.dtype) if need_w else None
    grad_b = d_pred.sum(0).to(weight.dtype) if need_b and bias is not None else None
    grad_t = (-d_pred).to(x.dtype) if need_t else None
    return grad_x, grad_w, grad_b, grad_t


def _reduce_grads(ops, partials: GradPartials, grad_output: torch.Tensor, scale: float, need_w: bool,
                  need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dW (O, D) and db (O,) in the accumulator dtype, in one launch: scale · grad_output · Σ partials."""
    buffer = partials.buffer
    new = functools.partial(torch.empty, device=buffer.device, dtype=buffer.dtype)
    grad_w = new((partials.out_features, partials.in_features)) if need_w else None
    grad_b = new(partials.out_features) if need_b else None
    targets = [ColumnTarget(col, out) for (col, _), out in ((partials.weight_columns, grad_w),
                                                            (partials.bias_columns, grad_b)) if out is not None]
    ops.reduce_update_(buffer, targets, scale=scale, grad_output=grad_output)
    return grad_w, grad_b


def linear_mse(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    reduction: str = "mean",
    *,
    optimizer: Any = None,
    backend: str = "auto",
    input_precision: str = "auto",
    process_group: Any = None,
) -> torch.Tensor:
    """Fused ``F.mse_loss(F.linear(x, weight, bias), target, reduction=reduction)``.

    x: (..., D); weight: (O, D); bias: (O,) or None; target: (..., O).
    Returns a 0-d loss (dtype: x's, promoted with the weight's). Its backward
    fills weight.grad / bias.grad (and x.grad, target.grad if they require
    grad). With ``optimizer=`` a FusedSGD holding weight and bias, the
    backward instead applies the SGD step to them in place and leaves .grad
    untouched; with a process group (see linreg_fused.distributed: by
    default the world group once torch.distributed is initialised) that
    step is the step on all ranks' rows (the returned loss is this rank's).
    input_precision: how the Triton kernels form products: "ieee" (FMAs,
    as PyTorch's fp32 matmul), "tf32" (tensor cores, ~1e-3 relative error),
    "tf32x3" (three TF32 products: fp32's accuracy on tensor cores), or
    "auto" (default; linreg_fused.backend.resolve_precision: what
    torch.get_float32_matmul_precision() asks for float32 inputs, "tf32x3"
    for bfloat16/float16 inputs).
    """
    _check_options(reduction, input_precision, backend)
    check_inputs(x, weight, bias, target)
    group = None
    if optimizer is None:
        if process_group is not None and process_group is not False:
            raise ValueError("process_group= applies to the fused step (optimizer=); without it, use "
                             "DistributedDataParallel for the gradients")
        update = None
    else:
        update, group = optimizer.fused_update(weight, bias), distributed.resolve_group(process_group)
    plan = _LossPlan(RegisteredOps(backend, x.device), reduction, input_precision, update, group)
    loss, _, _ = LinearMSEFunction.apply(_rows(x), weight, bias, _rows(target), plan)
    return loss


def fused_sgd_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    optimizer: Any,
    *,
    reduction: str = "mean",
    row_index: torch.Tensor | None = None,
    backend: str = "auto",
    input_precision: str = "auto",
    validate: bool = True,
    process_group: Any = None,
) -> torch.Tensor:
    """One training step without building an autograd graph: the same kernels
    as ``linear_mse(..., optimizer=optimizer).backward()`` and the same result.

    x: (N, D), weight: (O, D), bias: (O,) or None, target: (N, O).
    row_index: optional (n,) integer tensor; the step then uses rows
    x[row_index], target[row_index] (gathered inside the kernel, no copy).
    Returns the detached loss (0-d, on device). validate=False skips the
    input checks, including the range check of row_index (which reads it
    back: one sync); fit passes it for the row orders it drew itself.
    process_group: see linreg_fused.distributed (by default the world group
    once torch.distributed is initialised): the step is then the step on
    every rank's rows, and the loss theirs (an empty row_index is allowed:
    this rank contributes no rows).

    A call like an earlier one (same shapes, strides, dtypes, devices, options
    and optimizer settings) skips straight to that call's planned launches:
    see linreg_fused/step_cache.py.
    """
    if row_index is None or not validate:  # a row_index to validate is read back every call: the full path
        loss = step_cache.try_step(x, weight, bias, target, optimizer, reduction, row_index, backend,
                                   input_precision, process_group)
        if loss is not None:
            return loss
    return _full_sgd_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
                          validate, process_group)


@torch.no_grad()
def _full_sgd_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision, validate,
                   process_group) -> torch.Tensor:
    """fused_sgd_step through the registered ops; plans the repeat-call path for the next call."""
    group = distributed.resolve_group(process_group)
    if validate:
        _check_options(reduction, input_precision, backend)
        check_inputs(x, weight, bias, target)
        if x.dim() != 2:
            raise ValueError(f"fused_sgd_step takes 2-D x (N, D) and target (N, O), got x of shape {tuple(x.shape)}")
        if row_index is not None:
            row_index = _checked_row_index(row_index, x, allow_empty=group is not None)
    ops = RegisteredOps(backend, x.device)
    update = optimizer.fused_update(weight, bias)
    loss_dtype = torch.promote_types(x.dtype, weight.dtype)
    if group is None:
        partials = ops.grad_partials(x, weight, bias, target, row_index=row_index, store_residual=False,
                                     input_precision=input_precision)
        scale = loss_scale(reduction, partials.n_rows, partials.out_features)
        # One launch finishes the loss and updates weight and bias: two launches per step in all.
        loss = update.apply_(ops, partials, None, 2.0 * scale, loss_scale=scale, loss_dtype=loss_dtype)
        step_cache.remember_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
                                 process_group, 2.0 * scale, scale, loss_dtype)
        return loss
    if (row_index.shape[0] if row_index is not None else x.shape[0]) == 0:  # no rows here; other ranks have some
        out_features, in_features = weight.shape
        partials = GradPartials(x.new_empty((0, out_features * in_features + out_features + 1),
                                            dtype=accumulator_dtype(weight.dtype)), None, 0, out_features, in_features)
    else:
        partials = ops.grad_partials(x, weight, bias, target, row_index=row_index, store_residual=False,
                                     input_precision=input_precision)
    batch = distributed.all_reduce_partials(partials, group)
    scale, factor = batch.grad_scales(reduction)
    update.apply_(ops, batch.partials, factor, scale)
    return batch.loss(reduction, loss_dtype)


def _checked_row_index(row_index: torch.Tensor, x: torch.Tensor, allow_empty: bool = False) -> torch.Tensor:
    """A contiguous 1-D integer index of rows of x, every entry in range (read back once to check)."""
    if not isinstance(row_index, torch.Tensor):
        raise TypeError(f"row_index must be a torch.Tensor, got {type(row_index).__name__}")
    if row_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"row_index must be int64 or int32, got {row_index.dtype}")
    if row_index.dim() != 1 or (row_index.numel() == 0 and not allow_empty):
        raise ValueError(f"row_index must be a non-empty 1-D tensor, got shape {tuple(row_index.shape)}")
    if row_index.device != x.device:
        raise ValueError(f"x is on {x.device} but row_index is on {row_index.device}; move them to one device")
    if row_index.numel() == 0:
        return row_index.contiguous()
    low, high = (int(v) for v in torch.aminmax(row_index))
    if low < 0 or high >= x.shape[0]:
        raise IndexError(f"row_index holds {low if low < 0 else high}, outside the {x.shape[0]} rows of x")
    return row_index.contiguous()


# ---------------------------------------------------------------- linear
class LinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b through the op linreg_fused::linear; the backward is three
    plain GEMM-shaped torch ops (cuBLAS is the right tool for them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: _LossPlan):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return ops.linear(x, weight, bias, input_precision=plan.input_precision, backend=plan.ops.backend)

    @staticmethod
    def backward(ctx, grad_y):
        # Plain torch ops: under create_graph=True autograd records them, so second order is right.
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_y.to(weight.dtype)
        grad_x = (g @ weight).to(x.dtype) if need_x else None
        grad_w = g.t() @ x.to(weight.dtype) if need_w else None
        grad_b = g.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    input_precision: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., D) -> (..., O), through the op
    linreg_fused::linear (its backward is three GEMM-shaped torch ops).

    Half-precision x with float32 weights is computed in float32 and returns
    float32 (nn.Linear would raise on that mix).
    """
    _check_options("mean", input_precision, backend)
    _check_parameters(x, weight, bias)
    if x.numel() == 0:
        # No rows or no features: F.linear's answer (the bias, or an empty output) with its gradients.
        return TORCH_OPS.linear(x, weight, bias, input_precision=input_precision)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = LinearFunction.apply(_rows(x), weight, bias, _LossPlan(RegisteredOps(backend, x.device), "mean",
                                                                   input_precision))
    else:  # inference: the op alone
        y = ops.linear(_rows(x), weight, bias, input_precision=input_precision, backend=backend)
    return y.view(*x.shape[:-1], weight.shape[0])


__all__ = ["linear", "linear_mse", "fused_sgd_step", "check_inputs", "LinearMSEFunction", "LinearFunction"]
