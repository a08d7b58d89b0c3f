"""fit: the tutorial's training loop, on the device, without a host sync per step.

Three ways through, chosen by what the optimizer and the problem allow:

1. FusedSGD and a problem whose batch, W and b fit one program
   (``ops.fit_small_supported``): all epochs between two report points run in
   ONE launch of the persistent kernel (kernels/fused_fit.py).
2. FusedSGD otherwise: one fused step per batch (kernels/linear_mse_grad.py +
   reduce_update.py), the batch's rows gathered inside the kernel through the
   epoch's permutation, so X is never copied.
3. Any other torch optimizer: ``loss.backward(); opt.step()`` per batch.

The host reads the device only at report points (``log_every``, the
progress bar, the end): there it prints, and checks that every epoch's loss
was finite. A divergence raises TrainingDivergedError with the parameters
restored to the end of the last finite epoch.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Callable, Iterable

import torch

from .backend import select_ops
from .functional import check_inputs, fused_sgd_step
from .kernels.specs import accumulator_dtype
from .optim import FusedSGD, group_hyper


class TrainingDivergedError(FloatingPointError):
    """A non-finite loss appeared during fit.

    epoch: the 1-based epoch whose mean loss was non-finite;
    history: the per-epoch losses up to and including that epoch.
    """

    def __init__(self, message: str, epoch: int, history: list[float]) -> None:
        super().__init__(message)
        self.epoch, self.history = epoch, history


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
    def restore(self, diverged_in_first_epoch: bool) -> None:
        for i, p in enumerate(self.params):
            p.copy_(self.saved[i])
            buf = self.before_fit[i] if diverged_in_first_epoch else self.saved_buffers[i]
            if buf is None:
                self.optimizer.state.get(p, {}).pop("momentum_buffer", None)
            elif self._buffer(p) is not None:
                self._buffer(p).copy_(buf)


class _Reporter:
    """Prints the tutorial's log lines and a progress bar, at report points only."""

    def __init__(self, epochs: int, log_every: int | None, progress: bool, print_fn: Callable[[str], None]) -> None:
        self.epochs, self.log_every, self.progress, self.print_fn = epochs, log_every, progress, print_fn
        self.start = time.perf_counter()

    def chunk_end(self, epoch: int) -> int:
        """The epoch (exclusive) of the next report point after ``epoch``."""
        stops = [self.epochs]
        if self.log_every:
            stops.append((epoch // self.log_every + 1) * self.log_every)
        if self.progress:
            stops.append(epoch + max(1, self.epochs // 100))
        return min(stops)

    def report(self, done: int, history: list[float]) -> None:
        if self.log_every and done % self.log_every == 0:
            if self.progress:
                sys.stderr.write("\r\033[K")
            self.print_fn(f"Epoch [{done}/{self.epochs}], Loss: {history[done - 1]:.4f}")
        if self.progress:
            width = 30
            filled = width * done // self.epochs
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] epoch {done}/{self.epochs} "
                             f"loss {history[done - 1]:.4g} ({rate:.0f} epochs/s)")
            if done == self.epochs:
                sys.stderr.write("\n")
            sys.stderr.flush()


def epoch_permutations(n_rows: int, n_epochs: int, shuffle: bool, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """(n_epochs, n_rows) int64: each epoch's row order (a fresh permutation when shuffling).

    fit draws these once per report chunk (the epochs between two report
    points), on every path, so a seed gives the same batches whichever
    kernels run.
    """
    if not shuffle:
        return torch.arange(n_rows, device=device).expand(n_epochs, n_rows).contiguous()
    gen_device = generator.device if generator is not None else device
    keys = torch.rand((n_epochs, n_rows), generator=generator, device=gen_device)
    return keys.argsort(dim=1).to(device)


def fit(
    model: torch.nn.Module,
    data: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    targets: torch.Tensor | None = None,
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
    print_fn: Callable[[str], None] = print,
) -> list[float]:
    """Train ``model`` (a FusedLinearRegressor) for ``epochs`` epochs.

    data, targets: tensors (N, D) and (N, O) (or (..., D), (..., O)); they are
    moved to the model's device, shuffled and batched there: a fresh
    permutation each epoch (unless shuffle=False), batch_size rows per step
    (default: all), the last partial batch kept, as DataLoader(shuffle=True)
    does. Reproducible with ``seed=`` or ``generator=``.
    Or data: any iterable of (xb, yb) batches (a DataLoader), targets=None.

    optimizer: FusedSGD (fused path) or any torch optimizer; or give ``lr``
    and a FusedSGD is made. Returns each epoch's mean batch loss.
    log_every: print "Epoch [k/n], Loss: …" every k epochs, like the tutorial.
    progress: a progress bar on stderr (default: on for long runs in a terminal).
    check_finite: check tensor inputs for NaN/inf once up front (one read of
    the data and one sync; turn off for repeated short fits on clean data).
    cuda_graph: on CUDA, with tensor inputs, FusedSGD, the Triton kernels and
    at least 3 epochs, capture an epoch of per-batch steps in a CUDA graph
    after the first epoch and replay it (launch overhead is most of a small
    step's cost).
    Raises TrainingDivergedError if an epoch's loss is not finite.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
        raise ValueError(f"log_every must be a positive integer or None, got {log_every!r}")
    if optimizer is None:
        if lr is None:
            raise ValueError("give an optimizer (e.g. FusedSGD(model.parameters(), lr=1e-5)) or lr=")
        optimizer = FusedSGD(model.parameters(), lr=lr, backend=model.backend)
    elif lr is not None:
        raise ValueError("give either optimizer= or lr=, not both")
    if seed is not None and generator is not None:
        raise ValueError("give either seed= or generator=, not both")

    params = [p for p in (model.weight, model.bias) if p is not None]
    device = model.weight.device
    if isinstance(data, torch.Tensor):
        if targets is None:
            raise ValueError("fit(inputs, targets): targets are missing")
        x, t = _prepare_tensors(model, data, targets, device, check_finite)
        if batch_size is None:
            batch_size = x.shape[0]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        n_steps = epochs * math.ceil(x.shape[0] / batch_size)
    else:
        if targets is not None:
            raise ValueError("fit(batches): pass targets inside the batches, not as a second argument")
        if batch_size is not None or seed is not None or generator is not None:
            raise ValueError("batch_size, seed and generator apply to tensor inputs; the iterable does its own batching")
        x = t = None
        n_steps = epochs * (len(data) if hasattr(data, "__len__") else 1)

    if progress is None:
        progress = sys.stderr.isatty() and n_steps >= 20_000
    reporter = _Reporter(epochs, log_every, progress, print_fn)
    acc = accumulator_dtype(model.weight.dtype)
    history_dev = torch.empty(epochs, device=device, dtype=acc)
    ops = select_ops(model.backend, device)
    persistent = (
        x is not None and isinstance(optimizer, FusedSGD)
        and all(p.is_contiguous() for p in params)
        and ops.fit_small_supported(batch_size, x.shape[1], model.out_features)
    )
    # The persistent kernel keeps its own copy of the last finite epoch's state on chip.
    last_finite = None if persistent else _LastFinite(params, optimizer)
    had_buffer = [optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in params]

    full_batch = x is not None and batch_size >= x.shape[0] and not persistent  # row order cannot matter
    # A graph is captured after the first epoch; with fewer than 3 epochs, or one step
    # per epoch, it would not pay for its capture.
    use_graph = (cuda_graph and epochs >= 3 and not persistent and not full_batch
                 and _graph_capture_possible(ops, optimizer, x, device))
    per_batch = _PerBatchEpochs(model, optimizer, x, t, data, batch_size, reduction, device, use_graph)
    history: list[float] = []
    epoch = 0
    while epoch < epochs:
        stop = reporter.chunk_end(epoch)
        perms = None
        if x is not None and not full_batch:
            # The row orders of a chunk are drawn at once; cap their memory (int64, epochs × N).
            stop = min(stop, epoch + max(1, _PERMUTATION_BUDGET // x.shape[0]))
            perms = epoch_permutations(x.shape[0], stop - epoch, shuffle, generator, device)
        if persistent:
            _fit_chunk_persistent(ops, model, optimizer, x, t, perms, history_dev[epoch:stop], batch_size, reduction)
        else:
            for e in range(epoch, stop):
                history_dev[e] = per_batch(perms[e - epoch] if perms is not None else None, full_batch)
                last_finite.epoch_end(history_dev[e])
        history.extend(history_dev[epoch:stop].tolist())  # the report point: one sync
        bad = next((i for i in range(epoch, stop) if not math.isfinite(history[i])), None)
        if bad is not None:
            if last_finite is not None:
                last_finite.restore(diverged_in_first_epoch=bad == 0)
            elif bad == 0:  # the kernel kept the pre-fit values; buffers it created did not exist then
                for p, had in zip(params, had_buffer):
                    if not had:
                        optimizer.state.get(p, {}).pop("momentum_buffer", None)
            raise _diverged(bad, epochs, history[: bad + 1], optimizer)
        epoch = stop
        reporter.report(epoch, history)
    return history


_PERMUTATION_BUDGET = 1 << 22  # row indices per chunk of epochs (32 MiB of int64)


def _prepare_tensors(model, data, targets, device, check_finite):
    """The data on the model's device as (N, D), (N, O), checked once."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    x, t = data.to(device), targets.to(device)
    check_inputs(x, model.weight, model.bias, t)
    x, t = x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
    if check_finite:  # one sync up front, so a NaN in the data is not reported as a divergence
        finite = [torch.isfinite(v).all(dim=1) for v in (x, t)]
        if not bool(torch.stack([f.all() for f in finite]).all()):
            name, f = next((n, f) for n, f in zip(("inputs", "targets"), finite) if not bool(f.all()))
            row = int((~f).nonzero()[0, 0])
            raise ValueError(f"{name} contain NaN or inf (first at row {row}); clean the data before fit")
    return x, t


def _graph_capture_possible(ops, optimizer, x, device) -> bool:
    return (x is not None and device.type == "cuda" and ops.name == "triton"
            and isinstance(optimizer, FusedSGD))


class _GraphedEpoch:
    """An epoch of fused steps captured in a CUDA graph. The batches are views
    of a static row-order buffer; each replay first copies the epoch's
    permutation into it. Capturing runs nothing, so the parameters do not move."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], n_rows: int, device: torch.device) -> None:
        self.rows = torch.empty(n_rows, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = run(self.rows)

    def __call__(self, perm: torch.Tensor) -> torch.Tensor:
        self.rows.copy_(perm)
        self.graph.replay()
        return self.loss


class _PerBatchEpochs:
    """Runs one epoch of one step per batch and returns its mean loss (on the
    device). With ``use_graph``, the first epoch runs eagerly (it compiles the
    kernels and creates the momentum buffers) and later ones replay a CUDA
    graph of it; if capture fails, it warns and stays eager."""

    def __init__(self, model, optimizer, x, t, data, batch_size, reduction, device, use_graph: bool) -> None:
        self.model, self.optimizer, self.x, self.t, self.data = model, optimizer, x, t, data
        self.batch_size, self.reduction, self.device = batch_size, reduction, device
        self.use_graph = use_graph
        self.graphed: _GraphedEpoch | None = None

    def _run(self, perm: torch.Tensor) -> torch.Tensor:
        batches = ((None, perm[s : s + self.batch_size]) for s in range(0, self.x.shape[0], self.batch_size))
        return _run_epoch(self.model, self.optimizer, self.x, self.t, batches, self.reduction, self.device)

    def __call__(self, perm: torch.Tensor | None, full_batch: bool = False) -> torch.Tensor:
        if self.x is None:  # an iterable of batches
            return _run_epoch(self.model, self.optimizer, None, None, ((b, None) for b in self.data),
                              self.reduction, self.device)
        if full_batch:  # one step over all rows in storage order: no gather
            return _run_epoch(self.model, self.optimizer, self.x, self.t, [(None, None)], self.reduction,
                              self.device)
        if self.graphed is not None:
            return self.graphed(perm)
        loss = self._run(perm)
        if self.use_graph:
            self.use_graph = False
            try:
                self.graphed = graphed_epoch(self._run, self.x.shape[0], self.device)
            except RuntimeError as err:
                warnings.warn(f"fit: capturing an epoch in a CUDA graph failed ({err}); continuing without it",
                              RuntimeWarning, stacklevel=3)
        return loss


graphed_epoch = _GraphedEpoch  # the factory fit uses; tests swap in a stand-in on machines without CUDA


def _run_epoch(model, optimizer, x, t, batches, reduction, device) -> torch.Tensor:
    """One epoch, one step per batch; returns the mean batch loss as a device tensor."""
    total, count = None, 0
    fused = isinstance(optimizer, FusedSGD)
    for batch, rows in batches:
        if batch is not None:  # from an iterable
            xb, yb = (b.to(device, non_blocking=True) for b in batch)
            check_inputs(xb, model.weight, model.bias, yb)
            xb, yb = xb.reshape(-1, xb.shape[-1]), yb.reshape(-1, yb.shape[-1])
        else:
            xb, yb = x, t
        if fused:
            loss = fused_sgd_step(xb, model.weight, model.bias, yb, optimizer, reduction=reduction, row_index=rows,
                                  backend=model.backend, input_precision=model.input_precision)
        else:
            if rows is not None:
                xb, yb = xb.index_select(0, rows), yb.index_select(0, rows)
            optimizer.zero_grad()
            loss = model.loss(xb, yb, reduction)
            loss.backward()
            optimizer.step()
            loss = loss.detach()
        total = loss.to(accumulator_dtype(model.weight.dtype)) if total is None else total + loss
        count += 1
    if count == 0:
        raise ValueError("the batches are empty: nothing to train on")
    return total / count


def _fit_chunk_persistent(ops, model, optimizer, x, t, perms, history, batch_size, reduction) -> None:
    """The epochs of ``perms`` in one launch of the persistent kernel."""
    state = {}
    for name, p in (("weight", model.weight), ("bias", model.bias)):
        hyper = group_hyper(optimizer.group_of(p)) if p is not None else state["weight_hyper"]
        buf, is_new = optimizer.momentum_buffer(p, hyper) if p is not None else (None, False)
        state.update({f"{name}_hyper": hyper, f"{name}_buffer": buf, f"init_{name}_buffer": is_new})
    with torch.no_grad():
        ops.fit_small(x, t, model.weight, model.bias, permutations=perms, history=history, batch_size=batch_size,
                      mean=reduction == "mean", **state)


def _diverged(bad: int, epochs: int, history: list[float], optimizer) -> TrainingDivergedError:
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    where = ("their values before fit" if bad == 0 else f"the end of epoch {bad}, the last finite one")
    others = "" if isinstance(optimizer, FusedSGD) or isinstance(optimizer, torch.optim.SGD) else (
        " Optimizer state other than SGD momentum buffers was not restored.")
    return TrainingDivergedError(
        f"non-finite loss ({history[bad]}) at epoch {bad + 1}/{epochs}: training diverged. The parameters were "
        f"restored to {where}.{others} Try a smaller learning rate (lr={lrs[0] if len(lrs) == 1 else lrs} now).",
        bad + 1, history)
