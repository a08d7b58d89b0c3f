"""fit's statistics path: FusedSGD on a full batch, when the cost model says so
or ``statistics=True``: one pass over X and T for their sufficient statistics
(linreg_fused.stats), then every epoch from the (D+1)² statistics alone."""

from __future__ import annotations

import os
from typing import Any

import torch

from . import distributed
from .fit_report import FINITE_COLUMN, parameters_finite
from .optim import FusedSGD, group_hyper
from .reference import Moments


# ---------------------------------------------------------------- fit's full-batch path
# The cost model of choose_path, in seconds on a nominal H100 (data-sheet assumptions, not
# measurements; only their ratios steer the choice). A pass per epoch reads X and T each
# epoch; the statistics path reads them once and takes the Gram's multiply-adds (split TF32:
# three tensor-core dots each), then runs each epoch as O·(D+1)² fp64 multiply-adds in one
# program (or as a few small ops per epoch where one launch does not hold the epochs).
_SECONDS_PER_BYTE = 1 / 3.0e12
_SECONDS_PER_GRAM_MAC = 1 / 2.5e14  # one dense TF32 tensor-core multiply-add
_SECONDS_PER_EPOCH_MAC = 1 / 1.0e11
_SECONDS_PER_EPOCH = 1e-6  # the epoch loop's own overhead
_SECONDS_PER_LAUNCH = 5e-6
_STATS_LAUNCHES = 15  # the pass, its assembly into moments, the epochs
_LOOP_OPS_PER_EPOCH = 25  # the epochs as small device ops, where one launch does not run them


def statistics_cost(n_rows: int, in_features: int, out_features: int, epochs: int, element_size: int,
                    one_launch: bool, epochs_in_one_launch: bool = True) -> tuple[float, float]:
    """(statistics path, pass per epoch): modelled seconds of ``epochs`` full-batch epochs.

    one_launch: the pass-per-epoch path runs every epoch in one launch (small problems);
    epochs_in_one_launch: so does the statistics path (else each epoch is a few small ops)."""
    n, d, o = n_rows, in_features, out_features
    read = n * (d + o) * element_size * _SECONDS_PER_BYTE
    gram = n * 1.5 * (d + 16) ** 2 * _SECONDS_PER_GRAM_MAC  # three split-TF32 dots over half of (D+O)², O ≥ 16
    per_epoch = o * (d + 1) ** 2 * _SECONDS_PER_EPOCH_MAC + (
        _SECONDS_PER_EPOCH if epochs_in_one_launch else _LOOP_OPS_PER_EPOCH * _SECONDS_PER_LAUNCH)
    statistics = max(read, gram) + _STATS_LAUNCHES * _SECONDS_PER_LAUNCH + epochs * per_epoch
    passes = epochs * read + (_SECONDS_PER_LAUNCH if one_launch else 2 * epochs * _SECONDS_PER_LAUNCH)
    return statistics, passes


def statistics_memory_problem(in_features: int, out_features: int, device: torch.device) -> str | None:
    """Why the statistics of this shape do not fit on ``device`` (None if they do)."""
    need = 8 * 6 * (in_features + out_features + 1) ** 2  # fp64 moments, partial sums and their assembly
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    if need <= free // 2:
        return None
    return (f"the statistics of in_features={in_features} need about {need / 2**30:.1f} GiB ((D+1)² float64 "
            f"values and their workspace) and {device} has {free / 2**30:.1f} GiB free")


class StatisticsPath:
    """fit's full-batch path for FusedSGD: one statistics pass over X and T (on the first chunk
    of epochs), then each chunk's epochs in one launch on the statistics (a loop of small
    device ops where D is wide), no host sync. The epoch loss is the loss before the step, as
    a pass per epoch reports it; the kernel keeps the state of the last epoch whose loss was
    finite. Its parameters may not be (that epoch's step overflowed), and only the chunk's last
    epoch has its parameters checked on the device, so a divergence replays the chunk from a
    copy of its start up to the last epoch whose loss and parameters are finite (at most two
    launches, on the error path only). Parameters the optimizer does not train (frozen, or not
    held by it) are left untouched."""

    reads_orders = False  # a full batch: the row order cannot change the step

    def __init__(self, model, optimizer: FusedSGD, x: torch.Tensor, t: torch.Tensor, reduction: str, ops,
                 group: Any = None) -> None:
        self.model, self.optimizer, self.x, self.t, self.reduction, self.ops = model, optimizer, x, t, reduction, ops
        self.group = group  # data parallel: each rank reads its share of the rows; the statistics are merged
        if group is not None:  # as DistributedPath: one check that the ranks agree, and equal replicas
            distributed.check_same_on_every_rank(
                {"the number of rows": x.shape[0], "in_features": x.shape[1], "out_features": t.shape[1]},
                group, x.device)
            distributed.broadcast_parameters_(model, group)
        self.params = [p for p in (model.weight, model.bias) if p is not None]
        self.had_buffer = [optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in self.params]
        self.moments: Moments | None = None
        self.done = 0  # epochs run before the current chunk
        self.chunk: tuple | None = None  # the last launch: its state, a copy of its start, epochs, loss dtype

    @staticmethod
    def applies(optimizer, source) -> bool:
        """Tensor inputs, a full batch and FusedSGD (the step is then a function of the statistics),
        without step hooks (one launch of many steps cannot fire them per step)."""
        return (getattr(source, "full_batch", False) and isinstance(optimizer, FusedSGD)
                and not optimizer.has_step_hooks())

    def run(self, orders: torch.Tensor | None, history: torch.Tensor) -> None:
        if self.moments is None:
            self.moments = self._statistics()
        state = {}
        for name, p in (("weight", self.model.weight), ("bias", self.model.bias)):
            hyper = buf = None
            is_new = False
            if self.optimizer.trains(p):
                hyper = group_hyper(self.optimizer.group_of(p))
                buf, is_new = self.optimizer.momentum_buffer(p, hyper)
            state.update({f"{name}_hyper": hyper, f"{name}_buffer": buf, f"init_{name}_buffer": is_new})
        live = self._live(state)
        self.done += 0 if self.chunk is None else self.chunk[2]
        self.chunk = (state, [v.detach().clone() for v in live], history.shape[0], history.dtype)
        losses = self._epochs(state, history.shape[0], history.dtype)
        history[:, :2].copy_(losses[:, None].expand(-1, 2))  # one batch per epoch: mean and last are the same
        history[:-1, FINITE_COLUMN] = 1.0  # not checked within a launch: restore() replays to find out
        history[-1, FINITE_COLUMN] = parameters_finite(self.params)
        self.optimizer._mark_stepped()

    def _live(self, state: dict) -> list[torch.Tensor]:
        """The tensors a launch writes: the parameters and the momentum buffers it uses."""
        return [*self.params, *(b for b in (state["weight_buffer"], state["bias_buffer"]) if b is not None)]

    def _epochs(self, state: dict, n_epochs: int, dtype: torch.dtype) -> torch.Tensor:
        losses = torch.empty(n_epochs, device=self.model.weight.device, dtype=dtype)
        args = dict(state)
        with torch.no_grad():
            self.ops.stats_sgd_epochs(self.moments[0], self.moments[1:], self.model.weight, self.model.bias,
                                      args.pop("weight_buffer"), args.pop("bias_buffer"), losses,
                                      mean=self.reduction == "mean", **args)
        return losses

    def _statistics(self):
        fp64 = self.x.dtype == torch.float64
        if self.group is None:
            return self.ops.linear_moments(self.x, self.t, fp64=fp64)
        import torch.distributed as dist

        share = distributed.rank_slice(self.x.shape[0], dist.get_rank(self.group), dist.get_world_size(self.group))
        x, t = self.x[share], self.t[share]
        local = (self.ops.linear_moments(x, t, fp64=fp64) if x.shape[0] else
                 (0, *(torch.zeros(shape, dtype=torch.float64, device=x.device) for shape in
                       ((x.shape[1],), (t.shape[1],), (x.shape[1], x.shape[1]), (t.shape[1], x.shape[1]),
                        (t.shape[1], t.shape[1])))))
        return distributed.merge_moments_over_ranks(local, self.group)

    @torch.no_grad()
    def restore(self, bad_epoch: int) -> int:
        """Back to the end of the last epoch before ``bad_epoch`` whose parameters are finite; returns
        the epoch that diverged (``bad_epoch``, or the one before it when that one's step overflowed)."""
        state, start, _, dtype = self.chunk
        ran = bad_epoch - self.done  # epochs of this chunk before the bad one: their losses were finite
        while True:
            for v, s in zip(self._live(state), start):
                v.copy_(s)
            if ran > 0:
                self._epochs(state, ran, dtype)
            if ran == 0 or bool(parameters_finite(self.params)):  # error path: syncs are fine here
                break
            ran -= 1
        bad_epoch = self.done + ran
        # Buffers created after the fit began did not exist before it.
        if bad_epoch == 0:
            for p, had in zip(self.params, self.had_buffer):
                if not had:
                    self.optimizer.state.get(p, {}).pop("momentum_buffer", None)
        return bad_epoch
