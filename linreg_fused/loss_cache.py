"""The repeat-call path of ``loss(x, t, optimizer=opt).backward()`` (functional.linear_mse with a
FusedSGD): the same idea as linreg_fused/step_cache.py for a loss whose backward is the step.

The first call takes the full path (LinearMSEFunction over the registered ops) and, where the
repeat path applies, leaves a ``RepeatLoss`` on the optimizer. A later call with the same
shapes, strides, dtypes, devices, options and optimizer flags (step_cache's checks) runs:

- forward: the gradient pass and the loss in one launch (kernels/sgd_step.py with no target;
  two launches, the pass and the loss sum, where ``one_launch`` says so), into a partial buffer
  of its own (a loss may wait for its backward while others are made);
- backward: reduce_update_ from that buffer and grad_output, the SGD step of weight and bias
  with the hyper-parameters and momentum buffers of that moment, as the full path's backward.

It applies when x and target need no gradient and every parameter that requires grad is in the
optimizer (the full path gives the others a .grad), outside tracing, transforms and capture.
"""

from __future__ import annotations

import torch

from . import backend as _backend
from . import step_cache as sc
from .kernels.specs import ColumnTarget, GradPartials, SGDHyper
from .ops import RegisteredOps
from .ops import loss_scale as _loss_scale
from .optim import FusedSGD, FusedUpdate


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


class RepeatLoss:
    """The planned forward and backward of one loss(optimizer=) shape, and the step's slots."""

    def __init__(self, x, weight, bias, target, optimizer, slots: list, targets: list[ColumnTarget],
                 reduction: str, input_precision: str, options: tuple) -> None:
        from .kernels import linear_mse_grad, reduce_update, sgd_step
        from .kernels.config import device_profile
        from .kernels.launch import FastLaunch
        from .kernels.step import slot_extras

        self.weight, self.bias, self.slots = weight, bias, tuple(slots)
        self.params = [s.param for s in slots]
        self.reduction, self.backend, self.input_precision, self.matmul, self.setting = options
        n, o = x.shape[0], weight.shape[0]
        scale = _loss_scale(reduction, n, o)
        self.rows_outputs_inputs, self.grad_scale = (n, o, weight.shape[1]), 2.0 * scale
        self.loss_like = torch.empty((), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        plan, sums, self.ticket = sgd_step.plan_linear_mse_step(
            x, weight, bias, target, [], scale=0.0, loss_out=self.loss_like, loss_scale=scale,
            input_precision=input_precision)
        self.partials_like = sums.buffer
        batch = ["partials_ptr", "loss_ptr", "x_ptr", "t_ptr", "w_ptr"] + (["b_ptr"] if bias is not None else [])
        if sgd_step.one_launch(*sums.buffer.shape, device_profile(x.device)) and _backend.STEP_LAUNCHES != 2:
            self._forward = FastLaunch(plan, batch)
        else:
            grad, _ = linear_mse_grad.plan_linear_mse_partials(x, weight, bias, target,
                                                               input_precision=input_precision)
            total = reduce_update.plan_sum_column(sums.buffer, sums.loss_column, scale, self.loss_like)
            grad_launch = FastLaunch(grad, ["partials_ptr", "x_ptr", "t_ptr", "w_ptr"] + batch[5:])
            sum_launch = FastLaunch(total, ["partials_ptr", "out_ptr"])

            def two_launches(partials, loss, *values):
                grad_launch(partials, *values)
                sum_launch(partials, loss)

            self._forward = two_launches
        grad_output = self.loss_like  # a 0-d tensor of the loss's dtype: grad_output's slot
        update = reduce_update.plan_reduce_update(sums.buffer, targets, scale=2.0 * scale, grad_output=grad_output)
        names = ["partials_ptr", "grad_output_ptr", "a_out_ptr"] + (["b_out_ptr"] if len(targets) == 2 else [])
        self._update = FastLaunch(update, names + [f"{s}_{n}" for s, t in zip("ab", targets) for n in slot_extras(t)])

    def forward(self, x, target, weight, bias):
        partials, loss = self.partials_like.new_empty(self.partials_like.shape), self.loss_like.new_empty(())
        if bias is None:
            self._forward(partials, loss, x, target, weight)
        else:
            self._forward(partials, loss, x, target, weight, bias)
        return loss, partials

    def step(self, optimizer, partials, grad_loss) -> None:
        """The backward: the step, with the optimizer's settings and buffers now (as the full path's)."""
        extras = _read(self.slots, optimizer)
        if extras is None:  # the groups or buffers changed since the forward: the full path's update
            partials = GradPartials(partials, None, *self.rows_outputs_inputs)
            FusedUpdate(optimizer, self.weight, self.bias).apply_(RegisteredOps(self.backend, partials.buffer.device),
                                                                  partials, grad_loss, self.grad_scale)
            return
        if optimizer._optimizer_step_pre_hooks or sc._pre_hooks:
            optimizer._pre_step_hooks()
        self._update(partials, grad_loss.to(self.loss_like.dtype), *self.params, *extras)
        torch._C._increment_version(self.params)
        optimizer._opt_called = True  # what FusedSGD._mark_stepped records (LR schedulers read it)
        if optimizer._optimizer_step_post_hooks or sc._post_hooks:
            optimizer._post_step_hooks()


def _read(slots, optimizer) -> tuple | None:
    groups, state, extras = optimizer.param_groups, optimizer.state, ()
    for slot in slots:
        if not slot.holds(groups) or sc._flags(slot.group) != slot.flags:
            return None
        extras = sc._extras(slot, slot.group, state, extras)
        if extras is None:
            return None
    return extras


def try_loss(x, weight, bias, target, optimizer, reduction, backend, input_precision, process_group):
    """loss(optimizer=)'s repeat path, or None (the caller takes the full path)."""
    cache = getattr(optimizer, "_linreg_repeat_losses", None)
    if not cache:
        return None
    try:
        if torch.compiler.is_compiling() or sc._dispatch_modes() or type(x) is not torch.Tensor \
                or type(target) is not torch.Tensor or sc._is_wrapped(x) or sc._is_wrapped(target) \
                or x.requires_grad or target.requires_grad or not torch.is_grad_enabled() \
                or (process_group is not False and (process_group is not None or sc._distributed())) \
                or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        entry = cache.get(sc._key(x, target, weight, bias, None))
        if entry is None or weight is not entry.weight or bias is not entry.bias or reduction != entry.reduction \
                or backend != entry.backend or input_precision != entry.input_precision \
                or entry.setting != _backend.STEP_LAUNCHES \
                or (entry.matmul is not None and sc._matmul_precision() != entry.matmul) \
                or weight.requires_grad is not entry.requires[0] \
                or (bias is not None and bias.requires_grad is not entry.requires[1]):
            return None
        groups = optimizer.param_groups
        for slot in entry.slots:  # (the buffers and floats are read by the backward, as the full path reads them)
            if not slot.holds(groups) or sc._flags(slot.group) != slot.flags:
                return None
    except Exception:  # the full path says what is wrong
        return None
    return _RepeatLossFunction.apply(weight, bias, (entry, optimizer, x, target))


def remember_loss(x, weight, bias, target, optimizer, reduction, backend, input_precision, process_group) -> None:
    """After a full-path loss(optimizer=): plan a RepeatLoss for the next call, where it applies."""
    if not isinstance(optimizer, FusedSGD) or type(optimizer).fused_update is not FusedSGD.fused_update \
            or torch.compiler.is_compiling() or sc._dispatch_modes() or x.dim() != 2 or target.dim() != 2 \
            or x.requires_grad or target.requires_grad \
            or (process_group is not False and (process_group is not None or sc._distributed())) \
            or not all(sc._plain(t) for t in (x, weight, bias, target)) \
            or (x.is_cuda and torch.cuda.is_current_stream_capturing()) \
            or _backend.select_ops(backend, x.device).name != "triton" or weight.shape[1] == 0 \
            or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return
    slots, targets = [], []
    out_features, in_features = weight.shape
    for param, col_start in ((weight, 0), (bias, out_features * in_features)):
        if param is None or not param.requires_grad:
            continue
        group = optimizer.group_of(param)
        if group is None or param.is_complex():
            return  # the full path gives it a .grad
        slot = sc._Slot(optimizer, param, group)
        lr = group["lr"]
        if slot.lr_tensor and (lr.device != param.device or lr.numel() != 1):
            return
        if slot.momentum and (slot.buffer is None or not slot.buffer.is_contiguous()
                              or slot.buffer.dtype != param.dtype or slot.buffer.device != param.device):
            return
        hyper = SGDHyper(lr=0.0 if slot.lr_tensor else float(lr), momentum=float(group["momentum"]),
                         dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                         nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)),
                         lr_tensor=lr if slot.lr_tensor else None)
        slots.append(slot)
        targets.append(ColumnTarget(col_start, param.detach(), hyper, slot.buffer))
    if not slots:
        return
    entry = RepeatLoss(x, weight.detach(), None if bias is None else bias.detach(), target, optimizer, slots,
                       targets, reduction, _backend.resolve_precision(input_precision, x.dtype),
                       sc._options(reduction, backend, input_precision, x))
    entry.weight, entry.bias = weight, bias
    entry.requires = (weight.requires_grad, bias is not None and bias.requires_grad)
    cache = optimizer.__dict__.setdefault("_linreg_repeat_losses", {})
    if len(cache) >= sc.MAX_ENTRIES:
        cache.pop(next(iter(cache)))
    cache[sc._key(x, target, weight, bias, None)] = entry
