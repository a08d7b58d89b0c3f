"""The repeat-call path of ``loss(x, t, optimizer=opt).backward()`` (functional.linear_mse with a
FusedSGD): the same idea as linreg_fused/step_cache.py for a loss whose backward is the step.

The first call takes the full path (LinearMSEFunction over the registered ops) and, where the
repeat path applies, leaves a ``RepeatLoss`` on the optimizer. A later call with the same
tensor layouts, options and optimizer structure (repeat_checks.py: the guards and the reader)
runs:

- forward: the gradient pass and the loss in one launch (kernels/sgd_step.py with no target;
  two launches, the pass and the loss sum, where ``one_launch`` says so), into a partial buffer
  of its own (a loss may wait for its backward while others are made);
- backward: reduce_update_ from that buffer and grad_output, the SGD step of weight and bias
  with the hyper-parameters and momentum buffers of that moment, as the full path's backward;
  where the optimizer changed between the two (or step pre-hooks are set, which may change it),
  the full path's update (FusedUpdate) instead.

It applies when x and target need no gradient and every parameter that requires grad is in the
optimizer (the full path gives the others a .grad), outside tracing, transforms and capture.
"""

from __future__ import annotations

import torch

from . import backend as _backend
from .kernels.specs import ColumnTarget, GradPartials
from .ops import RegisteredOps
from .ops import loss_scale as _loss_scale
from .optim import FusedSGD, FusedUpdate
from .repeat_checks import dispatch_modes, hyper_of, plain, plannable_slot, reader, tensor_guards
from .step_cache import MAX_ENTRIES, _post_hooks, _pre_hooks, capturing, elsewhere, group_given, options, stream_of

_increment_version = torch._C._increment_version


class _RepeatLossFunction(torch.autograd.Function):
    """loss from the planned forward; backward: the planned step (no gradient for anything)."""

    @staticmethod
    def forward(ctx, weight, bias, call):
        entry, optimizer, x, target = call
        loss, partials = entry.forward(x, target, weight, bias)
        ctx.entry, ctx.optimizer, ctx.partials = entry, optimizer, partials
        # Saved as the full path saves them: a backward after another step changed them raises, as there.
        ctx.save_for_backward(weight, bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("a loss built with optimizer= applies the SGD step in its backward; it has no "
                               "second derivative (call backward() without create_graph=True)")
        ctx.saved_tensors  # noqa: B018 (autograd's check that weight and bias are as the forward saw them)
        ctx.entry.step(ctx.optimizer, ctx.partials, grad_loss)
        return None, None, None


# autograd.Function.apply's own work before the C apply is for functorch (transforms, dead wrappers of
# a finished one): the guards above saw plain tensors in this thread's dispatch state (a transform's
# layers change it), so the repeat path calls the C apply itself (1-2 µs less per loss).
_apply = super(torch.autograd.Function, _RepeatLossFunction).apply


class RepeatLoss:
    """The planned forward and backward of one loss(optimizer=) shape, and the step's slots."""

    def __init__(self, x, weight, bias, target, slots: list, reduction: str, input_precision: str,
                 options: tuple) -> None:
        from .kernels import formulations, reduce_update, sgd_step
        from .kernels.config import device_profile
        from .kernels.launch import Composed, FastLaunch
        from .kernels.step import slot_extras

        self.weight, self.bias = weight, bias
        self.params = [s.param for s in slots]
        self.reduction, self.backend, self.input_precision, self.matmul, self.setting = options
        self.guards = tensor_guards(*(t for t in (x, target, weight, bias) if t is not None))
        self.read = reader(slots, head=1 + len(slots))  # (grad_output, *params, *extras)
        self.cuda, self.device_index, self.stream = x.is_cuda, x.device.index, stream_of(x)
        n, o = x.shape[0], weight.shape[0]
        scale = _loss_scale(reduction, n, o)
        self.rows_outputs_inputs, self.grad_scale = (n, o, weight.shape[1]), 2.0 * scale
        w, b = weight.detach(), None if bias is None else bias.detach()
        targets = [ColumnTarget(0 if s.param is weight else o * weight.shape[1], s.param.detach(),
                                hyper_of(s, s.group), s.buffer) for s in slots]
        self.loss_like = torch.empty((), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        plan, sums, self.ticket = sgd_step.plan_linear_mse_step(
            x, w, b, target, [], scale=0.0, loss_out=self.loss_like, loss_scale=scale,
            input_precision=_backend.resolve_precision(input_precision, x.dtype))
        self.partials_like = sums.buffer
        # The caller guarantees the batch's dtypes (the guards); the buffer and loss are new, of the plan's.
        batch = ["partials_ptr", "loss_ptr", "x_ptr", "t_ptr", "w_ptr"] + (["b_ptr"] if bias is not None else [])
        setting = _backend.STEP_LAUNCHES  # "auto": the rule; 1 or 2 force one (as kernels/step.py reads it)
        if setting == 1 or (setting == "auto" and sgd_step.one_launch(*sums.buffer.shape, device_profile(x.device))):
            self._forward = FastLaunch(plan, batch, trusted=batch)
        else:
            # The gradient pass in the formulation config.choose_formulation decides (its own partial rows).
            grad, grad_sums = formulations.plan_grad_partials(
                x, w, b, target, input_precision=_backend.resolve_precision(input_precision, x.dtype))
            self.partials_like = grad_sums.buffer
            total = reduce_update.plan_sum_column(self.partials_like, grad_sums.loss_column, scale, self.loss_like)
            names = ["partials_ptr", "x_ptr", "t_ptr", "w_ptr"] + batch[5:]
            grad_launch = FastLaunch(grad, names, trusted=names)
            sum_launch = FastLaunch(total, ["partials_ptr", "out_ptr"], trusted=["partials_ptr", "out_ptr"])

            def two_launches(partials, loss, *values):
                grad_launch.launch(partials, *values)
                sum_launch.launch(partials, loss)

            self._forward = Composed(two_launches)
        grad_output = self.loss_like  # a 0-d tensor of the loss's dtype: grad_output's slot
        update = reduce_update.plan_reduce_update(self.partials_like, targets, scale=2.0 * scale,
                                                  grad_output=grad_output)
        names = ["partials_ptr", "grad_output_ptr", "a_out_ptr"] + (["b_out_ptr"] if len(targets) == 2 else [])
        names += [f"{s}_{n}" for s, t in zip("ab", targets) for n in slot_extras(t)]
        self._update = FastLaunch(update, names, trusted=names)

    def forward(self, x, target, weight, bias):
        partials, loss = torch.empty_like(self.partials_like), torch.empty_like(self.loss_like)
        if bias is None:
            self._forward.launch(partials, loss, x, target, weight)
        else:
            self._forward.launch(partials, loss, x, target, weight, bias)
        return loss, partials

    def step(self, optimizer, partials, grad_loss) -> None:
        """The backward: the step, with the optimizer's settings and buffers now (as the full path's)."""
        extras = None
        if not (optimizer._optimizer_step_pre_hooks or _pre_hooks):  # hooks first: they may change the settings
            # (autograd gives grad_output the loss's dtype; a 0-d tensor on its device)
            if grad_loss.dtype is not self.loss_like.dtype:
                grad_loss = grad_loss.to(self.loss_like.dtype)
            extras = self.read(optimizer, grad_loss, *self.params)
        if extras is None:  # the groups or buffers changed since the forward: the full path's update
            partials = GradPartials(partials, None, *self.rows_outputs_inputs)
            FusedUpdate(optimizer, self.weight, self.bias).apply_(RegisteredOps(self.backend, partials.buffer.device),
                                                                  partials, grad_loss, self.grad_scale)
            return
        self._update.launch(partials, *extras)
        _increment_version(self.params)
        optimizer._opt_called = True  # what FusedSGD._mark_stepped records (LR schedulers read it)
        if optimizer._optimizer_step_post_hooks or _post_hooks:
            optimizer._post_step_hooks()


def try_loss(x, weight, bias, target, optimizer, reduction, backend, input_precision, process_group):
    """loss(optimizer=)'s repeat path, or None (the caller takes the full path)."""
    entries = getattr(optimizer, "_linreg_repeat_losses", None)
    if not entries:
        return None
    try:
        if torch.compiler.is_compiling() or dispatch_modes() or not torch.is_grad_enabled() \
                or group_given(process_group):
            return None
        for entry in entries:
            if entry.weight is weight and entry.bias is bias and (
                    entry.guards.check(x, target, weight) if bias is None else
                    entry.guards.check(x, target, weight, bias)):
                break
        else:
            return None
        if reduction != entry.reduction or backend != entry.backend or input_precision != entry.input_precision \
                or entry.setting != _backend.STEP_LAUNCHES \
                or (entry.matmul is not None and torch._C._get_float32_matmul_precision() != entry.matmul) \
                or (entry.cuda and elsewhere(entry)):
            return None
        # Which parameters the step updates is decided now, as the full path decides it: the same slots.
        # (The settings, buffers and values are read again by the backward.)
        if entry.read(optimizer, None, *entry.params) is None:
            return None
    except Exception:  # the full path says what is wrong
        return None
    return _apply(weight, bias, (entry, optimizer, x, target))


def remember_loss(x, weight, bias, target, optimizer, reduction, backend, input_precision, process_group) -> None:
    """After a full-path loss(optimizer=): plan a RepeatLoss for the next call, where it applies."""
    if not isinstance(optimizer, FusedSGD) or type(optimizer).fused_update is not FusedSGD.fused_update \
            or torch.compiler.is_compiling() or dispatch_modes() or x.dim() != 2 or target.dim() != 2 \
            or x.requires_grad or target.requires_grad or group_given(process_group) \
            or not all(plain(t) for t in (x, weight, bias, target)) or capturing(x) \
            or _backend.select_ops(backend, x.device).name != "triton" or weight.shape[1] == 0 \
            or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return
    slots = []
    for param in (weight, bias):
        if param is None or not param.requires_grad:
            continue
        group = optimizer.group_of(param)
        if group is None:
            return  # the full path gives it a .grad
        slot = plannable_slot(optimizer, param, group)
        if slot is None:
            return
        slots.append(slot)
    if not slots:
        return
    entry = RepeatLoss(x, weight, bias, target, slots, reduction, input_precision,
                       options(reduction, backend, input_precision, x))
    entries = optimizer.__dict__.setdefault("_linreg_repeat_losses", [])
    entries[:] = [entry] + [e for e in entries if not (e.weight is weight and e.bias is bias and e.guards.check(
        *(t for t in (x, target, weight, bias) if t is not None)))][:MAX_ENTRIES - 1]
