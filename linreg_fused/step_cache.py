"""The repeat-call path of the fused SGD step (functional.fused_sgd_step, FusedLinearRegressor.train_step).

A training loop calls the step again and again with batches of the same
shapes, on the same model and optimizer. The first call takes the full path
(checks, the registered ops); where the step runs the Triton kernels in
eager mode, it also leaves a ``RepeatStep`` on the optimizer: the step's
planned launches (kernels/step.py: one launch where the grid allows, else
two, relaunched without Triton's per-call specialisation) and everything
the checks depended on. A later call whose tensors, options and optimizer
settings still match goes straight to those launches; only what can change
between calls is looked at again:

- x, target, weight, bias (and row_index): shape, strides, dtype and device
  (the checks of the first call depend on nothing else; data pointers are
  the launcher's business: kernels/launch.py);
- the options (reduction, backend, input_precision and, for "auto",
  torch's float32 matmul precision) and the process group (none);
- per updated parameter: that it still requires grad and sits in the same
  param group, the group's flags (momentum, dampening, weight decay,
  nesterov, maximize, fused, differentiable) and the kind of its learning
  rate, and its momentum buffer (the same tensor as last time, else checked
  again); the learning rate and the other floats are read at every call;
- nothing that needs the ops is active: torch.compile or export tracing, a
  dispatch mode, functorch transforms, CUDA graph capture (under a
  profiler the launches run inside a record_function named for the step).

Anything else, and any mismatch, takes the full path, which may leave a new
RepeatStep (a few per optimizer, keyed by parameters and batch rows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import backend as _backend
from . import optim
from .kernels.specs import ColumnTarget, SGDHyper

MAX_ENTRIES = 8  # RepeatSteps kept per optimizer (e.g. full batches and a shorter last batch, per model)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_dispatch_modes = torch._C._len_torch_dispatch_stack
_DISTRIBUTED = dist.is_available()
_pre_hooks, _post_hooks = optim._global_optimizer_pre_hooks, optim._global_optimizer_post_hooks


def _signature(x, target, weight, bias, row_index) -> tuple:
    """What the full path's checks and the plan depend on, besides the parameters' identity."""
    return (x.shape, x.stride(), x.dtype, x.device, target.shape, target.stride(), target.dtype, target.get_device(),
            weight.shape, weight.stride(), weight.dtype, weight.get_device(),
            None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.get_device()),
            None if row_index is None else (row_index.shape, row_index.stride(), row_index.dtype,
                                            row_index.get_device()))


def _plain(t: torch.Tensor | None) -> bool:
    """A real tensor that no subclass, fake mode or functorch transform stands behind."""
    return t is None or ((type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not _is_wrapped(t))


class _Slot:
    """One updated parameter: its param group and momentum buffer as the plan saw them."""

    def __init__(self, optimizer, param: torch.Tensor, group: dict) -> None:
        self.param, self.group, self.params = param, group, group["params"]
        self.group_index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
        self.index = next(i for i, p in enumerate(self.params) if p is param)
        self.momentum = float(group["momentum"]) != 0
        self.decay = float(group["weight_decay"]) != 0
        self.nesterov, self.maximize = bool(group["nesterov"]), bool(group.get("maximize", False))
        self.lr_tensor = isinstance(group["lr"], torch.Tensor)
        self.buffer = optimizer.state[param].get("momentum_buffer") if self.momentum else None

    def read(self, optimizer, groups: list) -> tuple | None:
        """(param, buffer, lr tensor, lr, momentum, weight_decay, buf_decay, grad_weight) for this call,
        or None: the parameter, its group, the group's flags or the buffer are not those of the plan."""
        group, param = self.group, self.param
        if groups[self.group_index] is not group or group["params"] is not self.params \
                or self.params[self.index] is not param or not param.requires_grad:
            return None
        lr, momentum, weight_decay = group["lr"], float(group["momentum"]), float(group["weight_decay"])
        if (momentum != 0) is not self.momentum or (weight_decay != 0) is not self.decay \
                or bool(group["nesterov"]) is not self.nesterov or bool(group.get("maximize", False)) is not \
                self.maximize or group.get("differentiable") or isinstance(lr, torch.Tensor) is not self.lr_tensor:
            return None
        lr_ptr = None
        if self.lr_tensor:
            if lr.device != param.device or lr.numel() != 1:
                return None
            lr_ptr, lr = lr, 0.0
        if not self.momentum:
            return (param, None, lr_ptr, float(lr), momentum, weight_decay, 0.0, 1.0)
        buf = optimizer.state[param].get("momentum_buffer")
        if buf is None or buf is not self.buffer:
            return None  # a new or loaded buffer: the full path checks it, and plans again
        return (param, buf, lr_ptr, float(lr), momentum, weight_decay, momentum, 1.0 - float(group["dampening"]))


class RepeatStep:
    """A planned step and the conditions under which it is still the step the full path would take."""

    def __init__(self, launches, x, weight, bias, target, row_index, options: tuple, slots: tuple) -> None:
        self.launches, self.options, self.slots = launches, options, slots
        self.weight, self.bias = weight, bias
        self.signature = _signature(x, target, weight, bias, row_index)
        self.params = [slot.param for slot in slots]


def _options(reduction: str, backend: str, input_precision: str, x: torch.Tensor) -> tuple:
    auto = input_precision == "auto" and x.dtype == torch.float32
    return (reduction, backend, input_precision, torch.get_float32_matmul_precision() if auto else None,
            _backend.STEP_LAUNCHES)


def _eligible(x, target, row_index, process_group) -> bool:
    """Nothing about this call needs the ops' path (tracing, transforms, a process group, capture)."""
    if torch.compiler.is_compiling() or _dispatch_modes():
        return False
    if process_group is not False and (process_group is not None or (_DISTRIBUTED and dist.is_initialized())):
        return False
    if not (_plain(x) and _plain(target) and _plain(row_index)):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _key(weight, bias, x, row_index) -> tuple:
    return id(weight), id(bias), x.shape[0], None if row_index is None else row_index.shape[0]


def try_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
             process_group) -> torch.Tensor | None:
    """The step through a RepeatStep of ``optimizer``, or None (the caller takes the full path)."""
    cache = getattr(optimizer, "_linreg_repeat_steps", None)
    if not cache:
        return None
    try:
        if not _eligible(x, target, row_index, process_group):
            return None
        entry = cache.get(_key(weight, bias, x, row_index))
        if entry is None or weight is not entry.weight or bias is not entry.bias \
                or entry.options != _options(reduction, backend, input_precision, x) \
                or entry.signature != _signature(x, target, weight, bias, row_index):
            return None
        groups = optimizer.param_groups
        slots = entry.slots
        a = slots[0].read(optimizer, groups)
        b = slots[1].read(optimizer, groups) if len(slots) > 1 else None
        if a is None or (b is None and len(slots) > 1):
            return None
    except Exception:  # anything odd: the full path checks it and says what is wrong
        return None
    if optimizer._optimizer_step_pre_hooks or _pre_hooks:
        optimizer._pre_step_hooks()
    if torch.autograd.profiler._is_profiler_enabled:  # a profile shows the step, as it shows the ops
        with torch.profiler.record_function("linreg_fused::fused_sgd_step (repeat call)"):
            loss = entry.launches(x, weight, bias, target, row_index, a, b)
    else:
        loss = entry.launches(x, weight, bias, target, row_index, a, b)
    # The kernel wrote through pointers: a graph that saved the old values must raise, not reuse them.
    torch._C._increment_version(entry.params)
    optimizer._opt_called = True  # what FusedSGD._mark_stepped records (LR schedulers read it)
    if optimizer._optimizer_step_post_hooks or _post_hooks:
        optimizer._post_step_hooks()
    return loss


def remember_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
                  process_group, scale: float, loss_scale: float, loss_dtype: torch.dtype) -> None:
    """After a full-path step: plan a RepeatStep for the next call, where the repeat path applies."""
    FusedSGD = optim.FusedSGD
    if not isinstance(optimizer, FusedSGD) or type(optimizer).fused_update is not FusedSGD.fused_update or \
            not _eligible(x, target, row_index, process_group) or not (_plain(weight) and _plain(bias)):
        return
    ops = _backend.select_ops(backend, x.device)
    if ops.name != "triton" or x.dim() != 2 or not weight.is_contiguous() or \
            (bias is not None and not bias.is_contiguous()):
        return
    slots, targets = [], []
    out_features, in_features = weight.shape
    for param, col_start in ((weight, 0), (bias, out_features * in_features)):
        group = optimizer.group_of(param) if param is not None and param.requires_grad else None
        if group is None:
            continue
        slot = _Slot(optimizer, param, group)
        if slot.momentum and (slot.buffer is None or not slot.buffer.is_contiguous()
                              or slot.buffer.dtype != param.dtype or slot.buffer.device != param.device):
            return
        if param.is_complex() or param.numel() == 0:
            return
        lr = group["lr"]
        hyper = SGDHyper(lr=0.0 if slot.lr_tensor else float(lr), momentum=float(group["momentum"]),
                         dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                         nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)),
                         lr_tensor=lr if slot.lr_tensor else None)
        slots.append(slot)
        targets.append(ColumnTarget(col_start, param.detach(), hyper, slot.buffer))
    if not slots:
        return
    from .kernels.step import StepLaunches

    launches = StepLaunches(x, weight.detach(), None if bias is None else bias.detach(), target, targets,
                            row_index=row_index, scale=scale, loss_scale=loss_scale, loss_dtype=loss_dtype,
                            input_precision=_backend.resolve_precision(input_precision, x.dtype),
                            launches=_backend.STEP_LAUNCHES)
    cache = optimizer.__dict__.setdefault("_linreg_repeat_steps", {})
    if len(cache) >= MAX_ENTRIES:
        cache.pop(next(iter(cache)))
    cache[_key(weight, bias, x, row_index)] = RepeatStep(launches, x, weight, bias, target, row_index,
                            _options(reduction, backend, input_precision, x), tuple(slots))
