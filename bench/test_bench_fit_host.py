"""pytest-benchmark, group "host": the host time of a whole ``fit`` call, kernels stubbed.

The launches are replaced by counting no-ops (the one-launch kernel at
TritonOps.fit_small, the per-batch step at fit_per_batch.fused_sgd_step, a
CUDA graph's replay, the device shuffle's sort), so what is timed is fit's
own Python: argument checks, the path choice, the row orders drawn on the
host, the report points, and its few small tensor ops (on the CPU they run
where a GPU would only queue them). The reference is the
tutorial's own loop (DataLoader + nn.Linear + F.mse_loss + optim.SGD, 100
epochs of 3 batches) timed in the same run: on this kind of machine absolute
times move with the load, the ratio much less. Each case reports µs per call,
the ratio to the loop and the launches per call; the figures are minima of
the rounds (the least disturbed run).

    pytest bench/test_bench_fit_host.py --benchmark-only --benchmark-columns=min,median
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import linreg_fused.fit_orders as fit_orders
import linreg_fused.fit_per_batch as fit_per_batch
import linreg_fused.train as train
from linreg_fused import FusedLinearRegressor, FusedSGD
from linreg_fused.backend import select_ops, triton_unavailable_reason
from linreg_fused.data import crop_yields

CPU = torch.device("cpu")
ROUNDS = 30
_LOOP: dict[str, float] = {}  # the tutorial loop's best seconds, for the ratios


def _best(fn: Callable[[], None], rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _record(benchmark, name: str, fn: Callable[[], None], launches: list[int],
            rounds: int = ROUNDS) -> tuple[float, list[int]]:
    """Times ``fn``; returns its best seconds and the launches of one call."""
    launches.clear()
    fn()
    per_call = list(launches)
    benchmark.group = "host"
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    best = _best(fn, rounds)
    loop = _LOOP.get("tutorial")
    benchmark.extra_info.update(case=name, best_us=best * 1e6, launches_per_call=len(per_call),
                                ratio_to_tutorial_loop=None if loop is None else best / loop)
    return best, per_call


def test_tutorial_loop_dataloader_nn_linear_sgd(benchmark):
    """The reference: the tutorial's fit, verbatim, on the CPU (its real arithmetic is tiny)."""
    x, y = crop_yields()

    def loop():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=1e-5)
        loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        for _ in range(100):
            for xb, yb in loader:
                loss = F.mse_loss(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()

    benchmark.group = "host"
    benchmark.pedantic(loop, rounds=5, iterations=1, warmup_rounds=1)
    _LOOP["tutorial"] = _best(loop, 5)
    benchmark.extra_info.update(case="tutorial loop", best_us=_LOOP["tutorial"] * 1e6)


@pytest.fixture
def stubbed(monkeypatch):
    """Counting no-ops for the launches; returns the list they append to."""
    reason = triton_unavailable_reason(CPU)
    if reason is not None:
        pytest.skip(reason)
    launches: list[int] = []
    ops_type = type(select_ops("triton", CPU))

    def fit_small(self, *args, history, **kwargs):  # the kernel writes every row: finite losses, finite weights
        launches.append(1)
        history.fill_(1.0)

    loss = torch.ones(())

    def step(*args, **kwargs):
        launches.append(2)  # the fused step: two launches
        return loss

    orders: dict[tuple[int, int], torch.Tensor] = {}

    def device_orders(n_rows, n_epochs, generator, device):  # two launches: random keys, their sort
        launches.append(3)
        if (n_rows, n_epochs) not in orders:
            orders[n_rows, n_epochs] = fit_orders.device_orders(n_rows, n_epochs, generator, device)
        return orders[n_rows, n_epochs]

    monkeypatch.setattr(ops_type, "fit_small", fit_small)
    monkeypatch.setattr(fit_per_batch, "fused_sgd_step", step)
    monkeypatch.setattr(train, "device_orders", device_orders)
    return launches


@pytest.mark.parametrize("shuffle", [True, "device"], ids=["dataloader-order", "device-shuffle"])
def test_tutorial_fit(benchmark, stubbed, shuffle):
    """The tutorial call: 15 rows, 3 -> 2, 100 epochs of 3 batches of 5, seeded: one launch."""
    x, y = crop_yields()
    model = FusedLinearRegressor(3, 2, backend="triton")

    def call():
        model.fit(x, y, epochs=100, batch_size=5, lr=1e-5, seed=0, shuffle=shuffle)

    best, launches = _record(benchmark, f"tutorial fit, {shuffle}", call, stubbed)
    assert launches == ([1] if shuffle is True else [3, 1])  # one launch for all 300 steps (and the shuffle's)
    loop = _LOOP.get("tutorial")
    if loop is not None:  # the whole call costs a small fraction of the loop it replaces
        assert best < 0.05 * loop, (best, loop)


@pytest.mark.parametrize("shuffle", [True, "device"], ids=["dataloader-order", "device-shuffle"])
def test_minibatch_fit_repeat_call(benchmark, stubbed, monkeypatch, shuffle):
    """A mini-batch fit called again on the same data (4096 rows, 16 -> 4, batch 256: 16 steps an epoch,
    10 epochs) with its CUDA graph kept: one replay per epoch (a no-op here). The data check is off
    (check_finite=False: on a GPU it is a pass over the data and a sync)."""
    monkeypatch.setattr(fit_per_batch, "graph_capture_possible", lambda *args: True)

    class Replay:
        def __init__(self, fn):
            pass

        def replay(self):
            stubbed.append(-1)

    class Graphed(fit_per_batch.GraphedEpochs):  # with the rows the replays would have written
        def __init__(self, *args):
            super().__init__(*args)
            self.history.fill_(1.0)

    monkeypatch.setattr(fit_per_batch, "graphed_epoch", Replay)
    monkeypatch.setattr(fit_per_batch, "GraphedEpochs", Graphed)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 16, generator=g), torch.randn(4096, 4, generator=g)
    model = FusedLinearRegressor(16, 4, backend="triton")
    opt = FusedSGD(model.parameters(), lr=1e-3, momentum=0.9, backend="triton")
    monkeypatch.setattr(type(select_ops("triton", CPU)), "fit_small_supported", lambda self, *args: False)

    def call():
        model.fit(x, y, epochs=10, batch_size=256, optimizer=opt, seed=0, shuffle=shuffle, check_finite=False)

    call()  # the first call: an eager epoch (it makes the momentum buffers), then capture
    _, launches = _record(benchmark, f"mini-batch fit, repeat call, {shuffle}", call, stubbed)
    # No eager epoch, no capture: one replay per epoch (after the shuffle's launches).
    assert launches == ([-1] * 10 if shuffle is True else [3] + [-1] * 10)
