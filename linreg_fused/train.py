"""fit: the tutorial's training loop, on the device, without a host sync per step.

``fit`` checks its arguments, turns the data into a source (tensors on the
model's device, or an iterable of batches), lets ``choose_path`` pick one way
through, and runs it chunk by chunk between report points. Each path is a
small unit of its own:

- ``OneLaunchPath``: FusedSGD and a problem whose batch, W and b fit one
  program: every epoch of a chunk in ONE launch of the persistent kernel
  (kernels/fused_fit.py).
- ``PerBatchPath``: FusedSGD otherwise: one fused step per batch (two
  launches), the batch's rows gathered inside the kernel through the epoch's
  row order, so X is never copied; on CUDA, later epochs replay a CUDA graph
  of the first.
- ``EagerPath``: any other torch optimizer, or an iterable of batches:
  ``loss.backward(); optimizer.step()`` per batch (FusedSGD steps fused).
- ``StatisticsPath`` (linreg_fused/fit_statistics.py): FusedSGD on a full batch, when
  the cost model says so or ``statistics=True``: one pass over X and T for
  their sufficient statistics, then every epoch from the (D+1)² statistics
  alone (``statistics_cost``).
- ``DistributedPath``: FusedSGD and tensors under torch.distributed (a
  process group of several ranks): each step's rows are split across the
  ranks, and one all-reduce per step makes it the step on all of them
  (linreg_fused.distributed).

Row orders are DataLoader's: with ``seed=``/``generator=`` (a CPU generator)
or the global RNG, the batches are exactly those of
``DataLoader(TensorDataset(inputs, targets), batch_size, shuffle=True,
generator=...)``, so switching from the tutorial's loop changes no number.

The host reads the device only at report points (``log_every``, the
progress bar, the end): there it prints, and checks that every epoch's loss
was finite. A divergence raises TrainingDivergedError with the parameters
(and SGD momentum buffers) restored to the end of the last finite epoch.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from . import distributed
from .backend import select_ops
from .functional import REDUCTIONS, check_inputs, fused_sgd_step
from .kernels.specs import accumulator_dtype
from .ops import RegisteredOps
from .optim import FusedSGD, group_hyper
from .fit_statistics import StatisticsPath, statistics_cost, statistics_memory_problem


class TrainingDivergedError(FloatingPointError):
    """A non-finite loss appeared during fit.

    epoch: the 1-based epoch whose mean loss was non-finite;
    history: the per-epoch losses up to and including that epoch.
    """

    def __init__(self, message: str, epoch: int, history: list[float]) -> None:
        super().__init__(message)
        self.epoch, self.history = epoch, history


# ---------------------------------------------------------------- the data
@dataclass
class TensorSource:
    """Tensors on the model's device, shuffled and batched by fit."""

    x: torch.Tensor  # (N, D)
    t: torch.Tensor  # (N, O)
    batch_size: int
    shuffle: bool
    generator: torch.Generator | None

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    @property
    def full_batch(self) -> bool:
        """One step per epoch over every row: the row order cannot change the step, so none is drawn."""
        return self.batch_size >= self.n_rows

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)


@dataclass
class BatchSource:
    """An iterable of (xb, yb) batches that batches itself (e.g. a DataLoader)."""

    batches: Iterable

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches) if hasattr(self.batches, "__len__") else 1


def dataloader_orders(n_rows: int, n_epochs: int, shuffle: bool, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """(n_epochs, n_rows) int64 on ``device``: the row order of each epoch, as
    ``DataLoader(dataset, shuffle=shuffle, generator=generator)`` draws it.

    Per epoch, DataLoader's iterator first draws an int64 base seed from the
    generator (the global RNG when None), then RandomSampler draws
    ``randperm(n_rows)`` from the generator (when None, from a fresh generator
    seeded by another draw of the global RNG), and once exhausted one more
    ``randperm(n_rows)`` of which it keeps no element. The same calls here
    leave the generator exactly where DataLoader leaves it. A CUDA generator
    draws on the device instead (faster for large N; not DataLoader's order).
    """
    if generator is not None and generator.device.type != "cpu":
        return torch.stack([torch.randperm(n_rows, generator=generator, device=device) for _ in range(n_epochs)])
    orders = torch.empty((n_epochs, n_rows), dtype=torch.int64)
    for epoch in range(n_epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed
        if not shuffle:
            orders[epoch] = torch.arange(n_rows)
            continue
        sampler_generator = generator
        if sampler_generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            sampler_generator = torch.Generator().manual_seed(seed)
        orders[epoch] = torch.randperm(n_rows, generator=sampler_generator)
        if generator is not None:  # the sampler's trailing draw for a partial pass (here of 0 rows)
            torch.randperm(n_rows, generator=generator)
    if device.type == "cuda":  # pinned, so the copy queues behind the running epochs instead of waiting for them
        return orders.pin_memory().to(device, non_blocking=True)
    return orders.to(device)


# ---------------------------------------------------------------- divergence
class _LastFinite:
    """On-device copy of the parameters and SGD momentum buffers as they were
    at the end of the last epoch whose loss was finite (updated with
    torch.where, so keeping it costs no sync)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params, self.optimizer = params, optimizer
        self.all_finite = torch.ones((), dtype=torch.bool, device=params[0].device)
        self.before_fit = [None if self._buffer(p) is None else self._buffer(p).clone() for p in params]
        self.saved = [p.detach().clone() for p in params]
        self.saved_buffers = list(self.before_fit)

    def _buffer(self, p: torch.Tensor) -> torch.Tensor | None:
        return self.optimizer.state.get(p, {}).get("momentum_buffer")

    def epoch_end(self, epoch_loss: torch.Tensor) -> None:
        self.all_finite &= torch.isfinite(epoch_loss)
        for saved, p in zip(self.saved, self.params):
            saved.copy_(torch.where(self.all_finite, p.detach(), saved))
        for i, p in enumerate(self.params):
            buf = self._buffer(p)
            if buf is None:
                continue
            if self.saved_buffers[i] is None:  # created in this fit's first step; valid if that epoch was finite
                self.saved_buffers[i] = buf.clone()
            else:
                self.saved_buffers[i].copy_(torch.where(self.all_finite, buf, self.saved_buffers[i]))

    @torch.no_grad()
    def restore(self, bad_epoch: int) -> None:
        """Back to the end of the last finite epoch (or to before fit when ``bad_epoch`` is the first)."""
        for i, p in enumerate(self.params):
            p.copy_(self.saved[i])
            buf = self.before_fit[i] if bad_epoch == 0 else self.saved_buffers[i]
            if buf is None:
                self.optimizer.state.get(p, {}).pop("momentum_buffer", None)
            elif self._buffer(p) is not None:
                self._buffer(p).copy_(buf)


# ---------------------------------------------------------------- the paths
class OneLaunchPath:
    """Every epoch of a chunk in one launch of the persistent kernel, which
    keeps its own on-chip copy of the last finite epoch's state."""

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
                and ops.fit_small_supported(source.batch_size, source.x.shape[1], model.out_features))

    reads_orders = True  # the kernel gathers every batch through the epoch's order (storage order for a full batch)

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

    def restore(self, bad_epoch: int) -> None:
        # The kernel wrote back the last finite epoch's values; buffers it created before that did not exist.
        if bad_epoch == 0:
            for p, had in zip(self.params, self.had_buffer):
                if not had:
                    self.optimizer.state.get(p, {}).pop("momentum_buffer", None)


class _GraphedEpoch:
    """An epoch of fused steps captured in a CUDA graph. The batches are views
    of a static row-order buffer; each replay first copies the epoch's
    order into it. Capturing runs nothing, so the parameters do not move."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], n_rows: int, device: torch.device) -> None:
        self.rows = torch.empty(n_rows, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = run(self.rows)

    def __call__(self, order: torch.Tensor) -> torch.Tensor:
        self.rows.copy_(order)
        self.graph.replay()
        return self.loss


graphed_epoch = _GraphedEpoch  # the factory PerBatchPath uses; tests swap in a stand-in on machines without CUDA


def _graph_capture_possible(ops, optimizer, source, device) -> bool:
    # A replay runs no Python: no step hooks can fire in it.
    return (isinstance(source, TensorSource) and device.type == "cuda" and ops.name == "triton"
            and isinstance(optimizer, FusedSGD) and not optimizer.has_step_hooks())


class _EpochRunner:
    """Shared by the per-batch paths: run epochs, keep the last finite state."""

    def __init__(self, model, optimizer, source, reduction: str) -> None:
        self.model, self.optimizer, self.source, self.reduction = model, optimizer, source, reduction
        self.last_finite = _LastFinite([p for p in (model.weight, model.bias) if p is not None], optimizer)
        # A full batch reads the rows in storage order: the order cannot change the step.
        self.reads_orders = isinstance(source, TensorSource) and not source.full_batch

    def run(self, orders: torch.Tensor | None, history: torch.Tensor) -> None:
        for e in range(history.shape[0]):
            history[e] = self.epoch(orders[e] if orders is not None else None)
            self.last_finite.epoch_end(history[e, 0])

    def restore(self, bad_epoch: int) -> None:
        self.last_finite.restore(bad_epoch)

    def epoch(self, order: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _tensor_batches(self, order: torch.Tensor | None) -> Iterable[tuple[torch.Tensor, torch.Tensor, Any]]:
        """(x, t, rows) per batch: rows index x and t (None: all rows in storage order)."""
        s = self.source
        if order is None:
            return [(s.x, s.t, None)]
        return ((s.x, s.t, order[i : i + s.batch_size]) for i in range(0, s.n_rows, s.batch_size))


def _epoch_losses(losses: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(2,) on the device: the epoch's mean batch loss, and its last batch's loss (what the tutorial prints)."""
    if not losses:
        raise ValueError("an epoch had no batches: nothing to train on")
    losses = torch.stack([loss.to(dtype) for loss in losses])
    return torch.stack([losses.mean(), losses[-1]])


class PerBatchPath(_EpochRunner):
    """One fused step (two launches) per batch; rows gathered in the kernel.
    With ``use_graph``, the first epoch runs eagerly (it compiles the kernels
    and creates the momentum buffers) and later ones replay a CUDA graph of
    it; if capture fails, it warns and stays eager."""

    def __init__(self, model, optimizer: FusedSGD, source: TensorSource, reduction: str, use_graph: bool) -> None:
        super().__init__(model, optimizer, source, reduction)
        self.use_graph = use_graph
        self.graphed: _GraphedEpoch | None = None

    def _steps(self, order: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        losses = [fused_sgd_step(x, m.weight, m.bias, t, self.optimizer, reduction=self.reduction, row_index=rows,
                                 backend=m.backend, input_precision=m.input_precision, validate=False,
                                 process_group=False)
                  for x, t, rows in self._tensor_batches(order)]
        return _epoch_losses(losses, accumulator_dtype(m.weight.dtype))

    def epoch(self, order: torch.Tensor | None) -> torch.Tensor:
        if self.graphed is not None:
            return self.graphed(order)
        loss = self._steps(order)
        if self.use_graph and order is not None:
            self.use_graph = False
            try:
                self.graphed = graphed_epoch(self._steps, self.source.n_rows, self.model.weight.device)
            except RuntimeError as err:
                warnings.warn(f"fit: capturing an epoch in a CUDA graph failed ({err}); continuing without it",
                              RuntimeWarning, stacklevel=4)
        return loss


class EagerPath(_EpochRunner):
    """``loss.backward(); optimizer.step()`` per batch, for any torch optimizer
    and for iterables of batches (FusedSGD steps run fused: no .grad). With a
    process group (FusedSGD only), each rank iterates its own batches (e.g. a
    DataLoader over a DistributedSampler: the same number on every rank) and
    each step is the step on all ranks' batches."""

    def __init__(self, model, optimizer, source, reduction: str, group: Any = None) -> None:
        super().__init__(model, optimizer, source, reduction)
        self.process_group = group if group is not None else False

    def epoch(self, order: torch.Tensor | None) -> torch.Tensor:
        m, device = self.model, self.model.weight.device
        if isinstance(self.source, BatchSource):
            batches = (self._checked_batch(b, device) for b in self.source.batches)
        else:
            batches = ((x.index_select(0, rows), t.index_select(0, rows)) if rows is not None else (x, t)
                       for x, t, rows in self._tensor_batches(order))
        losses = [m.train_step(xb, yb, self.optimizer, self.reduction, process_group=self.process_group)
                  for xb, yb in batches]
        return _epoch_losses(losses, accumulator_dtype(m.weight.dtype))

    def _checked_batch(self, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"fit(batches): each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
        xb, yb = (torch.as_tensor(b).to(device, non_blocking=True) for b in batch)
        check_inputs(xb, self.model.weight, self.model.bias, yb)
        return xb, yb


class DistributedPath(_EpochRunner):
    """Data parallel over a process group, one fused step per global batch and
    one all-reduce per step. Every rank holds the same data and the same row
    orders (drawn from the same seed or generator state; drawn from the
    global RNG, the first rank's are broadcast). A step's global batch is
    world·batch_size consecutive rows of the epoch's order, split across the
    ranks as DistributedSampler splits an epoch, so each rank reads only its
    rows; with one step per epoch each rank reads a contiguous share of the
    rows in storage order. The first rank's parameters are broadcast at the
    start. Epoch losses are means over global batches, the same on every
    rank; no one-launch kernel and no CUDA graph here."""

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

    def run(self, orders: torch.Tensor | None, history: torch.Tensor) -> None:
        if orders is not None and self.source.shuffle and self.source.generator is None:
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
        return _epoch_losses(losses, accumulator_dtype(m.weight.dtype))


def choose_path(model, optimizer, source, reduction: str, epochs: int, cuda_graph: bool,
                statistics: bool | None = None, group: Any = None):
    """The one place that decides how fit runs (see the module docstring).
    group: the resolved process group (distributed.resolve_group), or None."""
    device = model.weight.device
    ops = RegisteredOps(model.backend, device)
    if group is not None:
        if not isinstance(optimizer, FusedSGD):
            raise ValueError(f"fit under torch.distributed runs FusedSGD's fused steps; with "
                             f"{type(optimizer).__name__}, wrap the model in DistributedDataParallel and write the "
                             f"loop, or pass process_group=False to train each rank on its own")
        if statistics is not False and _statistics_chosen(model, optimizer, source, epochs, False, statistics):
            # Each rank reads its share of the rows once; one all-gather merges the statistics.
            return StatisticsPath(model, optimizer, source.x, source.t, reduction, select_ops(model.backend, device),
                                  group)
        if isinstance(source, TensorSource):
            return DistributedPath(model, optimizer, source, reduction, group, epochs)
        return EagerPath(model, optimizer, source, reduction, group)
    one_launch = OneLaunchPath.applies(model, optimizer, source, ops)
    if statistics is not False and _statistics_chosen(model, optimizer, source, epochs, one_launch, statistics):
        # The statistics primitives are the backend's own (not registered ops): fit is not traced.
        return StatisticsPath(model, optimizer, source.x, source.t, reduction, select_ops(model.backend, device))
    if one_launch:
        return OneLaunchPath(model, optimizer, source, reduction, ops)
    if isinstance(source, TensorSource) and isinstance(optimizer, FusedSGD):
        # A graph is captured after the first epoch; with fewer than 3 epochs, or one step
        # per epoch, it would not pay for its capture.
        use_graph = (cuda_graph and epochs >= 3 and not source.full_batch
                     and _graph_capture_possible(ops, optimizer, source, device))
        return PerBatchPath(model, optimizer, source, reduction, use_graph)
    return EagerPath(model, optimizer, source, reduction)


def _statistics_chosen(model, optimizer, source, epochs: int, one_launch: bool, statistics: bool | None) -> bool:
    """statistics=None: when the cost model prefers it and the statistics fit; True: always, or an error."""
    if not StatisticsPath.applies(optimizer, source):
        if statistics:
            got = ("an iterable of batches" if not isinstance(source, TensorSource) else
                   f"batch_size={source.batch_size} < {source.n_rows} rows" if not source.full_batch else
                   f"{type(optimizer).__name__}" if not isinstance(optimizer, FusedSGD) else "step hooks")
            raise ValueError(f"statistics=True needs tensor inputs, a full batch (batch_size=None or >= the number "
                             f"of rows) and FusedSGD without step hooks; this fit has {got}")
        return False
    d, o = source.x.shape[1], source.t.shape[1]
    problem = statistics_memory_problem(d, o, model.weight.device)
    if problem is not None:
        if statistics:
            raise ValueError(f"statistics=True: {problem}; use statistics=False (a pass over the data per epoch)")
        return False
    if statistics:
        return True
    ops = select_ops(model.backend, model.weight.device)
    one_launch = one_launch and ops.name == "triton"  # the reference's fit_small is small ops per step
    cost, passes = statistics_cost(source.n_rows, d, o, epochs, source.x.element_size(), one_launch,
                                   ops.stats_epochs_in_one_launch(d, o))
    return cost < passes


# ---------------------------------------------------------------- reporting
class _Reporter:
    """Prints the tutorial's log lines and drives a tqdm progress bar, at report points only."""

    def __init__(self, epochs: int, log_every: int | None, progress: bool, print_fn: Callable[[str], None]) -> None:
        self.epochs, self.log_every, self.print_fn = epochs, log_every, print_fn
        self.bar = None
        if progress:
            from tqdm.auto import tqdm  # handles terminals and notebooks

            self.bar = tqdm(total=epochs, unit="epoch", leave=True)

    def chunk_end(self, epoch: int) -> int:
        """The epoch (exclusive) of the next report point after ``epoch``."""
        stops = [self.epochs]
        if self.log_every:
            stops.append((epoch // self.log_every + 1) * self.log_every)
        if self.bar is not None:
            stops.append(epoch + max(1, self.epochs // 100))
        return min(stops)

    def report(self, done: int, history: list[float], last_batch: list[float]) -> None:
        if self.log_every and done % self.log_every == 0:
            # Through tqdm while a bar is drawn, so the line does not tear it.
            emit = self.bar.write if self.bar is not None and self.print_fn is print else self.print_fn
            emit(f"Epoch [{done}/{self.epochs}], Loss: {last_batch[done - 1]:.4f}, "
                 f"Epoch mean loss: {history[done - 1]:.4f}")
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{history[done - 1]:.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- fit
_PERMUTATION_BUDGET = 1 << 22  # row indices per chunk of epochs (32 MiB of int64)


def fit(
    model: torch.nn.Module,
    data: torch.Tensor | Any,
    targets: torch.Tensor | Any = None,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    log_every: int | None = None,
    progress: bool | None = None,
    check_finite: bool = True,
    cuda_graph: bool = True,
    statistics: bool | None = None,
    print_fn: Callable[[str], None] = print,
    process_group: Any = None,
) -> list[float]:
    """Train ``model`` (a FusedLinearRegressor) for ``epochs`` epochs; returns each epoch's mean batch loss.

    data, targets: tensors (or NumPy arrays) (N, D) and (N, O), or (..., D)
    and (..., O); moved to the model's device, shuffled and batched there
    exactly as ``DataLoader(TensorDataset(data, targets), batch_size,
    shuffle=shuffle, generator=...)`` would: batch_size rows per step
    (default: all), the last partial batch kept. ``seed=`` (a CPU generator
    seeded with it) or ``generator=`` makes it reproducible; without either,
    the global RNG is used as DataLoader uses it. A full batch reads the rows
    in storage order and draws nothing.
    Or data: any re-iterable of (xb, yb) batches, e.g. a DataLoader or a list,
    with targets=None.

    optimizer: FusedSGD (the fused paths) or any torch optimizer; or give
    ``lr`` and a FusedSGD is made. Parameters with requires_grad=False or not
    held by the optimizer are left untouched, as in torch.
    reduction: "mean" (F.mse_loss's default) or "sum".
    log_every: print "Epoch [k/n], Loss: …" every k epochs, like the tutorial.
    progress: a tqdm progress bar (default: on for long runs in a terminal).
    check_finite: check tensor inputs for NaN/inf once up front (one read of
    the data and one sync; turn off for repeated short fits on clean data).
    cuda_graph: on CUDA, with tensor inputs, FusedSGD, the Triton kernels and
    at least 3 epochs of several batches, capture an epoch of fused steps in
    a CUDA graph after the first epoch and replay it.
    statistics: for a full batch with FusedSGD, read the data once for its
    sufficient statistics and run every epoch from them (O·(D+1)² work per
    epoch instead of a pass over N rows; linreg_fused.stats). None (default):
    when the cost model says it is cheaper (one pass + epochs × O·(D+1)²
    against epochs passes); True: always (an error if the fit is not full
    batch with FusedSGD or the (D+1)² statistics do not fit in memory);
    False: a pass per epoch. Same losses and parameters within the
    statistics' accuracy (see LinearStats).
    process_group: under torch.distributed (by default the world group once
    it is initialised; False trains each rank on its own; see
    linreg_fused.distributed), data parallel with FusedSGD: every rank
    passes the same data, batch_size is per rank (each step trains on
    world·batch_size rows, as with a DataLoader over a DistributedSampler:
    the same steps as one process with batch_size·world), each rank reads
    its share of the rows, the first rank's parameters are broadcast to the
    others at the start, and one all-reduce per step gives every rank the
    same update and the global mean loss. An iterable of batches is each
    rank's own (the same number of batches on every rank; the replicas must
    start equal: see distributed.broadcast_parameters_).
    Raises TrainingDivergedError if an epoch's loss is not finite (the
    parameters and momentum buffers are restored to the last finite epoch).
    """
    _check_options(epochs, log_every, reduction, seed, generator, print_fn)
    if statistics not in (None, True, False):
        raise TypeError(f"statistics must be None, True or False, got {statistics!r}")
    optimizer = _optimizer(model, optimizer, lr)
    source = _source(model, data, targets, batch_size, shuffle, seed, generator, check_finite, epochs)
    if progress is None:
        progress = sys.stderr.isatty() and epochs * source.batches_per_epoch >= 20_000
    path = choose_path(model, optimizer, source, reduction, epochs, cuda_graph, statistics,
                       distributed.resolve_group(process_group))
    reporter = _Reporter(epochs, log_every, progress, print_fn)
    try:
        return _run(path, source, epochs, reporter, optimizer, model.weight)
    finally:
        reporter.close()


def _run(path, source, epochs: int, reporter: _Reporter, optimizer, weight: torch.Tensor) -> list[float]:
    """Chunks of epochs between report points; one sync per chunk."""
    device = weight.device
    # Per epoch: the mean batch loss (fit's history) and the last batch's loss (the tutorial's log line).
    history_dev = torch.empty((epochs, 2), device=device, dtype=accumulator_dtype(weight.dtype))
    history: list[float] = []
    last_batch: list[float] = []
    epoch = 0
    while epoch < epochs:
        stop = reporter.chunk_end(epoch)
        orders = None
        if path.reads_orders:
            # The row orders of a chunk are drawn at once; cap their memory (int64, epochs × N).
            stop = min(stop, epoch + max(1, _PERMUTATION_BUDGET // source.n_rows))
            if source.full_batch:  # every path alike: a full batch draws nothing (its order cannot change the step)
                orders = torch.arange(source.n_rows, device=device).expand(stop - epoch, -1)
            else:
                orders = dataloader_orders(source.n_rows, stop - epoch, source.shuffle, source.generator, device)
        path.run(orders, history_dev[epoch:stop])
        for mean, last in history_dev[epoch:stop].tolist():  # the report point: one sync
            history.append(mean)
            last_batch.append(last)
        bad = next((i for i in range(epoch, stop) if not math.isfinite(history[i])), None)
        if bad is not None:
            path.restore(bad)
            raise _diverged(bad, epochs, history[: bad + 1], optimizer)
        epoch = stop
        reporter.report(epoch, history, last_batch)
    return history


def _check_options(epochs, log_every, reduction, seed, generator, print_fn) -> None:
    def positive_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not positive_int(epochs):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if log_every is not None and not positive_int(log_every):
        raise ValueError(f"log_every must be a positive integer or None, got {log_every!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed= or generator=, not both")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not callable(print_fn):
        raise TypeError("print_fn must be callable")


def _optimizer(model, optimizer, lr):
    if optimizer is None:
        if lr is None:
            raise ValueError("give an optimizer (e.g. FusedSGD(model.parameters(), lr=1e-5)) or lr=")
        return FusedSGD(model.parameters(), lr=lr, backend=model.backend)
    if lr is not None:
        raise ValueError("give either optimizer= or lr=, not both")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (e.g. FusedSGD), got {type(optimizer).__name__}")
    return optimizer


def _is_array(v) -> bool:
    return isinstance(v, torch.Tensor) or type(v).__module__ == "numpy" and hasattr(v, "__array__")


def _source(model, data, targets, batch_size, shuffle, seed, generator, check_finite, epochs):
    device = model.weight.device
    if device.type == "meta":
        raise ValueError("fit needs a model with real parameters, not meta tensors (use model.to_empty(device=...) "
                         "and initialise it first)")
    if _is_array(data):
        if targets is None:
            raise ValueError("fit(inputs, targets): targets are missing")
        if not _is_array(targets):
            raise TypeError(f"targets must be a torch.Tensor or a NumPy array, got {type(targets).__name__}")
        x, t = _prepare_tensors(model, data, targets, device, check_finite)
        if batch_size is None:
            batch_size = x.shape[0]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        return TensorSource(x, t, batch_size, bool(shuffle), generator)
    if targets is not None:
        raise TypeError(f"fit(inputs, targets) takes tensors or NumPy arrays, got {type(data).__name__} and "
                        f"{type(targets).__name__}; an iterable of (xb, yb) batches goes alone: fit(batches)")
    if not hasattr(data, "__iter__"):
        raise TypeError(f"fit(data): data must be tensors or an iterable of (xb, yb) batches, got "
                        f"{type(data).__name__}")
    if isinstance(data, Iterator) and epochs > 1:  # checked without calling iter(): a DataLoader's iter() draws seeds
        raise TypeError(f"fit(batches) runs {epochs} epochs, so the batches must be re-iterable (a DataLoader or a "
                        f"list), not a one-shot {type(data).__name__}")
    if batch_size is not None or seed is not None or generator is not None:
        raise ValueError("batch_size, seed and generator apply to tensor inputs; the iterable does its own batching")
    return BatchSource(data)


def _prepare_tensors(model, data, targets, device, check_finite):
    """The data on the model's device as (N, D), (N, O), checked once."""
    x, t = torch.as_tensor(data).to(device), torch.as_tensor(targets).to(device)
    if x.device.type == "meta" or t.device.type == "meta":
        raise ValueError("fit needs real data, not meta tensors")
    check_inputs(x, model.weight, model.bias, t)
    x, t = x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
    if check_finite:  # one sync up front, so a NaN in the data is not reported as a divergence
        finite = [torch.isfinite(v).all(dim=1) for v in (x, t)]
        if not bool(torch.stack([f.all() for f in finite]).all()):
            name, f = next((n, f) for n, f in zip(("inputs", "targets"), finite) if not bool(f.all()))
            row = int((~f).nonzero()[0, 0])
            raise ValueError(f"{name} contain NaN or inf (first at row {row}); clean the data before fit")
    return x, t


def _diverged(bad: int, epochs: int, history: list[float], optimizer) -> TrainingDivergedError:
    lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})
    where = ("their values before fit" if bad == 0 else f"the end of epoch {bad}, the last finite one")
    others = "" if isinstance(optimizer, torch.optim.SGD) else (
        " Optimizer state other than SGD momentum buffers was not restored.")
    return TrainingDivergedError(
        f"non-finite loss ({history[bad]}) at epoch {bad + 1}/{epochs}: training diverged. The parameters were "
        f"restored to {where}.{others} Try a smaller learning rate (lr={lrs[0] if len(lrs) == 1 else lrs} now).",
        bad + 1, history)
