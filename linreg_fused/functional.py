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
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed, loss_cache, ops
from .checks import PRECISIONS, REDUCTIONS, _check_options, _check_parameters, check_inputs  # noqa: F401
from .fused_step import fused_sgd_step  # noqa: F401 (part of this API)
from .kernels.specs import ColumnTarget, GradPartials
from .ops import RegisteredOps, loss_scale
from . import reference
from .reference import TORCH_OPS

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor



def rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (N, F); a view whenever the strides allow it (kernels take any 2-D strides)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # (not -1: ambiguous when F = 0)


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
    if optimizer is not None:  # a call like an earlier one: its planned launches (loss_cache.py)
        loss = loss_cache.try_loss(x, weight, bias, target, optimizer, reduction, backend, input_precision,
                                   process_group)
        if loss is not None:
            return loss
    _check_options(reduction, input_precision, backend)
    check_inputs(x, weight, bias, target)
    if _under_transform(x, weight, bias, target):
        if optimizer is not None:
            raise ValueError("linear_mse(optimizer=) applies an SGD step in place: it cannot run under a "
                             "torch.func transform (grad, vmap, jvp, ...); differentiate the loss without it")
        return reference.linear_mse(x, weight, bias, target, reduction)
    if optimizer is None and torch.jit.is_tracing():  # as linear's: one graph in any grad mode, saveable
        return reference.linear_mse(x, weight, bias, target, reduction)
    if weight.shape[1] == 0:  # no features: the loss of the bias alone, computed by the reference ops
        backend = "torch"
    group = None
    if optimizer is None:
        if process_group is not None and process_group is not False:
            raise ValueError("process_group= applies to the fused step (optimizer=); without it, use "
                             "DistributedDataParallel for the gradients")
        update = None
    else:
        update, group = optimizer.fused_update(weight, bias), distributed.resolve_group(process_group)
    plan = _LossPlan(RegisteredOps(backend, x.device), reduction, input_precision, update, group)
    loss, _, _ = LinearMSEFunction.apply(rows(x), weight, bias, rows(target), plan)
    if update is not None and group is None:
        loss_cache.remember_loss(x, weight, bias, target, optimizer, reduction, backend, input_precision,
                                 process_group)
    return loss


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
    if x.numel() == 0 or weight.shape[0] == 0 or _under_transform(x, weight, bias) or torch.jit.is_tracing():
        # No rows, features or outputs: F.linear's answer (the bias, or an empty output) with its gradients.
        # Under torch.func transforms too: they batch and differentiate F.linear natively. Under
        # torch.jit.trace too: one graph in any grad mode (its check retraces under no_grad), aten::linear,
        # which TorchScript saves and differentiates (a Function cannot be saved; the op has no backward).
        return TORCH_OPS.linear(x, weight, bias, input_precision=input_precision)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = LinearFunction.apply(rows(x), weight, bias, _LossPlan(RegisteredOps(backend, x.device), "mean",
                                                                   input_precision))
    else:  # inference: the op alone
        y = ops.linear(rows(x), weight, bias, input_precision=input_precision, backend=backend)
    return y.view(*x.shape[:-1], weight.shape[0])


def _under_transform(*tensors: torch.Tensor | None) -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, hessian, ...) wraps an input. The
    functions then compute with PyTorch's own ops (the reference definitions: F.linear, F.mse_loss),
    which every transform batches and differentiates, to any order, as it does nn.Linear's."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the check (and handles torch.func itself)
        return False
    return any(t is not None and _is_wrapped(t) for t in tensors)


__all__ = ["linear", "linear_mse", "fused_sgd_step", "check_inputs", "LinearMSEFunction", "LinearFunction"]
