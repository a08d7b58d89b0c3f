"""The autograd Functions and the functional API.

``linear_mse`` is one fused op: its forward makes a single pass over X and
T (kernels/linear_mse_grad.py) and leaves per-program partial sums of
Σ R², Σ R and Rᵀ·X behind; its backward only finishes that reduction and
scales it by grad_output, read on the device (no host sync). Given an
optimizer (FusedSGD), the backward applies the SGD update in place instead
of producing .grad: the backward + SGD-update op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .backend import select_ops
from .reference import TORCH_OPS
from .kernels.specs import ColumnTarget, GradPartials

REDUCTIONS = ("mean", "sum")
PRECISIONS = ("ieee", "tf32", "tf32x3")
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


def _check_options(reduction: str, input_precision: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming the problem; runs no kernel and syncs nothing."""
    _check_parameters(x, weight, bias)
    _check_target(x, weight, target)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (N, F); a view whenever the strides allow it (kernels take any 2-D strides)."""
    return t.reshape(-1, t.shape[-1])


def loss_scale(reduction: str, n_rows: int, out_features: int) -> float:
    """The factor from Σ R² to the loss: 1/(N·O) for "mean", 1 for "sum"."""
    return 1.0 / (n_rows * out_features) if reduction == "mean" else 1.0


# ---------------------------------------------------------------- linear + MSE
@dataclass(frozen=True)
class _LossPlan:
    """What the Function needs besides tensors (keeps apply() to five arguments)."""

    ops: Any
    reduction: str
    input_precision: str
    update: Any = None  # from FusedSGD.fused_update(): applied in backward instead of returning grads


class LinearMSEFunction(torch.autograd.Function):
    """loss = mse(x·Wᵀ + b, target) for 2-D x (N, D), target (N, O)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, plan: _LossPlan):
        keep_residual = ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
        partials = plan.ops.grad_partials(x, weight, bias, target, row_index=None, store_residual=keep_residual,
                                          input_precision=plan.input_precision)
        scale = loss_scale(plan.reduction, partials.n_rows, partials.out_features)
        loss = plan.ops.sum_loss(partials, scale, torch.promote_types(x.dtype, weight.dtype))
        # x and target are saved only for a double backward (create_graph=True); saving costs no memory.
        ctx.save_for_backward(x, weight, bias, target)
        ctx.plan, ctx.partials, ctx.grad_scale = plan, partials, 2.0 * scale
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, bias, target = ctx.saved_tensors
        plan, partials, grad_scale = ctx.plan, ctx.partials, ctx.grad_scale
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            if plan.update is not None:
                raise RuntimeError("a loss built with optimizer= applies the SGD step in its backward; it has no "
                                   "second derivative (call backward() without create_graph=True)")
            return (*_differentiable_grads(ctx, x, weight, bias, target, grad_loss), None)
        need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_t = None
        if need_x or need_t:  # dL/dpred = scale·R; computed before any in-place update of W
            d_pred = partials.residual * (grad_loss.to(partials.residual.dtype) * grad_scale)
            if need_x:
                grad_x = (d_pred @ weight.to(d_pred.dtype)).to(ctx.x_dtype)
            if need_t:
                grad_t = (-d_pred).to(ctx.x_dtype)
        if plan.update is not None:
            plan.update.apply_(plan.ops, partials, grad_loss, grad_scale)
            # A parameter outside the optimizer gets its .grad, as loss.backward() would give it.
            need_w, need_b = need_w and plan.update.left_out[0], need_b and plan.update.left_out[1]
        if need_w or need_b:
            grad_w, grad_b = _reduce_grads(plan.ops, partials, grad_loss, grad_scale, need_w, need_b)
            grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
            grad_b = grad_b.to(weight.dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_b, grad_t, None


def _differentiable_grads(ctx, x, weight, bias, target, grad_loss):
    """The four gradients as plain torch ops, recorded by autograd (second order)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
    d_pred = (F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc)) - target.to(acc)) * (
        grad_loss.to(acc) * ctx.grad_scale)
    grad_x = (d_pred @ weight.to(acc)).to(ctx.x_dtype) if need_x else None
    grad_w = (d_pred.t() @ x.to(acc)).to(weight.dtype) if need_w else None
    grad_b = d_pred.sum(0).to(weight.dtype) if need_b and bias is not None else None
    grad_t = (-d_pred).to(ctx.x_dtype) if need_t else None
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
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Fused ``F.mse_loss(F.linear(x, weight, bias), target, reduction=reduction)``.

    x: (..., D); weight: (O, D); bias: (O,) or None; target: (..., O).
    Returns a 0-d loss (dtype: x's, promoted with the weight's). Its backward
    fills weight.grad / bias.grad (and x.grad, target.grad if they require
    grad). With ``optimizer=`` a FusedSGD holding weight and bias, the
    backward instead applies the SGD step to them in place and leaves .grad
    untouched. input_precision: "ieee" (default, matches PyTorch fp32),
    "tf32" (faster on GPUs, ~1e-3 relative error) or "tf32x3" (three TF32
    products, about fp32's accuracy on tensor cores) for float32 inputs.
    """
    _check_options(reduction, input_precision)
    check_inputs(x, weight, bias, target)
    ops = select_ops(backend, x.device)
    update = optimizer.fused_update(weight, bias) if optimizer is not None else None
    plan = _LossPlan(ops, reduction, input_precision, update)
    return LinearMSEFunction.apply(_rows(x), weight, bias, _rows(target), plan)


@torch.no_grad()
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
    input_precision: str = "ieee",
    validate: bool = True,
) -> torch.Tensor:
    """One training step without building an autograd graph: the same kernels
    as ``linear_mse(..., optimizer=optimizer).backward()`` and the same result.

    x: (N, D), weight: (O, D), bias: (O,) or None, target: (N, O).
    row_index: optional (n,) integer tensor; the step then uses rows
    x[row_index], target[row_index] (gathered inside the kernel, no copy).
    Returns the detached loss (0-d, on device). validate=False skips the
    input checks, including the range check of row_index (which reads it
    back: one sync); fit passes it for the row orders it drew itself.
    """
    if validate:
        _check_options(reduction, input_precision)
        check_inputs(x, weight, bias, target)
        if x.dim() != 2:
            raise ValueError(f"fused_sgd_step takes 2-D x (N, D) and target (N, O), got x of shape {tuple(x.shape)}")
        if row_index is not None:
            row_index = _checked_row_index(row_index, x)
    ops = select_ops(backend, x.device)
    partials = ops.grad_partials(x, weight, bias, target, row_index=row_index, store_residual=False,
                                 input_precision=input_precision)
    scale = loss_scale(reduction, partials.n_rows, partials.out_features)
    # One launch finishes the loss and updates weight and bias: two launches per step in all.
    return optimizer.fused_update(weight, bias).apply_(ops, partials, None, 2.0 * scale, loss_scale=scale,
                                                        loss_dtype=torch.promote_types(x.dtype, weight.dtype))


def _checked_row_index(row_index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D integer index of rows of x, every entry in range (read back once to check)."""
    if not isinstance(row_index, torch.Tensor):
        raise TypeError(f"row_index must be a torch.Tensor, got {type(row_index).__name__}")
    if row_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"row_index must be int64 or int32, got {row_index.dtype}")
    if row_index.dim() != 1 or row_index.numel() == 0:
        raise ValueError(f"row_index must be a non-empty 1-D tensor, got shape {tuple(row_index.shape)}")
    if row_index.device != x.device:
        raise ValueError(f"x is on {x.device} but row_index is on {row_index.device}; move them to one device")
    low, high = (int(v) for v in torch.aminmax(row_index))
    if low < 0 or high >= x.shape[0]:
        raise IndexError(f"row_index holds {low if low < 0 else high}, outside the {x.shape[0]} rows of x")
    return row_index.contiguous()


# ---------------------------------------------------------------- linear
class LinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b through the inference kernel; the backward is three plain
    GEMM-shaped torch ops (cuBLAS is the right tool for them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: _LossPlan):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return plan.ops.linear(x, weight, bias, input_precision=plan.input_precision)

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
    input_precision: str = "ieee",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., D) -> (..., O).

    Half-precision x with float32 weights is computed in float32 and returns
    float32 (nn.Linear would raise on that mix).
    """
    _check_options("mean", input_precision)
    _check_parameters(x, weight, bias)
    ops = select_ops(backend, x.device)
    lead = x.shape[:-1]
    if ops.name == "torch" or x.numel() == 0:
        # No rows or no features: F.linear's answer (the bias, or an empty output) with its gradients.
        return TORCH_OPS.linear(x, weight, bias, input_precision=input_precision)
    y = LinearFunction.apply(_rows(x), weight, bias, _LossPlan(ops, "mean", input_precision))
    return y.view(*lead, weight.shape[0])


__all__ = ["linear", "linear_mse", "fused_sgd_step", "check_inputs", "LinearMSEFunction", "LinearFunction"]
