"""What fit's per-batch paths share: epochs one after another, each leaving
its row (mean batch loss, last batch loss, parameters finite) in the
history on the device, and the state of the last finite epoch kept there
(fit_report.LastFinite)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .fit_report import LastFinite, momentum_buffers
from .fit_source import TensorSource


class EpochRunner:
    """Base of the per-batch paths: ``epoch(order)`` runs one epoch and returns its (2,) losses."""

    def __init__(self, model, optimizer, source, reduction: str) -> None:
        self.model, self.optimizer, self.source, self.reduction = model, optimizer, source, reduction
        self.params = [p for p in (model.weight, model.bias) if p is not None]
        # A full batch reads the rows in storage order: the order cannot change the step.
        self.reads_orders = isinstance(source, TensorSource) and not source.full_batch
        self.last_finite = self.make_last_finite()

    def make_last_finite(self) -> LastFinite:
        last_finite = LastFinite(self.params)
        last_finite.start(self.buffers(), fresh=True)
        return last_finite

    def buffers(self) -> list[torch.Tensor | None]:
        return momentum_buffers(self.optimizer, self.params)

    def run(self, orders: torch.Tensor | None, history: torch.Tensor) -> None:
        for e in range(history.shape[0]):
            self.run_epoch(orders[e] if orders is not None else None, history[e])

    def run_epoch(self, order: torch.Tensor | None, row: torch.Tensor) -> None:
        row[:2] = self.epoch(order)
        self.last_finite.epoch_end(row, self.buffers())

    def restore(self, bad_epoch: int) -> int:
        """Back to the state before ``bad_epoch``; returns the epoch that diverged (the same one)."""
        self.last_finite.restore(bad_epoch, self.optimizer)
        return bad_epoch

    def epoch(self, order: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def tensor_batches(self, order: torch.Tensor | None) -> Iterable[tuple[torch.Tensor, torch.Tensor, Any]]:
        """(x, t, rows) per batch: rows index x and t (None: all rows in storage order)."""
        s = self.source
        if order is None:
            return [(s.x, s.t, None)]
        return ((s.x, s.t, order[i : i + s.batch_size]) for i in range(0, s.n_rows, s.batch_size))


def epoch_losses(losses: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(2,) on the device: the epoch's mean batch loss, and its last batch's loss (what the tutorial prints)."""
    if not losses:
        raise ValueError("an epoch had no batches: nothing to train on")
    losses = torch.stack([loss.to(dtype) for loss in losses])
    return torch.stack([losses.mean(), losses[-1]])
