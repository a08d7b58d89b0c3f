"""FusedSGD: torch.optim.SGD with its update done by one kernel, and able to
run inside the fused loss's backward (optimizer-in-backward)."""

from __future__ import annotations

from typing import Iterable

import torch

from .backend import BACKENDS
from .kernels.specs import ColumnTarget, GradPartials, SGDHyper
from .ops import RegisteredOps


def group_hyper(group: dict) -> SGDHyper:
    """A param group's hyper-parameters as plain floats (read at every step,
    so a scheduler's changes take effect without recompiling)."""
    return SGDHyper(lr=float(group["lr"]), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                    maximize=bool(group.get("maximize", False)))


class FusedSGD(torch.optim.SGD):
    """Drop-in for ``torch.optim.SGD``: same constructor, checks, param groups
    and state_dict (``momentum_buffer`` entries load into and out of
    torch.optim.SGD), and the same update:

        g = −g if maximize;  g += weight_decay·p;
        buf = g on the first step, else momentum·buf + (1 − dampening)·g;
        g = g + momentum·buf if nesterov else buf;  p −= lr·g

    ``step()`` applies it to ``.grad`` like SGD does. Passed to
    ``FusedLinearRegressor.loss(x, y, optimizer=opt)`` (or ``train_step`` /
    ``fit``), the step runs inside the fused backward and no ``.grad`` is
    materialised. backend: "auto" | "triton" | "torch" (see linreg_fused.backend).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize)
        self.backend = backend

    def momentum_buffer(self, param: torch.Tensor, hyper: SGDHyper) -> tuple[torch.Tensor | None, bool]:
        """(buffer, is_new) for ``param``; a new buffer is zero-filled and the
        kernel sets it to the gradient, as SGD's first step does."""
        if hyper.momentum == 0:
            return None, False
        state = self.state[param]
        buf = state.get("momentum_buffer")
        if buf is None:
            state["momentum_buffer"] = buf = torch.zeros_like(param, memory_format=torch.contiguous_format)
            return buf, True
        if not buf.is_contiguous() or buf.dtype != param.dtype or buf.device != param.device:
            state["momentum_buffer"] = buf = buf.to(device=param.device, dtype=param.dtype).contiguous()
        return buf, False

    def group_of(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("this parameter is not in the optimizer; build FusedSGD from the model's parameters")

    @torch.no_grad()
    def step(self, closure=None):
        """Apply the update to every parameter that has a ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = group_hyper(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedSGD does not support sparse gradients")
                buf, is_new = self.momentum_buffer(p, hyper)
                grad = p.grad.reshape(1, -1)  # a gradient is a partial buffer with one row
                RegisteredOps(self.backend, p.device).reduce_update_(
                    grad, [ColumnTarget(0, p, hyper, buf, is_new)], scale=1.0, grad_output=None)
        return loss

    def fused_update(self, weight: torch.Tensor, bias: torch.Tensor | None) -> "FusedUpdate":
        """The step for ``weight`` and ``bias`` to run inside the fused backward."""
        for p in (weight, bias):
            if p is not None and p.requires_grad:
                self.group_of(p)  # fail now, not inside backward
        return FusedUpdate(self, weight, bias)


class FusedUpdate:
    """Applies a FusedSGD step to weight and bias from a batch's partial sums."""

    def __init__(self, optimizer: FusedSGD, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.optimizer, self.weight, self.bias = optimizer, weight, bias

    def apply_(
        self,
        ops,
        partials: GradPartials,
        grad_output: torch.Tensor | None,
        scale: float,
        *,
        loss_scale: float | None = None,
        loss_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """grad = scale · grad_output · Σ partials; then the SGD update of weight
        and bias in place, in one launch. With loss_scale, the same launch also
        returns the loss (loss_scale · Σ R², a 0-d tensor of loss_dtype)."""
        targets = []
        for param, (col_start, _) in ((self.weight, partials.weight_columns), (self.bias, partials.bias_columns)):
            if param is None or not param.requires_grad:
                continue
            hyper = group_hyper(self.optimizer.group_of(param))
            buf, is_new = self.optimizer.momentum_buffer(param, hyper)
            targets.append(ColumnTarget(col_start, param, hyper, buf, is_new))
        want_loss = loss_scale is not None
        if not targets:  # everything frozen: nothing to update
            return ops.sum_loss(partials, loss_scale, loss_dtype) if want_loss else None
        loss = ops.reduce_update_(partials.buffer, targets, scale=scale, grad_output=grad_output,
                                  loss_column=partials.loss_column if want_loss else None,
                                  loss_scale=loss_scale if want_loss else 1.0, loss_dtype=loss_dtype)
        # LR schedulers look for this flag (set by their wrapper of step()) to know a step happened.
        self.optimizer._opt_called = True
        return loss
