"""The repeat-call path of ``FusedSGD.step()`` on ``.grad`` (the same idea as step_cache.py).

A full ``step()`` that updated every parameter with a gradient through the
Triton kernels leaves an ``UpdatePlan`` on the optimizer: per parameter,
reduce_update_ with its gradient as a one-row partial buffer, planned once
(kernels/launch.py relaunches it). The next ``step()`` goes straight to
those launches while the param groups are the same dicts holding the same
parameter lists of the same lengths, the parameters that had no gradient
are still in their places and still have none, every parameter and gradient has the plan's layout
(repeat_checks.tensor_guards: the gradients are new tensors each step), and
each group's flags and buffers are the plan's (repeat_checks.reader; the
settings are read at every call). Anything else takes the full path.
Step hooks run around ``step()`` itself (torch.optim wraps it), as before.
"""

from __future__ import annotations

import torch

from . import backend as _backend
from .kernels.specs import ColumnTarget
from .repeat_checks import Slot, dispatch_modes, hyper_of, plain, plannable_slot, reader, tensor_guards

_increment_version = torch._C._increment_version


class UpdatePlan:
    """Every parameter's planned update, and what the plan was made for."""

    def __init__(self, optimizer, updated: list[tuple[Slot, torch.Tensor]], without: list[tuple]) -> None:
        from .kernels.launch import FastLaunch
        from .kernels.reduce_update import plan_reduce_update
        from .kernels.step import slot_extras

        self.groups = list(optimizer.param_groups)
        self.lists = [(g["params"], len(g["params"])) for g in self.groups]
        self.without = without
        self.params = [slot.param for slot, _ in updated]
        self.guards = tensor_guards(*self.params, *(grad for _, grad in updated))
        slots = [slot for slot, _ in updated]
        self.read = reader(slots)
        self.launches, start = [], 0
        for slot, grad in updated:
            target = ColumnTarget(0, slot.param.detach(), hyper_of(slot, slot.group), slot.buffer)
            # The pointers the kernel does not read point at a small tensor of the plan's own: the plan
            # must not keep this step's gradient alive (zero_grad(set_to_none=True) frees it).
            unread = torch.empty(1, dtype=grad.dtype, device=grad.device)
            plan = plan_reduce_update(grad.view(1, -1), [target], scale=1.0, fallback=unread)
            names = ["partials_ptr", "a_out_ptr", *(f"a_{n}" for n in slot_extras(target))]
            stop = start + len(names) - 2
            # Every varying tensor is guarded (gradient, parameter) or read as planned (buffer, lr).
            self.launches.append((FastLaunch(plan, names, trusted=names), start, stop))
            start = stop
        self.cuda = self.params[0].is_cuda


def try_updates(optimizer) -> bool:
    """FusedSGD.step()'s whole update through the UpdatePlan of its last full step: True when
    done; False (nothing launched) when any group, parameter, gradient or flag differs from it."""
    plan = getattr(optimizer, "_linreg_repeat_updates", None)
    if plan is None:
        return False
    try:
        if torch.compiler.is_compiling() or dispatch_modes():
            return False
        groups = optimizer.param_groups
        if len(groups) != len(plan.groups):
            return False
        for group, planned, (params, n) in zip(groups, plan.groups, plan.lists):
            if group is not planned or group["params"] is not params or len(params) != n:
                return False
        for params, i, p in plan.without:  # still there (not swapped for another), still without a gradient
            if params[i] is not p or p.grad is not None:
                return False
        params = plan.params
        grads = [p.grad for p in params]
        if not plan.guards.check(*params, *grads) or (plan.cuda and torch.cuda.is_current_stream_capturing()):
            return False
        extras = plan.read(optimizer)
        if extras is None:
            return False
    except Exception:  # the full path says what is wrong
        return False
    for (fast, start, stop), param, grad in zip(plan.launches, params, grads):
        fast.launch(grad, param, *extras[start:stop])
    _increment_version(params)
    return True


def remember_updates(optimizer, updated: list) -> None:
    """After a full FusedSGD.step(): plan the updates of its (group, param, grad)s for the next step(),
    if every parameter with a gradient was updated by the kernels and each can be planned."""
    optimizer.__dict__.pop("_linreg_repeat_updates", None)
    if torch.compiler.is_compiling() or dispatch_modes() or not updated:
        return
    done = {id(p): (group, grad) for group, p, grad in updated}
    slots, without = [], []
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                without.append((group["params"], i, p))
                continue
            if id(p) not in done or not _plannable(optimizer, p, done[id(p)][1]):
                return
            slot = plannable_slot(optimizer, p, group)
            if slot is None:
                return
            slots.append((slot, done[id(p)][1]))
    optimizer._linreg_repeat_updates = UpdatePlan(optimizer, slots, without)


def _plannable(optimizer, param: torch.Tensor, grad: torch.Tensor) -> bool:
    return (plain(param) and plain(grad) and grad.layout == torch.strided and grad.is_contiguous()
            and param.is_contiguous() and not (grad.is_cuda and torch.cuda.is_current_stream_capturing())
            and _backend.select_ops(optimizer.backend, param.device).name == "triton")
