"""The launches of one fused step, planned once and relaunched: the repeat-call path.

``StepLaunches`` plans a step (the partial sums of a batch, the SGD update
of weight and bias from them, and the loss) for fixed shapes, strides,
dtypes, devices and update flags, keeps its partial buffer (and ticket
counter), and relaunches it with each call's tensors and hyper-parameters
through kernels/launch.py's FastLaunch: one launch (kernels/sgd_step.py)
where ``sgd_step.one_launch`` allows it, else the gradient pass and
reduce_update_, the same kernels as the ops' path. Nothing is re-planned
per call (``plans_made`` counts the plans, for the tests).

A reused partial buffer is safe on one stream: each launch is ordered after
the last. Callers key the cache by stream where several are in use, and do
not use it while a CUDA graph is being captured.
"""

from __future__ import annotations

import torch

from . import sgd_step
from .config import device_profile
from .launch import FastLaunch
from .linear_mse_grad import plan_linear_mse_partials
from .reduce_update import plan_reduce_update
from .specs import ColumnTarget

plans_made = 0  # StepLaunches built in this process


class StepLaunches:
    """One planned step. Per call (``__call__``): the batch (x, target, row_index or None), the
    current weight and bias, and per target slot (weight's, then bias's, as given to the
    constructor) its parameter, momentum buffer (or None), learning-rate tensor (or None) and
    the floats (lr, momentum, weight_decay, buf_decay, grad_weight) of reduce_update's update."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                 targets: list[ColumnTarget], *, row_index: torch.Tensor | None, scale: float, loss_scale: float,
                 loss_dtype: torch.dtype, input_precision: str, launches: str | int = "auto") -> None:
        if not 1 <= len(targets) <= 2:
            raise ValueError(f"a step updates one or two parameters, got {len(targets)} targets")
        global plans_made
        plans_made += 1
        self.device, self.loss_dtype = x.device, loss_dtype
        self.has_bias, self.has_index, self.n_targets = bias is not None, row_index is not None, len(targets)
        loss = torch.empty((), device=x.device, dtype=loss_dtype)
        plan, sums, self.ticket = sgd_step.plan_linear_mse_step(
            x, weight, bias, target, targets, scale=scale, loss_out=loss, loss_scale=loss_scale, row_index=row_index,
            input_precision=input_precision)
        self.partials = sums.buffer
        self.scale, self.loss_scale = float(scale), float(loss_scale)
        n_programs, n_columns = self.partials.shape
        self.one_launch = (sgd_step.one_launch(n_programs, n_columns, device_profile(x.device))
                           if launches == "auto" else int(launches) == 1)
        if self.one_launch:
            self.step = FastLaunch(plan, varying=24)
            return
        grad, _ = plan_linear_mse_partials(x, weight, bias, target, row_index=row_index,
                                           input_precision=input_precision)
        grad.args.update(partials_ptr=self.partials, row_index_ptr=row_index if row_index is not None else self.partials,
                         residual_ptr=self.partials)
        self.grad = FastLaunch(grad, varying=5)
        reduce = plan_reduce_update(self.partials, targets, scale=scale, loss_out=loss, loss_column=sums.loss_column,
                                    loss_scale=loss_scale)
        self.reduce = FastLaunch(reduce, varying=21)

    def __call__(self, x, weight, bias, target, row_index, a: tuple | None, b: tuple | None) -> torch.Tensor:
        """a, b: (param, buffer, lr_tensor, lr, momentum, weight_decay, buf_decay, grad_weight) or None
        (a slot the constructor was given no target for)."""
        buffer = self.partials
        loss = torch.empty((), device=self.device, dtype=self.loss_dtype)
        a_out, a_buf, a_lr_ptr, *a_values = a if a is not None else _EMPTY_SLOT
        b_out, b_buf, b_lr_ptr, *b_values = b if b is not None else _EMPTY_SLOT
        a_out = buffer if a_out is None else a_out
        b_out = buffer if b_out is None else b_out
        pointers = (a_out, a_out if a_buf is None else a_buf, buffer if a_lr_ptr is None else a_lr_ptr,
                    b_out, b_out if b_buf is None else b_buf, buffer if b_lr_ptr is None else b_lr_ptr)
        if self.one_launch:
            self.step(x, weight, bias if bias is not None else weight, target,
                      row_index if row_index is not None else buffer, *pointers, loss, self.scale, self.loss_scale,
                      *a_values, *b_values)
        else:
            self.grad(x, weight, bias if bias is not None else weight, target,
                      row_index if row_index is not None else buffer)
            self.reduce(buffer, buffer, loss, *pointers, self.scale, self.loss_scale, *a_values, *b_values)
        return loss


_EMPTY_SLOT = (None, None, None, 0.0, 0.0, 0.0, 0.0, 0.0)
