"""fit's per-batch path: FusedSGD with tensor inputs where the one-launch
kernel does not fit: one fused step (two launches) per batch, the batch's
rows gathered inside the kernel through the epoch's row order, so X is never
copied.

On CUDA, an epoch of steps and its bookkeeping (the epoch's row read from a
chunk of orders by a device-side counter, the history row, the last finite
state) are captured in one CUDA graph, so each epoch costs the host one
replay. The graph is kept for the next fit with the same optimizer, model
parameters and buffers, data tensors, shapes, batch size and options
(``PerBatchPath.key``): a repeat call replays from its first epoch. A first epoch
runs eagerly only where it must: when it creates the momentum buffers (the
first SGD step is special), or when no epoch of this signature ran in the
process yet (its kernels compile on first use, which must not happen inside
a capture). If capture fails, fit warns and stays eager.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch

from .fit_epochs import EpochRunner, epoch_losses
from .fit_report import LastFinite
from .fit_source import TensorSource
from .functional import fused_sgd_step
from .kernels.specs import accumulator_dtype
from .optim import FusedSGD, group_hyper

_GRAPHS: "weakref.WeakKeyDictionary[Any, GraphedEpochs]" = weakref.WeakKeyDictionary()  # optimizer -> the latest
_WARM: set[tuple] = set()  # signatures of per-batch epochs that ran in this process (their kernels are loaded)
_GRAPH_ORDERS = 1 << 20  # row indices a kept graph's chunk of orders holds (8 MiB of int64)


class CudaGraph:
    """``fn`` captured in a CUDA graph (capturing runs nothing); ``replay()`` runs it."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


graphed_epoch = CudaGraph  # the factory PerBatchPath uses; tests swap in a stand-in on machines without CUDA


def graph_capture_possible(ops, optimizer, source, device) -> bool:
    # A replay runs no Python: no step hooks can fire in it.
    return (isinstance(source, TensorSource) and device.type == "cuda" and ops.name == "triton"
            and isinstance(optimizer, FusedSGD) and not optimizer.has_step_hooks())


def _layout(v: torch.Tensor | None) -> tuple:
    return () if v is None else (tuple(v.shape), v.stride(), v.dtype, v.data_ptr() % 16)


class PerBatchPath(EpochRunner):
    """One fused step per batch; with ``use_graph``, epochs replay a CUDA graph (see the module docstring)."""

    def __init__(self, model, optimizer: FusedSGD, source: TensorSource, reduction: str, use_graph: bool) -> None:
        self.use_graph, self.graphed = use_graph, None
        super().__init__(model, optimizer, source, reduction)

    def make_last_finite(self) -> LastFinite:
        """A kept graph's own (it holds its tensors) when the graph fits this fit, else a new one."""
        self.use_graph = self.use_graph and self.reads_orders
        cached = _GRAPHS.get(self.optimizer) if self.use_graph else None
        if cached is None or cached.key != self.key():
            return super().make_last_finite()
        self.graphed = cached
        cached.last_finite.params = self.params  # at the same addresses (the key says so)
        cached.last_finite.start(self.buffers())
        return cached.last_finite

    def epoch(self, order: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        losses = [fused_sgd_step(x, m.weight, m.bias, t, self.optimizer, reduction=self.reduction, row_index=rows,
                                 backend=m.backend, input_precision=m.input_precision, validate=False,
                                 process_group=False)
                  for x, t, rows in self.tensor_batches(order)]
        return epoch_losses(losses, accumulator_dtype(m.weight.dtype))

    def run(self, orders: torch.Tensor | None, history: torch.Tensor) -> None:
        done = 0
        if self.use_graph and self.graphed is None:
            # Without buffers yet, or with kernels not yet compiled, the first epoch runs eagerly.
            if self._new_buffers() or self.signature() not in _WARM:
                self.run_epoch(orders[0], history[0])
                _WARM.add(self.signature())
                done = 1
            if done < history.shape[0]:
                # Its chunk of orders holds at most _GRAPH_ORDERS indices (more epochs replay in turns).
                self._capture(min(history.shape[0] - done, max(1, _GRAPH_ORDERS // self.source.n_rows)))
        if self.graphed is not None:
            self.graphed.run(orders[done:], history[done:])
            self.optimizer._mark_stepped()  # a replay runs no Python: LR schedulers must still see the steps
            return
        super().run(None if orders is None else orders[done:], history[done:])
        if orders is not None and history.shape[0] > done:
            _WARM.add(self.signature())

    def _capture(self, capacity: int) -> None:
        self.use_graph = False  # one attempt
        try:
            self.graphed = GraphedEpochs(self, capacity)
        except RuntimeError as err:
            warnings.warn(f"fit: capturing an epoch in a CUDA graph failed ({err}); continuing without it",
                          RuntimeWarning, stacklevel=5)
            return
        _GRAPHS[self.optimizer] = self.graphed

    def _new_buffers(self) -> bool:
        """Whether the next step creates a momentum buffer (SGD's first step sets it to the gradient)."""
        for p, buf in zip(self.params, self.buffers()):
            if buf is None and self.optimizer.trains(p) and group_hyper(self.optimizer.group_of(p)).momentum != 0:
                return True
        return False

    def _hypers(self) -> tuple:
        return tuple(group_hyper(self.optimizer.group_of(p)) if self.optimizer.trains(p) else None
                     for p in self.params)

    def signature(self) -> tuple:
        """What the compiled kernels of an epoch depend on: shapes, strides, dtypes, 16-byte alignments,
        options and the update's flags (not the addresses or the hyper-parameters' values)."""
        m, s = self.model, self.source
        return (m.weight.device, s.n_rows, s.batch_size, self.reduction, m.backend, m.input_precision,
                torch.get_float32_matmul_precision(), *(_layout(v) for v in (s.x, s.t, *self.params)),
                *(None if h is None else h.flags for h in self._hypers()),
                *(buf is None for buf in self.buffers()))

    def key(self) -> tuple:
        """What a captured epoch replays: the signature, the hyper-parameters and every address it
        reads or writes. Tensors at those addresses with the signature's layouts are what a replay
        works on, whichever Python objects hold them now."""
        tensors = (self.source.x, self.source.t, *self.params, *self.buffers(), *self._lr_tensors())
        return (self.signature(), self._hypers(), tuple(0 if v is None else v.data_ptr() for v in tensors))

    def _lr_tensors(self) -> tuple:
        """The groups' tensor learning rates: a step reads one on the device, so a replay reads the one
        of the capture (_hypers holds its value only; another tensor of that value is another address)."""
        lrs = (self.optimizer.group_of(p)["lr"] if self.optimizer.trains(p) else None for p in self.params)
        return tuple(lr if isinstance(lr, torch.Tensor) else None for lr in lrs)


class GraphedEpochs:
    """The captured epoch and its static tensors: a chunk of row orders (``capacity`` epochs), the
    counter that picks the epoch's row, the chunk's history rows and the last finite state, and the
    key it was captured for. It holds no optimizer, model or data (only the parameters, through
    the last finite state): it is kept per optimizer, weakly."""

    def __init__(self, path: PerBatchPath, capacity: int) -> None:
        device, n_rows = path.model.weight.device, path.source.n_rows
        self.orders = torch.empty((capacity, n_rows), dtype=torch.int64, device=device)
        self.history = torch.empty((capacity, 3), dtype=accumulator_dtype(path.model.weight.dtype), device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.row = torch.empty(3, dtype=self.history.dtype, device=device)
        self.last_finite: LastFinite = path.last_finite
        self.key = path.key()
        buffers = path.buffers()

        if any(buf is not None and kept is None for buf, kept in zip(buffers, self.last_finite.saved_buffers)):
            raise RuntimeError("a momentum buffer has no saved copy to capture")  # start() or an eager epoch made it

        def epoch() -> None:  # an eager epoch (PerBatchPath.run_epoch), its row picked on the device
            self.row[:2] = path.epoch(self.orders.index_select(0, self.counter)[0])
            self.last_finite.epoch_end(self.row, buffers)
            self.history.index_copy_(0, self.counter, self.row[None])
            self.counter += 1

        self.graph = graphed_epoch(epoch)

    def run(self, orders: torch.Tensor, history: torch.Tensor) -> None:
        """Replay one epoch per row of ``orders``, a chunk of at most ``capacity`` epochs at a time."""
        capacity = self.orders.shape[0]
        for start in range(0, history.shape[0], capacity):
            n = min(capacity, history.shape[0] - start)
            self.orders[:n].copy_(orders[start : start + n], non_blocking=True)
            self.counter.zero_()
            for _ in range(n):
                self.graph.replay()
            history[start : start + n].copy_(self.history[:n])
