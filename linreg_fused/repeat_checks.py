"""What the repeat-call paths (step_cache.py, loss_cache.py, update_cache.py) look at again per call.

A planned step stays the step the full path would take while everything the
full path's checks and plan depended on is unchanged. Per call that is:

- the tensors: x, target, weight, bias, row index (and each planned
  momentum buffer and learning-rate tensor): their Python type, dtype,
  device, shape, strides and requires_grad, and the dispatch state they
  are seen in (a dispatch mode, a functorch transform, a fake tensor or
  inference mode changes it): ``tensor_guards``, one C++ call for all of
  them (the check torch.compile's own guards run, TensorGuards), or the
  same in Python where this torch has no such thing;
- the optimizer: ``reader`` builds, per plan, one straight-line function
  that checks each updated parameter is still in the same param group at
  the same place, that the group's flags (momentum ≠ 0, weight decay ≠ 0,
  nesterov, maximize, differentiable, a tensor learning rate) are the
  plan's, and returns the values the kernels take this call (learning
  rate, momentum, dampening, weight decay, the momentum buffers and a
  learning-rate tensor, whichever tensors they are now, guarded to have
  the plan's layout): read at every call, as the full path reads them.

What is not looked at, and why that is safe: data pointers (the launcher
checks alignment, kernels/launch.py; a new pointer is just a new address);
the values in the tensors (the kernels read them); the parameters'
identity is compared by the callers (``is``), which is why a parameter
replaced by another object, or an optimizer holding other parameters,
never reaches a plan made for the old one.
"""

from __future__ import annotations

import torch

from .kernels.specs import SGDHyper

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
dispatch_modes = torch._C._len_torch_dispatch_stack

try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # an older torch, or one built without Dynamo
    _TensorGuards = None


def plain(t: torch.Tensor | None) -> bool:
    """A real tensor that no subclass, fake mode or functorch transform stands behind."""
    return t is None or ((type(t) is torch.Tensor or type(t) is torch.nn.Parameter) and not _is_wrapped(t))


class _PythonGuards:
    """TensorGuards' check in Python (used where torch has no TensorGuards): the same properties,
    the dispatch state approximated by the functorch wrapping and the dispatch-mode stack."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.expected = tuple(_layout(t) for t in tensors)

    def check(self, *tensors) -> bool:
        if len(tensors) != len(self.expected) or dispatch_modes():
            return False
        return all(isinstance(t, torch.Tensor) and _layout(t) == e for t, e in zip(tensors, self.expected))


def _layout(t: torch.Tensor) -> tuple:
    return (type(t), t.dtype, t.device, t.shape, t.stride(), t.requires_grad, _is_wrapped(t), t.is_inference())


def tensor_guards(*tensors: torch.Tensor):
    """An object whose ``check(*others)`` is True while ``others`` match ``tensors`` one for one in
    Python type, dtype, device, shape, strides, requires_grad and dispatch keys (seen with this
    thread's dispatch state at the time of the check, against that of now)."""
    if _TensorGuards is not None:
        try:
            # Built with grad mode on: TensorGuards records requires_grad as grad mode ∧ requires_grad.
            with torch.enable_grad():
                guards = _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                       dynamic_dims_strides=[list(t.stride()) for t in tensors])
            if guards.check(*tensors):  # a sanity check of this torch's TensorGuards on what it was built from
                return guards
        except Exception:  # another signature in this torch: the Python check
            pass
    return _PythonGuards(*tensors)


def flags(group: dict) -> tuple:
    """What of a param group decides the update's code (the kernels' compile-time constants)."""
    return (float(group["momentum"]) != 0, float(group["weight_decay"]) != 0, bool(group["nesterov"]),
            bool(group.get("maximize", False)), bool(group.get("differentiable", False)),
            isinstance(group["lr"], torch.Tensor))


class Slot:
    """One updated parameter: its param group and momentum buffer as the plan saw them."""

    def __init__(self, optimizer, param: torch.Tensor, group: dict) -> None:
        self.param, self.group, self.params = param, group, group["params"]
        self.group_index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
        self.index = next(i for i, p in enumerate(self.params) if p is param)
        self.flags = flags(group)
        self.momentum, self.decay, self.lr_tensor = self.flags[0], self.flags[1], self.flags[-1]
        self.buffer = optimizer.state[param].get("momentum_buffer") if self.momentum else None
        self.lr = group["lr"] if self.lr_tensor else None


def hyper_of(slot: Slot, group: dict) -> SGDHyper:
    lr = group["lr"]
    return SGDHyper(lr=0.0 if slot.lr_tensor else float(lr), momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                    nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)),
                    lr_tensor=lr if slot.lr_tensor else None)


def plannable_slot(optimizer, param: torch.Tensor, group: dict) -> Slot | None:
    """The slot of a parameter the step updates, or None where a plan cannot hold it (a buffer the
    full path would convert, a tensor lr it reads on the host, a complex or empty parameter)."""
    slot = Slot(optimizer, param, group)
    buf = slot.buffer
    if slot.momentum and (buf is None or not plain(buf) or not buf.is_contiguous() or buf.dtype != param.dtype
                          or buf.device != param.device):
        return None
    lr = slot.lr
    if slot.lr_tensor and (not plain(lr) or lr.device != param.device or lr.numel() != 1):
        return None
    return None if param.is_complex() or param.numel() == 0 else slot


def reader(slots: list[Slot], head: int = 0):
    """``read(optimizer, *values)`` -> ``values`` followed by each slot's kernels/step.slot_extras values
    for this call, or None when a slot no longer applies (a parameter moved or left its group, a
    flag changed, a momentum buffer was replaced or loaded, a learning-rate tensor moved): the full
    path then checks that and plans again. ``head``: how many leading values the caller passes through.

    Straight-line code generated per plan (as Triton's binder is): reading a group dict by a loop
    over its settings costs several times as much."""
    ns: dict = {"float": float, "Tensor": torch.Tensor, "isinstance": isinstance}
    values = [f"h{i}" for i in range(head)]
    lines = [f"def read(optimizer{''.join(', ' + v for v in values)}):", "    groups = optimizer.param_groups"]
    guarded: dict[str, torch.Tensor] = {}  # the buffers and lr tensors read -> as planned; checked together
    group_var: dict[int, str] = {}
    for k, slot in enumerate(slots):
        ns[f"P{k}"], ns[f"W{k}"] = slot.params, slot.param
        shared = next((j for j in range(k) if slots[j].group is slot.group), None)
        if shared is not None:  # the same group dict: its flags and settings are read once
            g = group_var[shared]
            lines.append(f"    if P{shared}[{slot.index}] is not W{k}: return None")
        else:
            g = group_var[k] = f"g{k}"
            ns[f"G{k}"] = slot.group
            lines += [f"    {g} = groups[{slot.group_index}]",
                      f"    if {g} is not G{k} or {g}['params'] is not P{k} or P{k}[{slot.index}] is not W{k}: "
                      "return None"]
            lines += _flag_lines(slot, g, k)
        n = shared if shared is not None else k
        if slot.momentum:
            # The buffer of now, whichever tensor it is (replaced, loaded from a state_dict): the launch
            # takes it as the full path would, once the guards below show it has the planned buffer's
            # layout (what the full path would otherwise convert); none (a first step) fails them.
            lines += [f"    s{k} = optimizer.state.get(W{k})",
                      f"    b{k} = None if s{k} is None else s{k}.get('momentum_buffer')"]
            guarded[f"b{k}"] = slot.buffer
            values += [f"b{k}", f"lr{n}", f"m{n}", f"m{n}", f"gw{n}"]
        else:
            values.append(f"lr{n}")
        if slot.lr_tensor:
            guarded[f"lr{n}"] = slot.lr
        if slot.decay:
            values.append(f"wd{n}")
    if guarded:  # their layout and device as planned (a tensor lr must sit on the parameters' device)
        ns["TENSORS"] = tensor_guards(*guarded.values())
        lines.append(f"    if not TENSORS.check({', '.join(guarded)}): return None")
    lines.append(f"    return ({', '.join(values)},)")
    exec("\n".join(lines), ns)
    return ns["read"]


def _flag_lines(slot: Slot, g: str, k: int) -> list[str]:
    """Check one group's flags against the plan's and read its settings into lr<k>, m<k>, gw<k>, wd<k>."""
    momentum, decay, nesterov, maximize, differentiable, lr_tensor = slot.flags
    lines = [f"    lr{k} = {g}['lr']"]
    if lr_tensor:
        lines.append(f"    if not isinstance(lr{k}, Tensor): return None")
    else:  # a float (or what float() takes, as the full path reads it), not a tensor
        lines += [f"    if lr{k}.__class__ is not float:",
                  f"        if isinstance(lr{k}, Tensor): return None",
                  f"        lr{k} = float(lr{k})"]
    if momentum:
        lines += [f"    m{k} = float({g}['momentum'])", f"    if m{k} == 0: return None",
                  f"    gw{k} = 1.0 - float({g}['dampening'])"]
    else:
        lines.append(f"    if float({g}['momentum']) != 0: return None")
    if decay:
        lines += [f"    wd{k} = float({g}['weight_decay'])", f"    if wd{k} == 0: return None"]
    else:
        lines.append(f"    if float({g}['weight_decay']) != 0: return None")
    for on, read in ((nesterov, f"{g}['nesterov']"), (maximize, f"{g}.get('maximize', False)"),
                     (differentiable, f"{g}.get('differentiable', False)")):
        lines.append(f"    if {'not ' if on else ''}{read}: return None")
    return lines
