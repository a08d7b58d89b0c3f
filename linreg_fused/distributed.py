"""Data-parallel training on torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

Every rank holds a replica of the model and of the optimizer state and
trains on its own rows. The fused paths (``loss(..., optimizer=FusedSGD)``,
``train_step``, ``fit``) sum each step's reduced gradient across ranks with
ONE all-reduce, between the gradient kernel and the update kernel, of a row
of O·D + O + 2 values:

    [ Σ Rᵀ·X (O·D) | Σ R (O) | Σ R² (the loss) | number of rows ]

so a step is the step on the concatenation of the ranks' batches (the mean
is over all their rows, whatever each rank holds), and every rank applies
the identical update. The autograd path (``loss(x, t).backward()``, any torch
optimizer) is DistributedDataParallel's: wrap the model in DDP.

``process_group`` arguments: None, the default, means the default (world)
group when torch.distributed is initialised with more than one rank, and
local training otherwise; False means local training even then; a
ProcessGroup means that group. Every rank of the group must take the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .kernels.specs import GradPartials


def resolve_group(process_group: Any = None) -> Any:
    """The ProcessGroup to all-reduce over, or None to train locally (see the module docstring)."""
    if process_group is False:
        return None
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group= was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    elif not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, None or False, got "
                        f"{type(process_group).__name__}")
    return process_group if dist.get_world_size(process_group) > 1 else None


@dataclass(frozen=True)
class GlobalBatch:
    """A step's partial sums summed over the rows of every rank: ``partials``
    has one row [Σ Rᵀ·X | Σ R | Σ R² | number of rows], the same on every rank."""

    partials: GradPartials

    @property
    def rows(self) -> torch.Tensor:
        """The number of rows of the global batch (0-d, on the device)."""
        return self.partials.buffer[0, -1]

    def grad_scales(self, reduction: str) -> tuple[float, torch.Tensor | None]:
        """(host factor, device factor or None) whose product turns the summed
        columns into the gradient of the global loss: 2/(N·O) for "mean" (N is
        read on the device: no sync), 2 for "sum"."""
        if reduction == "mean":
            return 2.0 / self.partials.out_features, self.rows.reciprocal()
        return 2.0, None

    def loss(self, reduction: str, dtype: torch.dtype) -> torch.Tensor:
        """The loss of the global batch (0-d, on the device)."""
        total = self.partials.buffer[0, self.partials.loss_column]
        if reduction == "mean":
            total = total / (self.rows * self.partials.out_features)
        return total.to(dtype)


def all_reduce_partials(partials: GradPartials, group: Any) -> GlobalBatch:
    """Sum a batch's partial sums over the programs of the gradient kernel,
    then over the ranks of ``group`` in one all-reduce. A rank with no rows
    in this step contributes zeros (pass partials.n_rows == 0)."""
    buffer = partials.buffer
    if partials.n_rows == 0:
        summed = buffer.new_zeros((1, buffer.shape[1]))
    else:
        summed = buffer.sum(0, keepdim=True)
    # Rows are counted in the accumulator dtype: exact up to 2**24 rows per step in float32.
    row = F.pad(summed, (0, 1), value=float(partials.n_rows))
    dist.all_reduce(row, op=dist.ReduceOp.SUM, group=group)
    return GlobalBatch(GradPartials(row, None, partials.n_rows, partials.out_features, partials.in_features))


def all_reduce_sum_(tensors: Sequence[torch.Tensor], process_group: Any = None) -> bool:
    """Sum ``tensors`` (one dtype, one device) over the ranks in place, with
    ONE all-reduce of their concatenation. Returns False, touching nothing,
    when there is no group to reduce over (see resolve_group)."""
    group = resolve_group(process_group)
    if group is None:
        return False
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        raise ValueError("all_reduce_sum_ takes tensors of one dtype on one device")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for t, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(summed.view_as(t))
    return True


def merge_moments_over_ranks(moments: tuple, process_group: Any = None) -> tuple:
    """The statistics (count, means, centred co-moments; reference.Moments) of the rows of
    every rank, on every rank, with ONE collective: an all-gather of each rank's flat
    statistics, then Chan's pairwise merge in rank order (the same order, so the same bits,
    everywhere; centred moments cannot simply be summed). Reads the counts back: one sync.
    Returns ``moments`` unchanged when there is no group (see resolve_group)."""
    from .reference import merge_moments

    group = resolve_group(process_group)
    if group is None:
        return moments
    n, *tensors = moments
    flat = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=tensors[0].device),
                      *(v.reshape(-1) for v in tensors)])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    merged = None
    for row in gathered:
        values = list(row[1:].split([v.numel() for v in tensors]))
        rank_moments = (int(row[0].item()), *(v.view_as(t) for v, t in zip(values, tensors)))
        merged = rank_moments if merged is None else merge_moments(merged, rank_moments)
    return merged


def check_same_on_every_rank(values: dict[str, int], group: Any, device: torch.device) -> None:
    """Raise on every rank, naming the first difference, unless each value is
    the same on all ranks of ``group`` (one all-reduce: a sync)."""
    local = torch.tensor([v for value in values.values() for v in (value, -value)], dtype=torch.int64,
                         device=device)
    extremes = local.clone()
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    for i, name in enumerate(values):
        high, low = int(extremes[2 * i]), -int(extremes[2 * i + 1])
        if high != low:
            raise ValueError(f"{name} differs across the ranks (from {low} to {high}); every rank must pass "
                             f"the same data")


def broadcast_(tensor: torch.Tensor, group: Any) -> None:
    """Overwrite ``tensor`` on every rank with the group's first rank's."""
    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


@torch.no_grad()
def broadcast_parameters_(module: torch.nn.Module, process_group: Any = None) -> None:
    """Give every rank the first rank's parameters (as DistributedDataParallel
    does when it wraps a module): the fused steps keep replicas identical
    only if they start identical. No-op without a group (see resolve_group)."""
    group = resolve_group(process_group)
    if group is None:
        return
    for p in module.parameters():
        broadcast_(p.data, group)


def rank_rows(order: torch.Tensor, step_rows: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's row indices of each step of an epoch with row order ``order`` (N,).

    Step k trains on order[k·step_rows : (k+1)·step_rows]; rank r takes every
    world-th row of it from the r-th, as DistributedSampler splits an epoch
    (so the union over ranks is the step's rows). A rank may get no row of
    the last, partial step (an empty index)."""
    n_rows = order.shape[0]
    full = n_rows // step_rows
    per_rank = step_rows // world
    steps = list(order[: full * step_rows].view(full, per_rank, world)[:, :, rank].contiguous().unbind(0))
    if full * step_rows < n_rows:
        steps.append(order[full * step_rows:][rank::world].contiguous())
    return steps


def rank_slice(n_rows: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of n_rows rows (the shares differ by at most one row)."""
    share, extra = divmod(n_rows, world)
    start = rank * share + min(rank, extra)
    return slice(start, start + share + (rank < extra))
