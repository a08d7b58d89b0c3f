"""The launches of one fused step, planned once and relaunched: the repeat-call path.

``StepLaunches`` plans a step (the partial sums of a batch, the SGD update
of weight and/or bias from them, and the loss) for fixed shapes, strides,
dtypes, devices and update flags, keeps its partial buffer (and ticket
counter), and relaunches it with each call's tensors and hyper-parameters
through kernels/launch.py's FastLaunch: one launch (kernels/sgd_step.py)
where ``sgd_step.one_launch`` allows it, else the gradient pass and
reduce_update_, the kernels of the ops' path. Nothing is planned per call
(``plans_made`` counts the plans, for the tests).

A reused partial buffer is safe on one stream, each launch being ordered
after the last; callers do not use it while a CUDA graph is being captured.
"""

from __future__ import annotations

import torch

from . import sgd_step
from .config import device_profile
from .launch import Composed, FastLaunch
from .formulations import plan_grad_partials
from .reduce_update import plan_reduce_update
from .specs import ColumnTarget

plans_made = 0  # StepLaunches built in this process

def slot_extras(target: ColumnTarget) -> tuple[str, ...]:
    """What a caller passes per call for one target, in order: its momentum buffer (with momentum),
    its learning rate (the tensor, or the float), then with momentum the floats momentum, buf_decay,
    grad_weight of reduce_update_'s update, then with weight decay the weight_decay. A setting whose
    branch the kernel does not compile (a flag off) is fixed in the plan instead."""
    h = target.hyper
    momentum, decay = h.momentum != 0, h.weight_decay != 0
    return (("buf_ptr",) if momentum else ()) + (("lr_ptr",) if h.lr_tensor is not None else ("lr",)) + \
        (("momentum", "buf_decay", "grad_weight") if momentum else ()) + (("weight_decay",) if decay else ())


class StepLaunches:
    """One planned step. ``step(x, weight, bias, target, row_index, extras)``: the batch, the
    current parameters (bias None without one; row_index None without one) and the targets'
    ``slot_extras`` values, concatenated in the order of ``targets``. Returns the loss (0-d)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                 targets: list[ColumnTarget], *, row_index: torch.Tensor | None, scale: float, loss_scale: float,
                 loss_dtype: torch.dtype, input_precision: str, launches: str | int = "auto") -> None:
        if not 1 <= len(targets) <= 2 or any(t.hyper is None for t in targets):
            raise ValueError("a step updates one or two parameters (targets with SGD settings)")
        global plans_made
        plans_made += 1
        self.has_bias, self.has_index = bias is not None, row_index is not None
        self.loss_like = torch.empty((), device=x.device, dtype=loss_dtype)
        plan, sums, self.ticket = sgd_step.plan_linear_mse_step(
            x, weight, bias, target, targets, scale=scale, loss_out=self.loss_like, loss_scale=loss_scale,
            row_index=row_index, input_precision=input_precision)
        self.partials = sums.buffer
        n_programs, n_columns = self.partials.shape
        self.one_launch = (sgd_step.one_launch(n_programs, n_columns, device_profile(x.device))
                           if launches == "auto" else int(launches) == 1)
        # Which parameter each target slot updates: a is the first target, b the second.
        outputs = {"a_out_ptr": "w_ptr" if targets[0].col_start == 0 else "b_ptr"}
        if len(targets) == 2:
            outputs["b_out_ptr"] = "b_ptr"
        extras = [f"{slot}_{name}" for slot, t in zip("ab", targets) for name in slot_extras(t)]
        batch = ["x_ptr", "t_ptr", "w_ptr"] + (["b_ptr"] if bias is not None else []) + \
            (["row_index_ptr"] if row_index is not None else [])
        # The caller guarantees the planned dtypes (and layouts) of the batch and the extras; the loss is ours.
        trusted = ["loss_ptr", *batch, *extras]
        if self.one_launch:
            self.launch = FastLaunch(plan, ["loss_ptr", *batch, *extras], alias=outputs, trusted=trusted)
            self.run = self._run_function(self.launch)
            return
        # The gradient pass in the formulation config.choose_formulation decides (its own partial rows).
        grad, grad_sums = plan_grad_partials(x, weight, bias, target, row_index=row_index,
                                             input_precision=input_precision)
        self.partials = grad_sums.buffer
        grad.args.update(partials_ptr=self.partials, residual_ptr=self.partials,
                         row_index_ptr=row_index if row_index is not None else self.partials)
        reduce = plan_reduce_update(self.partials, targets, scale=scale, loss_out=self.loss_like,
                                    loss_column=sums.loss_column, loss_scale=loss_scale)
        grad_launch = FastLaunch(grad, batch, trusted=batch)
        # The reduce kernel sees the parameters only as its targets' outputs.
        slot_of = {param: slot for slot, param in outputs.items()}
        keep = [i for i, n in enumerate(batch) if n in slot_of]
        names = ["loss_ptr", *(slot_of[batch[i]] for i in keep), *extras]
        update = FastLaunch(reduce, names, trusted=names)
        # (loss, *batch, *extras) -> both launches, as straight-line code (slicing the values costs more)
        values = [f"v{i}" for i in range(len(batch))]
        more = [f"e{i}" for i in range(len(extras))]
        namespace = {"GRAD": grad_launch, "UPDATE": update}
        exec(f"def two_launches(loss, {', '.join(values + more)}):\n"
             f"    GRAD.launch({', '.join(values)})\n"
             f"    UPDATE.launch(loss, {', '.join([values[i] for i in keep] + more)})", namespace)
        self.launch = Composed(namespace["two_launches"])
        self.run = self._run_function(self.launch)

    def _run_function(self, launcher):
        """(x, weight, bias, target, row_index, extras) -> loss, for this plan's inputs; ``launcher.launch``
        is the launch function of the moment (FastLaunch swaps in a faster one once it has compiled)."""
        new_loss, loss_like = torch.empty_like, self.loss_like  # (empty_like: the cheapest new 0-d tensor)
        if self.has_bias and self.has_index:
            def run(x, weight, bias, target, row_index, extras):
                loss = new_loss(loss_like)
                launcher.launch(loss, x, target, weight, bias, row_index, *extras)
                return loss
        elif self.has_bias:
            def run(x, weight, bias, target, row_index, extras):
                loss = new_loss(loss_like)
                launcher.launch(loss, x, target, weight, bias, *extras)
                return loss
        elif self.has_index:
            def run(x, weight, bias, target, row_index, extras):
                loss = new_loss(loss_like)
                launcher.launch(loss, x, target, weight, row_index, *extras)
                return loss
        else:
            def run(x, weight, bias, target, row_index, extras):
                loss = new_loss(loss_like)
                launcher.launch(loss, x, target, weight, *extras)
                return loss
        return run

    def __call__(self, x, weight, bias, target, row_index, extras: tuple) -> torch.Tensor:
        """The step's loss (0-d); see the class docstring."""
        return self.run(x, weight, bias, target, row_index, extras)
