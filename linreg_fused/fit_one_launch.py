"""fit's one-launch path: FusedSGD and a problem whose batch, W and b fit one
program: every epoch of a chunk in ONE launch of the persistent kernel
(kernels/fused_fit.py), which keeps its own on-chip copy of the last finite
epoch's state and writes each epoch's row of the history."""

from __future__ import annotations

import torch

from .fit_source import TensorSource
from .optim import FusedSGD, group_hyper


class OneLaunchPath:
    """ops: the backend's primitives (backend.select_ops): fit is not traced,
    so the launch skips the registered op's dispatch."""

    reads_orders = True  # the kernel gathers every batch through the epoch's order (storage order for a full batch)

    def __init__(self, model, optimizer: FusedSGD, source: TensorSource, reduction: str, ops) -> None:
        self.model, self.optimizer, self.source, self.reduction, self.ops = model, optimizer, source, reduction, ops
        self.params = [p for p in (model.weight, model.bias) if p is not None]
        self.had_buffer = [optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in self.params]

    @staticmethod
    def applies(model, optimizer, source, ops) -> bool:
        params = [p for p in (model.weight, model.bias) if p is not None]
        return (isinstance(source, TensorSource) and isinstance(optimizer, FusedSGD)
                and not optimizer.has_step_hooks()  # one launch of many steps cannot fire hooks per step
                and all(p.is_contiguous() for p in params)
                and source.x.shape[1] > 0  # no features: the per-batch steps (the bias's, by the reference ops)
                and ops.fit_small_supported(source.batch_size, source.x.shape[1], model.out_features))

    def run(self, orders: torch.Tensor, history: torch.Tensor) -> None:
        state = {}
        for name, p in (("weight", self.model.weight), ("bias", self.model.bias)):
            # hyper None: the kernel leaves a frozen parameter, or one the optimizer does not hold, alone.
            hyper = group_hyper(self.optimizer.group_of(p)) if self.optimizer.trains(p) else None
            buf, is_new = self.optimizer.momentum_buffer(p, hyper) if hyper is not None else (None, False)
            state.update({f"{name}_hyper": hyper, f"{name}_buffer": buf, f"init_{name}_buffer": is_new})
        with torch.no_grad():
            self.ops.fit_small(self.source.x, self.source.t, self.model.weight, self.model.bias, permutations=orders,
                               history=history, batch_size=self.source.batch_size,
                               mean=self.reduction == "mean", **state)
        self.optimizer._mark_stepped()

    def restore(self, bad_epoch: int) -> int:
        # The kernel wrote back the last finite epoch's values; buffers it created before that did not exist.
        if bad_epoch == 0:
            for p, had in zip(self.params, self.had_buffer):
                if not had:
                    self.optimizer.state.get(p, {}).pop("momentum_buffer", None)
        return bad_epoch
