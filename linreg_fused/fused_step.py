"""fused_sgd_step: one training step without an autograd graph (the functional form of
FusedLinearRegressor.train_step), through the registered ops; a call like an earlier one goes
straight to that call's planned launches (linreg_fused/step_cache.py)."""

from __future__ import annotations

from typing import Any

import torch

from . import distributed, step_cache
from .checks import _check_options, check_inputs
from .kernels.specs import GradPartials, accumulator_dtype
from .ops import RegisteredOps, loss_scale

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


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
    if not torch.compiler.is_compiling() and any(t is not None and _is_wrapped(t)  # (Dynamo cannot trace it)
                                                 for t in (x, weight, bias, target, row_index)):
        raise ValueError("fused_sgd_step (train_step with FusedSGD) applies an SGD step in place: it cannot run "
                         "under a torch.func transform (grad, vmap, jvp, ...); differentiate the loss instead")
    group = distributed.resolve_group(process_group)
    if validate:
        _check_options(reduction, input_precision, backend)
        check_inputs(x, weight, bias, target)
        if x.dim() != 2:
            raise ValueError(f"fused_sgd_step takes 2-D x (N, D) and target (N, O), got x of shape {tuple(x.shape)}")
        if row_index is not None:
            row_index = _checked_row_index(row_index, x, allow_empty=group is not None)
    # No features: nothing for a kernel to do; the reference ops compute the bias's step.
    ops = RegisteredOps(backend if weight.shape[1] else "torch", x.device)
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
