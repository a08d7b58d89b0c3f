"""The repeat-call path of the fused SGD step (functional.fused_sgd_step, FusedLinearRegressor.train_step).

A training loop calls the step again and again with batches of the same
shapes, on the same model and optimizer. The first call takes the full path
(checks, the registered ops); where the step runs the Triton kernels in
eager mode, it also leaves a ``RepeatStep`` on the optimizer: the step's
planned launches (kernels/step.py: one launch where the grid allows, else
two, relaunched without Triton's per-call specialisation) and everything
the checks depended on. A later call whose tensors, options and optimizer
settings still match goes straight to those launches; only what can change
between calls is looked at again (repeat_checks.py says what, and why the
rest cannot change):

- x, target, weight, bias (and row_index): Python type, shape, strides,
  dtype, device, requires_grad and dispatch state, in one guard check; the
  weight and bias are the plan's parameter objects;
- the options (reduction, backend, input_precision and, for "auto" on
  float32, torch's float32 matmul precision, and backend.STEP_LAUNCHES),
  and no process group;
- per updated parameter: its param group, the group's flags, its momentum
  buffer (the planned tensor) and a tensor learning rate's layout and
  device; the learning rate, momentum, dampening and weight decay are read
  at every call;
- nothing that needs the ops is active: torch.compile or export tracing
  (is_compiling; a dispatch mode or fake tensors fail the guard check),
  CUDA graph capture, step pre-hooks (they may change the settings the step
  reads: the full path runs them first). Under a profiler the launches run
  inside a record_function named for the step.

No plan is made while a parameter that requires grad is outside the
optimizer (only a scan of every group would see it join one later).

Anything else, and any mismatch, takes the full path, which may leave a new
RepeatStep (a few per optimizer: full batches and a shorter last batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim.optimizer import _global_optimizer_post_hooks as _post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _pre_hooks

from . import backend as _backend
from .kernels.specs import ColumnTarget
from .repeat_checks import Slot, dispatch_modes, hyper_of, plain, plannable_slot, reader, tensor_guards

MAX_ENTRIES = 8  # RepeatSteps kept per optimizer (e.g. full batches and a shorter last batch, per model)
_DISTRIBUTED = dist.is_available()
_WORLD = getattr(getattr(dist, "distributed_c10d", None), "_world", None) if _DISTRIBUTED else None
_matmul_precision = torch._C._get_float32_matmul_precision
_increment_version = torch._C._increment_version
_is_compiling = torch.compiler.is_compiling


if _DISTRIBUTED and hasattr(_WORLD, "_default_pg"):
    def distributed() -> bool:
        """torch.distributed is initialised (its default group exists)."""
        return _WORLD._default_pg is not None
else:
    def distributed() -> bool:
        """torch.distributed is initialised (its default group exists)."""
        return _DISTRIBUTED and dist.is_initialized()


def group_given(process_group) -> bool:
    """Whether the fused step would run under a process group (given, or the world's by default)."""
    return process_group is not False and (process_group is not None or distributed())


def _current_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


def stream_of(x: torch.Tensor) -> int | None:
    """The CUDA stream a plan's reused buffers are ordered on (None off CUDA)."""
    return _current_stream(x.device.index) if x.is_cuda else None


def elsewhere(entry) -> bool:
    """Whether a CUDA plan's launch would not be ordered after its last one: during graph capture, or
    on another stream than the plan's (its partial buffer and ticket are reused)."""
    return entry.cuda and (torch.cuda.is_current_stream_capturing()
                           or _current_stream(entry.device_index) != entry.stream)


def capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class RepeatStep:
    """A planned step and the conditions under which it is still the step the full path would take."""

    def __init__(self, launches, x, weight, bias, target, row_index, options: tuple, slots: list[Slot]) -> None:
        self.launches, self.run = launches, launches.run
        self.weight, self.bias, self.indexed = weight, bias, row_index is not None
        self.reduction, self.backend, self.input_precision, self.matmul, self.setting = options
        self.guards = tensor_guards(*(t for t in (x, target, weight, bias, row_index) if t is not None))
        self.read = reader(slots)
        self.params = [slot.param for slot in slots]
        self.cuda, self.device_index, self.stream = x.is_cuda, x.device.index, stream_of(x)


def options(reduction: str, backend: str, input_precision: str, x: torch.Tensor) -> tuple:
    auto = input_precision == "auto" and x.dtype == torch.float32
    return (reduction, backend, input_precision, _matmul_precision() if auto else None, _backend.STEP_LAUNCHES)


def try_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
             process_group) -> torch.Tensor | None:
    """The step through a RepeatStep of ``optimizer``, or None (the caller takes the full path)."""
    entries = getattr(optimizer, "_linreg_repeat_steps", None)
    if not entries:
        return None
    try:
        # First what Dynamo must see before anything it cannot trace; then what needs the ops' path.
        if _is_compiling() or dispatch_modes() or optimizer._optimizer_step_pre_hooks or _pre_hooks \
                or (process_group is not False and (process_group is not None or distributed())):
            return None
        for entry in entries:
            if entry.weight is not weight or entry.bias is not bias or entry.indexed is (row_index is None):
                continue
            if row_index is None:
                same = entry.guards.check(x, target, weight) if bias is None else \
                    entry.guards.check(x, target, weight, bias)
            else:
                same = entry.guards.check(x, target, weight, row_index) if bias is None else \
                    entry.guards.check(x, target, weight, bias, row_index)
            if same:
                break
        else:
            return None
        if reduction != entry.reduction or backend != entry.backend or input_precision != entry.input_precision \
                or entry.setting != _backend.STEP_LAUNCHES \
                or (entry.matmul is not None and _matmul_precision() != entry.matmul) \
                or (entry.cuda and elsewhere(entry)):
            return None
        extras = entry.read(optimizer)
        if extras is None:
            return None
    except Exception:  # anything odd: the full path checks it and says what is wrong
        return None
    if torch.autograd.profiler._is_profiler_enabled:  # a profile shows the step, as it shows the ops
        with torch.profiler.record_function("linreg_fused::fused_sgd_step (repeat call)"):
            loss = entry.run(x, weight, bias, target, row_index, extras)
    else:
        loss = entry.run(x, weight, bias, target, row_index, extras)
    # The kernel wrote through pointers: a graph that saved the old values must raise, not reuse them.
    _increment_version(entry.params)
    optimizer._opt_called = True  # what FusedSGD._mark_stepped records (LR schedulers read it)
    if optimizer._optimizer_step_post_hooks or _post_hooks:
        optimizer._post_step_hooks()
    return loss


def remember_step(x, weight, bias, target, optimizer, reduction, row_index, backend, input_precision,
                  process_group, scale: float, loss_scale: float, loss_dtype: torch.dtype) -> None:
    """After a full-path step: plan a RepeatStep for the next call, where the repeat path applies."""
    from .optim import FusedSGD  # optim uses update_cache, which uses repeat_checks: no cycle at import

    if not isinstance(optimizer, FusedSGD) or type(optimizer).fused_update is not FusedSGD.fused_update \
            or _is_compiling() or dispatch_modes() or group_given(process_group) \
            or not all(plain(t) for t in (x, weight, bias, target, row_index)) or capturing(x):
        return
    ops = _backend.select_ops(backend, x.device)
    if ops.name != "triton" or x.dim() != 2 or not weight.is_contiguous() or \
            (bias is not None and not bias.is_contiguous()):
        return
    slots, targets = [], []
    out_features, in_features = weight.shape
    for param, col_start in ((weight, 0), (bias, out_features * in_features)):
        if param is None or not param.requires_grad:
            continue  # (requires_grad is in the guards: unfreezing it takes the full path)
        group = optimizer.group_of(param)
        if group is None:
            return  # outside the optimizer: nothing would see it join a group later (the plan would skip it)
        slot = plannable_slot(optimizer, param, group)
        if slot is None:
            return
        slots.append(slot)
        targets.append(ColumnTarget(col_start, param.detach(), hyper_of(slot, group), slot.buffer))
    if not slots:
        return
    from .kernels.step import StepLaunches

    launches = StepLaunches(x, weight.detach(), None if bias is None else bias.detach(), target, targets,
                            row_index=row_index, scale=scale, loss_scale=loss_scale, loss_dtype=loss_dtype,
                            input_precision=_backend.resolve_precision(input_precision, x.dtype),
                            launches=_backend.STEP_LAUNCHES)
    entry = RepeatStep(launches, x, weight, bias, target, row_index,
                       options(reduction, backend, input_precision, x), slots)
    entries = optimizer.__dict__.setdefault("_linreg_repeat_steps", [])
    # The newest first; a plan for the same parameters and tensor layouts replaces its older self.
    entries[:] = [entry] + [e for e in entries if not _same_plan(e, entry, x, target, row_index)][:MAX_ENTRIES - 1]


def _same_plan(old: RepeatStep, new: RepeatStep, x, target, row_index) -> bool:
    if old.weight is not new.weight or old.bias is not new.bias or old.indexed != new.indexed:
        return False
    tensors = [t for t in (x, target, new.weight, new.bias, row_index) if t is not None]
    return old.guards.check(*tensors)
