"""FusedSGD: torch.optim.SGD with its update done by one kernel, and able to
run inside the fused loss's backward (optimizer-in-backward)."""

from __future__ import annotations

from itertools import chain
from typing import Any, Iterable

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torch.optim.sgd import sgd as sgd_functional

from .backend import BACKENDS, triton_unavailable_reason
from .kernels.specs import ColumnTarget, GradPartials, SGDHyper
from . import update_cache
from .ops import RegisteredOps


def group_hyper(group: dict | None, *, lr_on: torch.device | None = None) -> SGDHyper:
    """A param group's hyper-parameters as plain floats (read at every step,
    so a scheduler's changes take effect without recompiling).

    A tensor lr (or weight_decay) is read with float(): on a CUDA tensor that
    is one host sync per group and step, as torch.optim.SGD's own for-loop
    and foreach updates do. lr_on: the parameters' device; a one-element
    tensor lr on it is then passed on as ``lr_tensor`` instead, which the
    kernels (and the reference) read on the device: no host sync, and
    torch.compile follows a schedule that changes it in place without
    recompiling.
    """
    if group is None:
        raise ValueError("this parameter is not in the optimizer (FusedSGD.group_of returned None)")
    lr, lr_tensor = group["lr"], None
    if lr_on is not None and isinstance(lr, torch.Tensor) and lr.device == lr_on and lr.numel() == 1:
        lr, lr_tensor = 0.0, lr
    return SGDHyper(lr=float(lr), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
                    weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                    maximize=bool(group.get("maximize", False)), lr_tensor=lr_tensor)


def _check_flags(options: dict, where: str) -> None:
    """torch.optim.SGD's implementation flags: refuse the values FusedSGD cannot honour."""
    if options.get("differentiable"):
        raise ValueError(f"{where}: differentiable=True is not supported: FusedSGD updates the parameters in place "
                         f"in a kernel that autograd cannot differentiate through; use torch.optim.SGD(..., "
                         f"differentiable=True) to differentiate through optimizer steps")
    if options.get("fused") and options.get("foreach"):
        raise RuntimeError(f"{where}: `fused` and `foreach` cannot be `True` together.")


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
    materialised for the parameters it updates.

    backend: "auto" | "triton" | "torch" (see linreg_fused.backend), kept in
    ``defaults`` so that copies and pickles keep it. torch.optim.SGD's
    implementation flags, in the constructor or in a param group: ``foreach``
    (any value) changes nothing, the update is one kernel per parameter either
    way; ``fused=True`` requires the Triton kernels to run (an error on the
    reference backend); ``differentiable=True`` is refused. Complex parameters
    are updated as their real view (torch.view_as_real), as SGD does. A sparse
    gradient is an index-add into the touched rows for plain SGD (torch.optim.SGD's
    own for-loop update); with momentum or weight decay, which move every
    element, it is made dense and goes through the kernel.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _check_flags(dict(foreach=foreach, fused=fused, differentiable=differentiable), "FusedSGD")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        # In defaults, which Optimizer.__getstate__ keeps (deepcopy, pickle, torch.save), but not in the
        # param groups: the backend belongs to the optimizer, not to a group, and a state_dict does not carry it.
        self.defaults["backend"] = backend
        # SGD(fused=True) tells GradScaler that its step unscales the gradients and skips on inf itself;
        # FusedSGD's step does not, so GradScaler must do both, as for any other optimizer.
        self._step_supports_amp_scaling = False
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {i}")

    @property
    def backend(self) -> str:
        return self.defaults["backend"]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.defaults.setdefault("backend", "auto")

    def __repr__(self) -> str:
        head, _, groups = super().__repr__().partition(" (")
        return f"{head} (backend: {self.backend!r}{groups}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim.Optimizer.add_param_group, refusing the flag values FusedSGD cannot honour."""
        if isinstance(param_group, dict) and "backend" in param_group:
            raise ValueError("backend applies to the whole optimizer: pass it as FusedSGD(..., backend=...), "
                             "not in a param group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.pop("backend", None)  # set from defaults; it stays out of the groups
        if "backend" in self.defaults:  # during __init__ it is not yet; __init__ checks every group itself
            try:
                self._check_group(group, f"param group {len(self.param_groups) - 1}")
            except Exception:
                self.param_groups.pop()
                raise

    def _check_group(self, group: dict, where: str) -> None:
        _check_flags(group, where)
        if group.get("fused"):
            for p in group["params"]:
                reason = self._fused_unavailable_reason(p.device)
                if reason is not None:
                    raise RuntimeError(f"{where}: fused=True asks for the fused Triton kernels, which cannot run "
                                       f"here: {reason}")

    def _fused_unavailable_reason(self, device: torch.device) -> str | None:
        if self.backend == "torch":
            return "backend='torch' runs the pure-PyTorch reference (use backend='auto' or 'triton', or fused=None)"
        return triton_unavailable_reason(device)

    def _ops(self, group: dict, device: torch.device):
        """The backend ops (through the registered linreg_fused ops) for a parameter of ``group``, refusing
        flags that loading a state_dict may have set."""
        _check_flags(group, "FusedSGD")
        ops = RegisteredOps(self.backend, device)
        if group.get("fused") and ops.name != "triton":
            raise RuntimeError("FusedSGD: fused=True asks for the fused Triton kernels, which cannot run here: "
                               f"{self._fused_unavailable_reason(device)}")
        return ops

    # ------------------------------------------------------------ parameters and state
    def group_of(self, param: torch.Tensor | None) -> dict | None:
        """The param group holding ``param``; None when the optimizer does not hold it."""
        if param is None:
            return None
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        return None

    def trains(self, param: torch.Tensor | None) -> bool:
        """Whether a step from a gradient updates ``param``: it requires grad
        and is in the optimizer. A frozen parameter (requires_grad=False) gets
        no gradient and stays as it is; one outside the optimizer keeps its
        value too, as with torch.optim.SGD."""
        return param is not None and param.requires_grad and self.group_of(param) is not None

    def momentum_buffer(self, param: torch.Tensor, hyper: SGDHyper) -> tuple[torch.Tensor | None, bool]:
        """(buffer, is_new) for ``param`` (in its dtype, contiguous, stored in
        ``state``); a new buffer is zero-filled and the kernel sets it to the
        gradient, as SGD's first step does. If the step that was to fill a new
        buffer fails, drop it from ``state`` (``forget_new_buffer``)."""
        if hyper.momentum == 0:
            return None, False
        state = self.state[param]
        buf = state.get("momentum_buffer")
        if buf is None:
            state["momentum_buffer"] = buf = torch.zeros_like(param, memory_format=torch.contiguous_format)
            return buf, True
        if buf.shape != param.shape:  # (a kernel would read and write it as the parameter's elements)
            raise RuntimeError(f"FusedSGD: the momentum_buffer in the state of a parameter of shape "
                               f"{tuple(param.shape)} has shape {tuple(buf.shape)}; torch.optim.SGD cannot use it "
                               f"either (load a state_dict of this model, or delete the buffer to restart momentum)")
        if buf.is_sparse:  # left by a sparse-gradient step
            buf = buf.to_dense()
        if not buf.is_contiguous() or buf.dtype != param.dtype or buf.device != param.device:
            buf = buf.to(device=param.device, dtype=param.dtype).contiguous()
        state["momentum_buffer"] = buf
        return buf, False

    def forget_new_buffer(self, param: torch.Tensor, is_new: bool) -> None:
        """Undo ``momentum_buffer`` after a failed step: a zero buffer left in
        state would make the next step treat it as a real one."""
        if is_new:
            self.state[param].pop("momentum_buffer", None)

    # ------------------------------------------------------------ steps
    def step(self, closure=None):
        """Apply the update to every parameter that has a ``.grad``."""
        # A step like the last one: its planned launches (update_cache.py; no autograd op runs there).
        if closure is None and update_cache.try_updates(self):
            return None
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if update_cache.try_updates(self):
                return loss
        updated = []
        for group in self.param_groups:
            hyper = None
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                ops = self._ops(group, p.device)
                if grad.layout != torch.strided:  # a sparse gradient
                    if group.get("fused"):
                        raise RuntimeError("FusedSGD: fused=True does not support sparse gradients (torch.optim.SGD"
                                           "(fused=True) refuses them too); use fused=None")
                    if grad.is_sparse and group["momentum"] == 0 and group["weight_decay"] == 0:
                        self._sparse_step(group, p)
                        continue
                    grad = grad.to_dense()  # momentum and weight decay move every element anyway
                if hyper is None:
                    hyper = group_hyper(group, lr_on=p.device)
                buf, is_new = self.momentum_buffer(p, hyper)
                param = p
                if p.is_complex():  # SGD on a complex tensor is SGD on its real view
                    param, grad = torch.view_as_real(p), torch.view_as_real(grad)
                    buf = None if buf is None else torch.view_as_real(buf)
                if param.numel() == 0:
                    continue
                try:
                    # A gradient is a partial buffer with one row, whose columns the kernel reads as adjacent
                    # elements: a 1-D slice or expanded .grad flattens to a view with stride 2 or 0.
                    row = grad.reshape(1, -1).contiguous()
                    ops.reduce_update_(row, [ColumnTarget(0, param, hyper, buf, is_new)],
                                       scale=1.0, grad_output=None)
                except BaseException:
                    self.forget_new_buffer(p, is_new)
                    raise
                if param is p and grad is p.grad:  # not a complex one's real view, not a sparse gradient made dense
                    updated.append((group, p, grad))
        update_cache.remember_updates(self, updated)
        return loss

    def _sparse_step(self, group: dict, param: torch.Tensor) -> None:
        """Plain SGD (no momentum, no weight decay) on a sparse gradient, e.g.
        from nn.Embedding(sparse=True): torch.optim.SGD's own for-loop update,
        an index-add into the rows the gradient touches."""
        sgd_functional([param], [param.grad], [], has_sparse_grad=True, foreach=False, fused=False,
                       weight_decay=0.0, momentum=0.0, lr=group["lr"], dampening=group["dampening"],
                       nesterov=group["nesterov"], maximize=group.get("maximize", False))

    def has_step_hooks(self) -> bool:
        """Whether step pre/post hooks are registered (on this optimizer or
        globally). They fire around every step, including those inside the
        fused backward; a loop that runs many steps in one launch cannot fire
        them per step and should not be used while this is True."""
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _global_optimizer_pre_hooks or _global_optimizer_post_hooks)

    def _mark_stepped(self) -> None:
        """Record that the parameters were stepped outside ``step()``, as
        ``step()`` would: LR schedulers then see the step (no "lr_scheduler.step()
        before optimizer.step()" warning)."""
        # torch.optim.lr_scheduler wraps optimizer.step to set this flag and reads it in its first step().
        # Not while torch.compile traces (torch 2.11 cannot trace a setattr on an optimizer): a compiled
        # step leaves the flag to the eager steps, so at worst a scheduler warns about the order.
        if not torch.compiler.is_compiling():
            self._opt_called = True

    def _pre_step_hooks(self) -> None:
        """The step pre-hooks, for a step taken outside ``step()`` (it has no arguments to change)."""
        args, kwargs = (self,), {}
        for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            if hook(self, args, kwargs) is not None:
                raise RuntimeError("a step pre-hook returned new arguments, but the step inside the fused backward "
                                   "takes none; return None from the hook")

    def _post_step_hooks(self) -> None:
        """After a step taken outside ``step()``: mark it, then the step post-hooks."""
        self._mark_stepped()
        self._optimizer_step_code()  # the profiler's entry point after a step
        args, kwargs = (self,), {}
        for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)

    def fused_update(self, weight: torch.Tensor, bias: torch.Tensor | None) -> "FusedUpdate":
        """The step for ``weight`` and ``bias`` to run inside the fused backward."""
        return FusedUpdate(self, weight, bias)


class FusedUpdate:
    """Applies a FusedSGD step to weight and bias from a batch's partial sums.

    Like ``loss.backward(); optimizer.step()``: a parameter that the optimizer
    holds and that requires grad is updated; a frozen one is left alone; one
    that requires grad but is outside the optimizer keeps its value, and
    ``left_out`` says so, so that an autograd backward can give it its .grad.
    """

    def __init__(self, optimizer: FusedSGD, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.optimizer, self.weight, self.bias = optimizer, weight, bias
        params = (weight, bias)
        # The group of each parameter the step updates (None: frozen, absent, or outside the optimizer).
        self.groups = tuple(optimizer.group_of(p) if p is not None and p.requires_grad else None for p in params)
        self.left_out = tuple(p is not None and p.requires_grad and g is None for p, g in zip(params, self.groups))
        if any(self.left_out) and not any(self.groups):  # fail now, not inside backward
            raise ValueError("the weight and bias that require grad are not in the optimizer, so its step would "
                             "update nothing; build FusedSGD from the model's parameters (model.parameters())")
        for param, group in zip(params, self.groups):
            if group is not None:
                _check_flags(group, "FusedSGD")
                if group["momentum"] != 0:
                    # The parameter's state entry exists before the backward (an empty dict until the step
                    # puts its buffer there, as SGD's step makes it): a compiled region that runs the fused
                    # backward has Dynamo compile the backward as a frame of its own, and a key added to
                    # optimizer.state there was written back keyed by ctx.saved_tensors' parameter, read after
                    # the step changed it ("modified by an inplace operation").
                    optimizer.state[param]  # noqa: B018 (defaultdict: the lookup makes the entry)

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
        returns the loss (loss_scale · Σ R², a 0-d tensor of loss_dtype).

        This is a step of the optimizer: its step hooks fire around it and LR
        schedulers see it."""
        optimizer = self.optimizer
        optimizer._pre_step_hooks()
        # The groups of now (as optimizer.step() reads them): a state_dict loaded since the loss was
        # made brings new group dicts. Which parameters are trained was decided with the loss.
        params = (self.weight, self.bias)
        groups = tuple(None if g is None else optimizer.group_of(p) for p, g in zip(params, self.groups))
        targets, new_buffers = [], []
        last_group, hyper = None, None
        want_loss = loss_scale is not None
        try:  # a failure after a new buffer was made (the next parameter's checks, the launch) drops it
            for param, group, (col_start, _) in zip(params, groups,
                                                    (partials.weight_columns, partials.bias_columns)):
                if group is None:
                    continue
                if group.get("fused") and ops.name != "triton":
                    raise RuntimeError("FusedSGD: fused=True asks for the fused Triton kernels, but the model's "
                                       "backend runs the PyTorch reference")
                # Read once per group (a CUDA tensor lr costs a sync to read); compared with `is`,
                # not id(): torch.compile (2.11) cannot trace id() of a dict.
                if group is not last_group:
                    last_group, hyper = group, group_hyper(group, lr_on=param.device)
                buf, is_new = optimizer.momentum_buffer(param, hyper)
                new_buffers.append((param, is_new))
                targets.append(ColumnTarget(col_start, param, hyper, buf, is_new))
            if not targets:  # everything frozen: nothing to update
                loss = ops.sum_loss(partials, loss_scale, loss_dtype) if want_loss else None
            else:
                loss = ops.reduce_update_(partials.buffer, targets, scale=scale, grad_output=grad_output,
                                          loss_column=partials.loss_column if want_loss else None,
                                          loss_scale=loss_scale if want_loss else 1.0, loss_dtype=loss_dtype)
        except BaseException:
            for param, is_new in new_buffers:
                optimizer.forget_new_buffer(param, is_new)
            raise
        optimizer._post_step_hooks()
        return loss
