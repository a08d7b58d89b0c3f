"""fit's eager path: ``loss.backward(); optimizer.step()`` per batch, for any
torch optimizer and for iterables of batches (FusedSGD steps run fused: no
.grad)."""

from __future__ import annotations

from typing import Any

import torch

from .fit_epochs import EpochRunner, epoch_losses
from .fit_source import BatchSource, as_model_tensor
from .functional import check_inputs
from .kernels.specs import accumulator_dtype


class EagerPath(EpochRunner):
    """``model.train_step`` per batch. With a process group (FusedSGD only),
    each rank iterates its own batches (e.g. a DataLoader over a
    DistributedSampler: the same number on every rank) and each step is the
    step on all ranks' batches."""

    def __init__(self, model, optimizer, source, reduction: str, group: Any = None) -> None:
        super().__init__(model, optimizer, source, reduction)
        self.process_group = group if group is not None else False
        self.epochs_run = 0

    def epoch(self, order: torch.Tensor | None) -> torch.Tensor:
        m, device = self.model, self.model.weight.device
        if isinstance(self.source, BatchSource):
            batches = (self._checked_batch(b, device) for b in self.source.batches)
        else:
            batches = ((x.index_select(0, rows), t.index_select(0, rows)) if rows is not None else (x, t)
                       for x, t, rows in self.tensor_batches(order))
        losses = [m.train_step(xb, yb, self.optimizer, self.reduction, process_group=self.process_group)
                  for xb, yb in batches]
        self.epochs_run += 1
        if not losses and self.epochs_run > 1:
            raise ValueError(f"epoch {self.epochs_run} had no batches: the iterable gave none when iterated again "
                             f"(it must give its batches on every iter(), as a DataLoader or a list does); the "
                             f"parameters are those at the end of epoch {self.epochs_run - 1}")
        return epoch_losses(losses, accumulator_dtype(m.weight.dtype))

    def _checked_batch(self, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"fit(batches): each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
        # NumPy batches take the model's dtype, as NumPy inputs to fit do (the warning is given once per place).
        xb, yb = (as_model_tensor(b, self.model.weight.dtype, device, _warn_batch_precision) for b in batch)
        check_inputs(xb, self.model.weight, self.model.bias, yb)
        return xb, yb


def _warn_batch_precision() -> None:
    import warnings

    warnings.warn("fit: converting NumPy batches to the model's dtype changed some values (precision lost); "
                  "yield arrays of the model's dtype, or make the model in a wider dtype", UserWarning, stacklevel=2)
