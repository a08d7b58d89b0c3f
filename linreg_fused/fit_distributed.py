"""fit's data-parallel path: FusedSGD and tensors under torch.distributed (a
process group of several ranks), one fused step per global batch and one
all-reduce per step (linreg_fused.distributed)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import distributed
from .fit_epochs import EpochRunner, epoch_losses
from .fit_source import TensorSource
from .functional import fused_sgd_step
from .kernels.specs import accumulator_dtype
from .optim import FusedSGD


class DistributedPath(EpochRunner):
    """Every rank holds the same data and the same row orders (drawn from the
    same seed or generator state; drawn from the global RNG, the first
    rank's are broadcast). A step's global batch is world·batch_size
    consecutive rows of the epoch's order, split across the ranks as
    DistributedSampler splits an epoch, so each rank reads only its rows;
    with one step per epoch each rank reads a contiguous share of the rows in
    storage order. The first rank's parameters are broadcast at the start.
    Epoch losses are means over global batches, the same on every rank; no
    one-launch kernel and no CUDA graph here."""

    def __init__(self, model, optimizer: FusedSGD, source: TensorSource, reduction: str, group: Any,
                 epochs: int) -> None:
        super().__init__(model, optimizer, source, reduction)
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)
        self.step_rows = source.batch_size * self.world
        self.reads_orders = source.n_rows > self.step_rows
        # One sync up front: ranks that disagree on the data would hang or train on garbage.
        distributed.check_same_on_every_rank(
            {"the number of rows": source.n_rows, "in_features": source.x.shape[1],
             "out_features": source.t.shape[1], "batch_size": source.batch_size, "epochs": epochs},
            group, source.x.device)
        distributed.broadcast_parameters_(model, group)  # replicas start equal, as DDP makes them
        self.last_finite.start(self.buffers())  # after the broadcast: that is the state before fit

    def run(self, orders: torch.Tensor | None, history: torch.Tensor) -> None:
        if orders is not None and self.source.shuffle and self.source.global_rng:
            distributed.broadcast_(orders, self.group)
        super().run(orders, history)

    def epoch(self, order: torch.Tensor | None) -> torch.Tensor:
        m, s = self.model, self.source
        if order is None:
            share = distributed.rank_slice(s.n_rows, self.rank, self.world)
            steps = [(s.x[share], s.t[share], None)]
        else:
            steps = [(s.x, s.t, rows) for rows in distributed.rank_rows(order, self.step_rows, self.rank, self.world)]
        losses = [fused_sgd_step(x, m.weight, m.bias, t, self.optimizer, reduction=self.reduction, row_index=rows,
                                 backend=m.backend, input_precision=m.input_precision, validate=False,
                                 process_group=self.group)
                  for x, t, rows in steps]
        return epoch_losses(losses, accumulator_dtype(m.weight.dtype))
