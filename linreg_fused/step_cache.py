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
  param group at the same place, the group's flags (momentum ≠ 0, weight
  decay ≠ 0, nesterov, maximize, differentiable, a tensor learning rate),
  and its momentum buffer (the same tensor as the plan's, else the full
  path checks it); the learning rate, momentum, dampening and weight decay
  are read at every call;
- nothing that needs the ops is active: torch.compile or export tracing, a
  dispatch mode, functorch transforms, CUDA graph capture (under a
  profiler the launches run inside a record_function named for the step).

Anything else, and any mismatch, takes the full path, which may leave a new
RepeatStep (a few per optimizer, keyed by parameters and batch rows).
FusedSGD.step() plans its per-parameter updates from .grad the same way
(``RepeatUpdate``, at the end of this file).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torch.optim.optimizer import _global_optimizer_post_hooks as _post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _pre_hooks

from . import backend as _backend
from .kernels.specs import ColumnTarget, SGDHyper

MAX_ENTRIES = 8  # RepeatSteps kept per optimizer (e.g. full batches and a shorter last batch, per model)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_dispatch_modes = torch._C._len_torch_dispatch_stack
_DISTRIBUTED = dist.is_available()


def _plain(t: torch.Tensor | None) -> bool:
    """A real tensor that no subclass, fake mode or functorch transform stands behind."""
    return t is None or ((type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not _is_wrapped(t))


class _Slot:
    """One updated parameter: its param group and momentum buffer as the plan saw them."""

    def __init__(self, optimizer, param: torch.Tensor, group: dict) -> None:
        self.param, self.group, self.params = param, group, group["params"]
        self.group_index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
        self.index = next(i for i, p in enumerate(self.params) if p is param)
        self.flags = _flags(group)
        self.momentum, self.decay, self.lr_tensor = self.flags[0], self.flags[1], self.flags[-1]
        self.buffer = optimizer.state[param].get("momentum_buffer") if self.momentum else None

    def holds(self, groups: list) -> bool:
        """Whether the parameter still requires grad and sits where the plan found it."""
        group = self.group
        return (groups[self.group_index] is group and group["params"] is self.params
                and self.params[self.index] is self.param and self.param.requires_grad)


def _flags(group: dict) -> tuple:
    """What of a param group decides the update's code (the kernels' compile-time constants)."""
    return (float(group["momentum"]) != 0, float(group["weight_decay"]) != 0, bool(group["nesterov"]),
            bool(group.get("maximize", False)), bool(group.get("differentiable", False)),
            isinstance(group["lr"], torch.Tensor))


def _extras(slot: _Slot, group: dict, state, head: tuple) -> tuple | None:
    """head + one slot's kernels/step.slot_extras values for this call, or None (a new or loaded
    buffer, a learning-rate tensor that moved): the full path checks those and plans again."""
    lr = group["lr"]
    if slot.lr_tensor:
        if lr.device != slot.param.device or lr.numel() != 1:
            return None
    else:
        lr = float(lr)
    if slot.momentum:
        buf = state[slot.param].get("momentum_buffer")
        if buf is None or buf is not slot.buffer:
            return None
        momentum = float(group["momentum"])
        head += (buf, lr, momentum, momentum, 1.0 - float(group["dampening"]))
    else:
        head += (lr,)
    return head + (float(group["weight_decay"]),) if slot.decay else head


def _key(x, target, weight, bias, row_index) -> tuple:
    """The cache key: the parameters' identity, and what the full path's checks and the plan depend on
    (a parameter's dtype, device or layout changes when its .data is replaced)."""
    return (id(weight), id(bias), x.shape, x.stride(), x.dtype, x.device, target.shape, target.stride(), target.dtype,
            target.get_device(), weight.shape, weight.dtype, weight.get_device(), weight.is_contiguous(),
            None if bias is None else (bias.shape, bias.dtype, bias.get_device(), bias.is_contiguous()),
            None if row_index is None else (row_index.shape, row_index.stride(), row_index.dtype,
                                            row_index.get_device()))


class RepeatStep:
    """A planned step and the conditions under which it is still the step the full path would take."""

    def __init__(self, launches, x, weight, bias, target, row_index, options: tuple, slots: tuple) -> None:
        self.launches, self.slots = launches, slots
        self.weight, self.bias = weight, bias
        self.reduction, self.backend, self.input_precision, self.matmul, self.setting = options
        self.params = [slot.param for slot in slots]
        self.shared = len(slots) == 2 and slots[0].group is slots[1].group

    def extras(self, optimizer) -> tuple | None:
        """This call's values for the planned launches, or None if a slot no longer applies."""
        groups, state, slots = optimizer.param_groups, optimizer.state, self.slots
        first = slots[0]
        if not first.holds(groups) or _flags(first.group) != first.flags:
            return None
        extras = _extras(first, first.group, state, ())
        if len(slots) == 1 or extras is None:
            return extras
        second = slots[1]
        if not second.holds(groups) or (not self.shared and _flags(second.group) != second.flags):
            return None
        return _extras(second, second.group, state, extras)


def _options(reduction: str, backend: str, input_precision: str, x: torch.Tensor) -> tuple:
    auto = input_precision == "auto" and x.dtype == torch.float32
    return (reduction, backend, input_precision, _matmul_precision() if auto else None, _backend.STEP_LAUNCHES)


_matmul_precision = torch._C._get_float32_matmul_precision
_WORLD = getattr(getattr(dist, "distributed_c10d", None), "_world", None) if _DISTRIBUTED else None


def _distributed() -> bool:
    """torch.distributed is initialised (its default group exists)."""
    if not _DISTRIBUTED:
        return False
    return _WORLD._default_pg is not None if hasattr(_WORLD, "_default_pg") else dist.is_initialized()


def try_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
             process_group) -> torch.Tensor | None:
    """The step through a RepeatStep of ``optimizer``, or None (the caller takes the full path)."""
    cache = getattr(optimizer, "_linreg_repeat_steps", None)
    if not cache:
        return None
    try:
        # Nothing about this call may need the ops' path: tracing, transforms, a process group, graph capture.
        if torch.compiler.is_compiling() or _dispatch_modes() or type(x) is not torch.Tensor or _is_wrapped(x) \
                or type(target) is not torch.Tensor or _is_wrapped(target) \
                or (row_index is not None and not _plain(row_index)) \
                or (process_group is not False and (process_group is not None or _distributed())) \
                or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        entry = cache.get(_key(x, target, weight, bias, row_index))
        if entry is None or weight is not entry.weight or bias is not entry.bias or reduction != entry.reduction \
                or backend != entry.backend or input_precision != entry.input_precision \
                or entry.setting != _backend.STEP_LAUNCHES \
                or (entry.matmul is not None and _matmul_precision() != entry.matmul):
            return None
        extras = entry.extras(optimizer)
        if extras is None:
            return None
    except Exception:  # anything odd: the full path checks it and says what is wrong
        return None
    if optimizer._optimizer_step_pre_hooks or _pre_hooks:
        optimizer._pre_step_hooks()
    if torch.autograd.profiler._is_profiler_enabled:  # a profile shows the step, as it shows the ops
        with torch.profiler.record_function("linreg_fused::fused_sgd_step (repeat call)"):
            loss = entry.launches(x, weight, bias, target, row_index, extras)
    else:
        loss = entry.launches(x, weight, bias, target, row_index, extras)
    # The kernel wrote through pointers: a graph that saved the old values must raise, not reuse them.
    torch._C._increment_version(entry.params)
    optimizer._opt_called = True  # what FusedSGD._mark_stepped records (LR schedulers read it)
    if optimizer._optimizer_step_post_hooks or _post_hooks:
        optimizer._post_step_hooks()
    return loss


def remember_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
                  process_group, scale: float, loss_scale: float, loss_dtype: torch.dtype) -> None:
    """After a full-path step: plan a RepeatStep for the next call, where the repeat path applies."""
    from .optim import FusedSGD  # optim uses this module for FusedSGD.step()

    if not isinstance(optimizer, FusedSGD) or type(optimizer).fused_update is not FusedSGD.fused_update \
            or torch.compiler.is_compiling() or _dispatch_modes() \
            or (process_group is not False and (process_group is not None or _distributed())) \
            or not all(_plain(t) for t in (x, weight, bias, target, row_index)) \
            or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
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
        if slot.lr_tensor and (lr.device != param.device or lr.numel() != 1):
            return  # read on the host by the full path at every call
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
    cache[_key(x, target, weight, bias, row_index)] = RepeatStep(launches, x, weight, bias, target, row_index,
                                                         _options(reduction, backend, input_precision, x),
                                                         tuple(slots))


# ---------------------------------------------------------------- FusedSGD.step()
class RepeatUpdate:
    """FusedSGD.step()'s update of one parameter from its .grad, planned once: reduce_update_ with
    the gradient as a one-row partial buffer, relaunched while the gradient's layout, the parameter
    and its group's flags stay those of the plan."""

    def __init__(self, optimizer, param: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        from .kernels.reduce_update import plan_reduce_update
        from .kernels.launch import FastLaunch
        from .kernels.step import slot_extras

        self.slot = _Slot(optimizer, param, group)
        lr = group["lr"]
        hyper = SGDHyper(lr=0.0 if self.slot.lr_tensor else float(lr), momentum=float(group["momentum"]),
                         dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                         nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)),
                         lr_tensor=lr if self.slot.lr_tensor else None)
        target = ColumnTarget(0, param.detach(), hyper, self.slot.buffer)
        plan = plan_reduce_update(grad.view(1, -1), [target], scale=1.0)
        self.launch = FastLaunch(plan, ["partials_ptr", "a_out_ptr", *(f"a_{n}" for n in slot_extras(target))])
        self.key = _grad_key(param, grad)


def _grad_key(param: torch.Tensor, grad: torch.Tensor) -> tuple:
    return (id(param), grad.shape, grad.dtype, grad.get_device(), grad.is_contiguous(), param.shape, param.dtype,
            param.get_device(), param.is_contiguous())


def try_updates(optimizer) -> bool:
    """FusedSGD.step()'s whole update through the RepeatUpdates of its last full step: True when
    done; False (nothing launched) when any group, parameter, gradient or flag differs from it."""
    plan = getattr(optimizer, "_linreg_repeat_updates", None)
    if not plan:
        return False
    try:
        if torch.compiler.is_compiling() or _dispatch_modes():
            return False
        groups = optimizer.param_groups
        if len(groups) != len(plan):
            return False
        launches = []
        for group, (planned_group, params, entries) in zip(groups, plan):
            if group is not planned_group or group["params"] is not params:
                return False
            flags = None
            for p, entry in zip(params, entries):
                grad = p.grad
                if grad is None:
                    if entry is not None:
                        return False
                    continue
                if entry is None or type(grad) is not torch.Tensor or _is_wrapped(grad) \
                        or _grad_key(p, grad) != entry.key:
                    return False
                slot = entry.slot
                if flags is None:
                    flags = _flags(group)
                if flags != slot.flags or not p.requires_grad:
                    return False
                extras = _extras(slot, group, optimizer.state, (grad, p))
                if extras is None:
                    return False
                launches.append((entry.launch, extras))
        if not launches or (launches[0][1][0].is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
    except Exception:  # the full path says what is wrong
        return False
    for launch, extras in launches:
        launch(*extras)
    torch._C._increment_version([extras[1] for _, extras in launches])
    return True


def remember_updates(optimizer, updated: list) -> None:
    """After a full FusedSGD.step(): plan a RepeatUpdate for each (group, param, grad) it updated with
    the kernels, for the next step() — if every parameter with a gradient was such a one."""
    if torch.compiler.is_compiling() or _dispatch_modes():
        return
    done = {id(p): (group, grad) for group, p, grad in updated}
    plan = []
    for group in optimizer.param_groups:
        entries = []
        for p in group["params"]:
            if p.grad is None:
                entries.append(None)
                continue
            if id(p) not in done or not _plannable(optimizer, group, p, done[id(p)][1]):
                optimizer.__dict__.pop("_linreg_repeat_updates", None)
                return
            entries.append(RepeatUpdate(optimizer, p, group, done[id(p)][1]))
        plan.append((group, group["params"], entries))
    optimizer._linreg_repeat_updates = plan


def _plannable(optimizer, group: dict, param: torch.Tensor, grad: torch.Tensor) -> bool:
    if not (_plain(param) and _plain(grad)) or param.is_complex() or param.numel() == 0 \
            or grad.layout != torch.strided or not grad.is_contiguous() or not param.is_contiguous() \
            or (grad.is_cuda and torch.cuda.is_current_stream_capturing()) \
            or _backend.select_ops(optimizer.backend, param.device).name != "triton":
        return False
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and (lr.device != param.device or lr.numel() != 1):
        return False
    buf = optimizer.state[param].get("momentum_buffer") if float(group["momentum"]) != 0 else None
    return buf is None or (buf.is_contiguous() and buf.dtype == param.dtype and buf.device == param.device)
