"""fit: the tutorial's training loop, on the device, without a host sync per step.

``fit`` checks its arguments (fit_source), turns the data into a source
(tensors on the model's device, or an iterable of batches), lets
``choose_path`` pick one way through, and runs it chunk by chunk between
report points (fit_report). Each path is a small unit of its own:

- ``OneLaunchPath`` (fit_one_launch): FusedSGD and a problem whose batch, W
  and b fit one program: every epoch of a chunk in ONE launch of the
  persistent kernel (kernels/fused_fit.py).
- ``PerBatchPath`` (fit_per_batch): FusedSGD otherwise: one fused step (two
  launches) per batch, the batch's rows gathered inside the kernel through
  the epoch's row order, so X is never copied; on CUDA, epochs replay a CUDA
  graph, kept from one fit to the next.
- ``EagerPath`` (fit_eager): any other torch optimizer, or an iterable of
  batches: ``loss.backward(); optimizer.step()`` per batch (FusedSGD steps
  fused).
- ``StatisticsPath`` (fit_statistics): FusedSGD on a full batch, when the
  cost model says so or ``statistics=True``: one pass over X and T for their
  sufficient statistics, then every epoch from the (D+1)² statistics alone
  (``statistics_cost``).
- ``DistributedPath`` (fit_distributed): FusedSGD and tensors under
  torch.distributed (a process group of several ranks): each step's rows are
  split across the ranks, and one all-reduce per step makes it the step on
  all of them (linreg_fused.distributed).

Row orders (fit_orders) are DataLoader's: with ``seed=``/``generator=`` (a
CPU generator) or the global RNG, the batches are exactly those of
``DataLoader(TensorDataset(inputs, targets), batch_size, shuffle=True,
generator=...)``, so switching from the tutorial's loop changes no number;
``shuffle="device"`` draws them on the device instead.

The host reads the device only at report points (``log_every``, the
progress bar, the end): there it prints, and checks that every epoch's loss
and end parameters were finite. A divergence raises TrainingDivergedError
with the parameters (and SGD momentum buffers) restored to the end of the
last finite epoch.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from . import distributed, fit_per_batch
from .backend import select_ops
from .checks import step_through_forward
from .fit_distributed import DistributedPath
from .fit_eager import EagerPath
from .fit_one_launch import OneLaunchPath
from .fit_orders import dataloader_orders, device_orders
from .fit_per_batch import PerBatchPath
from .fit_report import Reporter, TrainingDivergedError, diverged, first_bad_epoch
from .fit_source import BatchSource, TensorSource, check_options, make_optimizer, make_source
from .fit_statistics import StatisticsPath, statistics_cost, statistics_memory_problem
from .kernels.specs import accumulator_dtype
from .optim import FusedSGD

__all__ = ["BatchSource", "TensorSource", "TrainingDivergedError", "choose_path", "fit"]

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
    shuffle: bool | str = True,
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
    (default: all; of (n, ..., D) data, batch_size samples of its first
    dimension, as DataLoader draws them), the last partial batch kept.
    ``seed=`` (a CPU generator seeded with it) or ``generator=`` makes it
    reproducible; without either, the global RNG is used as DataLoader
    uses it. shuffle="device" draws the
    orders on the model's device instead (seeded by ``seed=``, else by one
    draw of ``generator`` or the global RNG; reproducible, not DataLoader's;
    see docs/fit.md). A full batch reads the rows in storage order and draws
    nothing. NumPy arrays are converted to the model's dtype (a warning says
    when that changes a value).
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
    An iterable's batches are not checked (a check costs host time on every
    batch): a NaN or inf in one ends fit as a divergence whose message says
    that unchecked data can be the cause.
    cuda_graph: on CUDA, with tensor inputs, FusedSGD, the Triton kernels and
    several batches per epoch, replay an epoch of fused steps captured in a
    CUDA graph; the graph is kept for the next fit with the same optimizer,
    model, data, shapes, batch size and options (see fit_per_batch).
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
    Raises TrainingDivergedError if an epoch's loss, or the parameters after
    its steps, are not finite (the parameters and momentum buffers are
    restored to the end of the last finite epoch).
    """
    epochs, log_every, seed = check_options(epochs, log_every, reduction, shuffle, seed, generator, print_fn)
    if statistics not in (None, True, False):
        raise TypeError(f"statistics must be None, True or False, got {statistics!r}")
    optimizer = make_optimizer(model, optimizer, lr)
    source = make_source(model, data, targets, batch_size, shuffle, seed, generator, check_finite, epochs)
    if progress is None:
        progress = epochs * source.batches_per_epoch >= 20_000 and sys.stderr.isatty()
    path = choose_path(model, optimizer, source, reduction, epochs, cuda_graph, statistics,
                       distributed.resolve_group(process_group))
    reporter = Reporter(epochs, log_every, progress, print_fn)
    try:
        # Whether fit scanned the data for NaN/inf (an iterable's batches are not): a divergence's message says.
        data_checked = bool(check_finite) and not isinstance(source, BatchSource)
        return _run(path, source, epochs, reporter, optimizer, model.weight, data_checked)
    finally:
        reporter.close()


def _run(path, source, epochs: int, reporter: Reporter, optimizer, weight: torch.Tensor,
         data_checked: bool) -> list[float]:
    """Chunks of epochs between report points; one sync per chunk."""
    device = weight.device
    # Per epoch: the mean batch loss (fit's history), the last batch's loss (the tutorial's log line),
    # and whether the parameters were finite at its end (fit_report).
    history_dev = torch.empty((epochs, 3), device=device, dtype=accumulator_dtype(weight.dtype))
    history: list[float] = []
    last_batch: list[float] = []
    epoch = 0
    while epoch < epochs:
        stop = reporter.chunk_end(epoch)
        orders = None
        if path.reads_orders:
            # The row orders of a chunk are drawn at once; cap their memory (int64, epochs × N).
            stop = min(stop, epoch + max(1, _PERMUTATION_BUDGET // source.n_rows))
            orders = _orders(source, stop - epoch, device)
        path.run(orders, history_dev[epoch:stop])
        means, lasts, flags = zip(*history_dev[epoch:stop].tolist())  # the report point: one sync
        history += means
        last_batch += lasts
        bad = first_bad_epoch(means, flags, epoch)
        if bad is not None:
            bad = path.restore(bad)
            raise diverged(bad, epochs, history[: bad + 1], optimizer, data_checked)
        epoch = stop
        reporter.report(epoch, history, last_batch)
    return history


def _orders(source: TensorSource, n_epochs: int, device: torch.device) -> torch.Tensor:
    """(n_epochs, N) row orders: storage order for a full batch (every path alike: its order cannot change
    the step, so none is drawn), else drawn on the device or as DataLoader draws them."""
    if source.full_batch:
        return torch.arange(source.n_rows, device=device).expand(n_epochs, -1)
    k = source.rows_per_sample
    if source.shuffle == "device":
        orders = device_orders(source.n_rows // k, n_epochs, source.generator, device)
    else:
        orders = dataloader_orders(source.n_rows // k, n_epochs, source.shuffle, source.generator, device)
    # Data (n, ..., D): DataLoader orders the n samples; each stands for its k rows, in storage order.
    return orders if k == 1 else (orders.unsqueeze(-1) * k + torch.arange(k, device=device)).reshape(n_epochs, -1)


def choose_path(model, optimizer, source, reduction: str, epochs: int, cuda_graph: bool,
                statistics: bool | None = None, group: Any = None):
    """The one place that decides how fit runs (see the module docstring).
    group: the resolved process group (distributed.resolve_group), or None."""
    device = model.weight.device
    # The backend's own primitives, not the registered ops: fit syncs at report points, so it is not traced.
    ops = select_ops(model.backend, device)
    if step_through_forward(model):  # hooks, or parameters behind the weight: train_step per batch trains them
        if group is not None or statistics:
            raise ValueError("this model's step must go through model(x) and .grad (it has hooks that model(x) "
                             "runs, or a weight or bias computed from other parameters: torch.nn.utils.parametrize, "
                             "prune): fit runs it batch by batch, not under torch.distributed (pass "
                             "process_group=False) nor with statistics=True")
        return EagerPath(model, optimizer, source, reduction)
    if group is not None:
        if not isinstance(optimizer, FusedSGD):
            raise ValueError(f"fit under torch.distributed runs FusedSGD's fused steps; with "
                             f"{type(optimizer).__name__}, wrap the model in DistributedDataParallel and write the "
                             f"loop, or pass process_group=False to train each rank on its own")
        if statistics is not False and _statistics_chosen(model, optimizer, source, epochs, False, statistics, ops):
            # Each rank reads its share of the rows once; one all-gather merges the statistics.
            return StatisticsPath(model, optimizer, source.x, source.t, reduction, ops, group)
        if isinstance(source, TensorSource):
            return DistributedPath(model, optimizer, source, reduction, group, epochs)
        return EagerPath(model, optimizer, source, reduction, group)
    one_launch = OneLaunchPath.applies(model, optimizer, source, ops)
    if statistics is not False and _statistics_chosen(model, optimizer, source, epochs, one_launch, statistics, ops):
        return StatisticsPath(model, optimizer, source.x, source.t, reduction, ops)
    if one_launch:
        return OneLaunchPath(model, optimizer, source, reduction, ops)
    if isinstance(source, TensorSource) and isinstance(optimizer, FusedSGD):
        # One step per epoch (a full batch) gains nothing from a graph of it.
        use_graph = (cuda_graph and not source.full_batch
                     and fit_per_batch.graph_capture_possible(ops, optimizer, source, device))
        return PerBatchPath(model, optimizer, source, reduction, use_graph)
    return EagerPath(model, optimizer, source, reduction)


def _statistics_chosen(model, optimizer, source, epochs: int, one_launch: bool, statistics: bool | None,
                       ops) -> bool:
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
    one_launch = one_launch and ops.name == "triton"  # the reference's fit_small is small ops per step
    cost, passes = statistics_cost(source.n_rows, d, o, epochs, source.x.element_size(), one_launch,
                                   ops.stats_epochs_in_one_launch(d, o))
    return cost < passes
