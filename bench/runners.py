"""One runner per peer of bench/regimes.py, for the benchmark suite (bench/test_bench.py) and
the GPU check (bench/gpu_regimes.py, bench/gpu_inference.py): set up on a regime's data
(bench/harness.py), reset to the shared initial weights, a checked epoch, the timed call
(``call``: its steps, then a device sync) and the steady loop's unit (``steady_unit``: one
step, or one fit call, with no sync, for n back-to-back calls and one sync at the end).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import CHECK_SEED, Data, reference_forward
from linreg_fused import FusedLinearRegressor, FusedSGD
from regimes import BF16, FP32, Peer

# The steady loop (bench/check_ctx.py, Ctx.steady): 100 back-to-back steps, or fit calls of at
# least 100 steps (100 epochs where the regime is a whole training run).
STEADY_STEPS = 100
STEADY_FIT_EPOCHS = 100
Unit = tuple[Callable[[], None], int, int]  # (one call, steps per call, calls per steady round)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_step(module: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, mode: str,
               zero_grad: bool = True) -> torch.Tensor:
    """The step a user writes: nn.Linear + F.mse_loss + backward + optim.SGD (under autocast in "autocast" mode)."""
    if zero_grad:
        opt.zero_grad(set_to_none=True)
    if mode == "autocast":
        with torch.autocast(xb.device.type, dtype=BF16, cache_enabled=False):  # caching is unsafe in graph capture
            loss = F.mse_loss(module(xb), yb)
    else:
        loss = F.mse_loss(module(xb), yb)
    loss.backward()
    opt.step()
    return loss.detach()


class Runner:
    """One peer set up on one regime: reset to (w0, b0), a checked epoch, and the timed call."""

    def __init__(self, data: Data, peer: Peer) -> None:
        self.data, self.peer, self.regime = data, peer, data.regime
        self.last_loss: torch.Tensor | None = None
        self._calls = 0

    def _next_set(self) -> int:
        """The input set of this call: successive calls cycle through data.sets."""
        k = self._calls % len(self.data.sets)
        self._calls += 1
        return k

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameters the peer trains (in place)."""
        return self.module.weight, self.module.bias

    def reset(self) -> None:
        w, b = self.parameters()
        with torch.no_grad():
            w.copy_(self.data.w0)
            b.copy_(self.data.b0)

    def check_epoch(self) -> tuple[list[float], list[torch.Tensor | None]]:
        """One epoch from the current parameters over the check order's batches:
        ([mean batch loss], [the row order it used])."""
        raise NotImplementedError

    def call(self) -> None:
        """The timed function: steps_per_call steps, then a device sync."""
        raise NotImplementedError

    def steady_unit(self) -> Unit:
        """(unit, steps per unit, units per round) of the steady loop; the unit never synchronises."""
        raise NotImplementedError

    def _steady_orders(self) -> Iterator[torch.Tensor]:
        """Row-index batches of one shuffled epoch, repeated: the steady loop of a "fit" regime."""
        order = torch.randperm(self.regime.n_rows, device=self.data.device)
        return itertools.cycle(order.split(self.regime.batch_size))

    def _epoch_orders(self) -> Iterator[torch.Tensor]:
        """A fresh random row order per epoch, on the device (as DataLoader(shuffle=True) would)."""
        for _ in range(self.regime.epochs):
            yield torch.randperm(self.regime.n_rows, device=self.data.device)

    def _fit_batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in order.split(self.regime.batch_size):
            yield self.data.x[idx], self.data.t[idx]


class StepLoopRunner(Runner):
    """Any per-batch step function: eager variants, compiled eager, and the fused train_step."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o, device = self.regime.in_features, self.regime.out_features, data.device
        if peer.family in ("eager", "compile"):
            dtype = BF16 if peer.eager_mode == "pure-bf16" else FP32
            self.module = nn.Linear(d, o, device=device, dtype=dtype)
            self.opt = torch.optim.SGD(self.module.parameters(), lr=self.regime.lr,
                                       fused=True if peer.sgd_fused else None)
            self.step = self._eager_step
            if peer.family == "compile":
                self.step = torch.compile(self._eager_step)
        else:
            self.module = FusedLinearRegressor(d, o, device=device, dtype=FP32, backend=peer.backend,
                                               input_precision=peer.precision)
            self.opt = FusedSGD(self.module.parameters(), lr=self.regime.lr, backend=peer.backend)
            self.step = self._fused_step
        self.reset()

    def _eager_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return eager_step(self.module, self.opt, xb, yb, self.peer.eager_mode)

    def _fused_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.module.train_step(xb, yb, self.opt)

    def check_epoch(self) -> tuple[list[float], list[torch.Tensor | None]]:
        order = self.data.check_order
        losses = [self.step(xb, yb) for xb, yb in self.data.batches(order)]
        return [float(torch.stack(losses).float().mean())], [order]

    def call(self) -> None:
        if self.regime.kind == "fit":
            for order in self._epoch_orders():
                for xb, yb in self._fit_batches(order):
                    self.last_loss = self.step(xb, yb)
        else:
            for xb, yb in self.data.call_batches(self._next_set()):
                self.last_loss = self.step(xb, yb)
        sync(self.data.device)

    def steady_unit(self) -> Unit:
        """One step: "fit" regimes gather a shuffled batch first (as ``call`` does); the others
        take the next batch of the input sets in turn."""
        x, t = self.data.x, self.data.t
        if self.regime.kind == "fit":
            orders = self._steady_orders()

            def unit() -> None:
                idx = next(orders)
                self.last_loss = self.step(x[idx], t[idx])
        else:
            batches = itertools.cycle([b for k in range(len(self.data.sets)) for b in self.data.call_batches(k)])

            def unit() -> None:
                self.last_loss = self.step(*next(batches))
        return unit, 1, STEADY_STEPS


class GraphRunner(Runner):
    """The eager step captured in CUDA graphs. "step" regimes: one graph per batch of each
    input set (each reads its batch in place, no copies), all sharing one memory pool
    (safe: they are replayed in the order they were captured, one at a time). "fit": one
    graph that gathers its rows through a static index buffer, refilled from each
    epoch's permutation."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o, device = self.regime.in_features, self.regime.out_features, data.device
        self.module = nn.Linear(d, o, device=device)
        self.opt = torch.optim.SGD(self.module.parameters(), lr=self.regime.lr)
        if self.regime.kind == "fit":
            self.index = torch.arange(self.regime.batch_size, device=device)
            steps = [lambda: (data.x.index_select(0, self.index), data.t.index_select(0, self.index))]
        else:
            steps = [lambda xb=xb, yb=yb: (xb, yb) for k in range(len(data.sets)) for xb, yb in data.call_batches(k)]
        # Warm up on a side stream (cuBLAS workspaces, optimizer state) before capture, as the
        # CUDA-graphs docs require.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for batch in steps:
                    self._step(*batch())
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.losses = [], []
        pool = None
        for batch in steps:
            graph = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
            with torch.cuda.graph(graph, pool=pool):
                loss = self._step(*batch(), zero_grad=False)
            pool = graph.pool() if pool is None else pool
            self.graphs.append(graph)
            self.losses.append(loss)
        self.per_set = 1 if self.regime.kind == "fit" else len(self.graphs) // len(data.sets)
        self.reset()

    def _step(self, xb: torch.Tensor, yb: torch.Tensor, zero_grad: bool = True) -> torch.Tensor:
        return eager_step(self.module, self.opt, xb, yb, self.peer.eager_mode, zero_grad)

    def check_epoch(self) -> tuple[list[float], list[torch.Tensor | None]]:
        losses = []
        if self.regime.kind == "fit":
            order = self.data.check_order
            for idx in order.split(self.regime.batch_size):
                self.index.copy_(idx)
                self.graphs[0].replay()
                losses.append(self.losses[0].clone())
        else:  # set 0's graphs, batches in row order; the next call starts at set 1, keeping the capture order
            order = None
            for graph, loss in zip(self.graphs[: self.per_set], self.losses[: self.per_set]):
                graph.replay()
                losses.append(loss.clone())
            self._calls = 1
        return [float(torch.stack(losses).float().mean())], [order]

    def call(self) -> None:
        if self.regime.kind == "fit":
            bs = self.regime.batch_size
            for order in self._epoch_orders():
                for s in range(0, self.regime.n_rows, bs):
                    self.index.copy_(order[s : s + bs])
                    self.graphs[0].replay()
            self.last_loss = self.losses[0]
        else:
            k = self._next_set()
            for graph in self.graphs[k * self.per_set : (k + 1) * self.per_set]:
                graph.replay()
            self.last_loss = self.losses[(k + 1) * self.per_set - 1]
        sync(self.data.device)

    def steady_unit(self) -> Unit:
        """One replay: "fit" regimes refill the index buffer first; the others replay the graphs in
        the order they were captured (their shared memory pool needs that order)."""
        if self.regime.kind == "fit":
            orders = self._steady_orders()

            def unit() -> None:
                self.index.copy_(next(orders))
                self.graphs[0].replay()
            self.last_loss = self.losses[0]
        else:
            graphs = itertools.cycle(self.graphs)

            def unit() -> None:
                next(graphs).replay()
            self.last_loss = self.losses[-1]
        return unit, 1, STEADY_STEPS


def dataloader_orders(n_rows: int, epochs: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """The row orders DataLoader(shuffle=True) draws from a generator seeded with ``seed``: the
    batches fit(..., seed=seed) trains on (fit promises DataLoader's batches; this is the oracle)."""
    loader = DataLoader(TensorDataset(torch.arange(n_rows)), batch_size=n_rows, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return [torch.cat([rows for (rows,) in loader]).to(device) for _ in range(epochs)]


class FusedFitRunner(Runner):
    """FusedLinearRegressor.fit: the persistent one-launch kernel when the problem fits one
    program (the tutorial), else one fused step per batch with rows gathered in the kernel
    (and, from 3 epochs on CUDA, an epoch replayed as a CUDA graph)."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o = self.regime.in_features, self.regime.out_features
        self.module = FusedLinearRegressor(d, o, device=data.device, backend=peer.backend)
        self.opt = FusedSGD(self.module.parameters(), lr=self.regime.lr, backend=peer.backend)
        self.reset()

    def check_epoch(self) -> tuple[list[float], list[torch.Tensor | None]]:
        epochs = 3 if self.regime.epochs >= 3 else 1
        history = self.module.fit(self.data.x, self.data.t, epochs=epochs, batch_size=self.regime.batch_size,
                                  optimizer=self.opt, shuffle=True, seed=CHECK_SEED, progress=False)
        return history, dataloader_orders(self.regime.n_rows, epochs, CHECK_SEED, self.data.device)

    def call(self) -> None:
        # The eager loop scans nothing for NaN either: check_finite=False.
        x, t = self.data.sets[self._next_set()]
        history = self.module.fit(x, t, epochs=self.regime.epochs, batch_size=self.regime.batch_size,
                                  optimizer=self.opt, shuffle=True, progress=False,
                                  check_finite=False)  # ends with a host read: synced
        self.last_loss = torch.tensor(history[-1])

    def steady_unit(self) -> Unit:
        """One fit call of 100 epochs ("fit" regimes: the training run itself), else of 3 epochs (the
        fewest that fit replays as a CUDA graph): many steps back to back and one host read at the
        end, which is fit's own synchronisation, so one call per round. The CPU regimes keep
        their own epochs (the interpreter is slow)."""
        if not self.regime.gpu:
            epochs = self.regime.epochs
        else:
            epochs = max(self.regime.epochs, STEADY_FIT_EPOCHS) if self.regime.kind == "fit" else 3
        x, t = self.data.x, self.data.t

        def unit() -> None:
            history = self.module.fit(x, t, epochs=epochs, batch_size=self.regime.batch_size, optimizer=self.opt,
                                      shuffle=True, progress=False, check_finite=False)
            self.last_loss = torch.tensor(history[-1])
        steps = epochs * -(-self.regime.n_rows // (self.regime.batch_size or self.regime.n_rows))
        return unit, steps, 1


class ForwardRunner(Runner):
    """Inference: one forward per call, on the next input set, under no_grad."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o, device = self.regime.in_features, self.regime.out_features, data.device
        if peer.family == "nn.Linear":
            self.module = nn.Linear(d, o, device=device)
        else:
            self.module = FusedLinearRegressor(d, o, device=device, backend=peer.backend)
        self.reset()

    @torch.no_grad()
    def forward_check(self) -> float:
        """Norm-relative error of the first set's output against float64."""
        ref = reference_forward(self.data)
        y = self.module(self.data.x)
        return float((y.double() - ref).norm() / ref.norm())

    @torch.no_grad()
    def call(self) -> None:
        self.last_loss = self.module(self.data.sets[self._next_set()][0])
        sync(self.data.device)

    def steady_unit(self) -> Unit:
        """One forward on the next input set."""
        sets = itertools.cycle([x for x, _ in self.data.sets])

        @torch.no_grad()
        def unit() -> None:
            self.last_loss = self.module(next(sets))
        return unit, 1, STEADY_STEPS


def make_runner(data: Data, peer: Peer) -> Runner:
    if peer.family in ("nn.Linear", "fused-forward"):
        return ForwardRunner(data, peer)
    if peer.family == "graph":
        return GraphRunner(data, peer)
    if peer.family == "fused-fit":
        return FusedFitRunner(data, peer)
    return StepLoopRunner(data, peer)
