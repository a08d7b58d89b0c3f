"""GPU-check section "fit": fit's parity against the tutorial's eager loop and its speed per step.

Parity (float64, fresh data): the tutorial fit (one launch) and a mini-batch fit
(per-batch steps, CUDA-graphed on a GPU) against nn.Linear + F.mse_loss +
optim.SGD over the same DataLoader batches, on the model's final weights.

Timing: the tutorial fit (15 rows, 3 -> 2, 100 epochs of 3 batches) per step with
DataLoader's order and with shuffle="device"; a mini-batch fit (65536 x 256 -> 16,
batch 1024, 5 epochs) per step on its first call (an eager epoch, then capture)
and on a repeat call (the kept graph); the host's ms per call with the launches
replaced by counting no-ops (what fit's own Python costs), and the mini-batch
repeat call's host share of its wall time (a prediction said <= 5%).
On the CPU smoke run (ctx.smoke) the shapes are tiny and nothing is a GPU figure.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SECTION = "fit"
ORDER = 60  # parity and timing in one; after the parity sections


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Best wall time of ``fn`` (synced before and after), in ms."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _eager_loop(linear: nn.Linear, x, y, epochs: int, batch_size: int, lr: float, seed: int) -> nn.Linear:
    """The tutorial's loop in float64 over DataLoader's batches (drawn on the CPU, as fit draws them)."""
    ref = nn.Linear(linear.in_features, linear.out_features, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        ref.weight.copy_(linear.weight)
        ref.bias.copy_(linear.bias)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    rows = TensorDataset(torch.arange(x.shape[0]))
    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for (index,) in loader:
            index = index.to(x.device)
            loss = F.mse_loss(ref(x[index].double()), y[index].double())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ref


def _parity(ctx, name: str, n: int, d: int, o: int, epochs: int, batch_size: int, lr: float) -> None:
    from linreg_fused import FusedLinearRegressor

    g = torch.Generator().manual_seed(hash(name) % 2**31)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(ctx.device)
    y = (x.cpu() @ torch.randn(o, d, generator=g, dtype=torch.float64).t()
         + 0.1 * torch.randn(n, o, generator=g, dtype=torch.float64)).to(ctx.device)
    linear = nn.Linear(d, o, dtype=torch.float64, device=ctx.device)
    model = FusedLinearRegressor.from_linear(linear)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=11, check_finite=False)
    ref = _eager_loop(linear, x, y, epochs, batch_size, lr, 11)
    got = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    want = torch.cat([ref.weight.detach().reshape(-1), ref.bias.detach()])
    ctx.parity(name, got, want, 1e-12, shape=f"{n}x{d}->{o}", batch_size=batch_size, epochs=epochs, dtype="float64")


@contextlib.contextmanager
def _stubbed_launches():
    """fit's launches as no-ops (the one-launch kernel, the per-batch step, a graph replay, the device
    shuffle's sort), as bench/test_bench_fit_host.py does: what is left is fit's own host work."""
    import linreg_fused.fit_orders as fit_orders
    import linreg_fused.fit_per_batch as fit_per_batch
    import linreg_fused.train as train
    from linreg_fused.backend import TritonOps

    saved = [(TritonOps, "fit_small"), (fit_per_batch, "fused_sgd_step"), (fit_per_batch, "GraphedEpochs"),
             (train, "device_orders")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in saved]
    one = {}

    def fit_small(self, *args, history, **kwargs):
        history.fill_(1.0)

    def step(x, *args, **kwargs):
        return one.setdefault(x.device, torch.ones((), device=x.device))

    class Replayed(fit_per_batch.GraphedEpochs):
        def __init__(self, path, capacity):
            super().__init__(path, capacity)
            self.history.fill_(1.0)
            self.graph = type("NoReplay", (), {"replay": staticmethod(lambda: None)})()

    orders = {}

    def device_orders(n_rows, n_epochs, generator, device):
        key = (n_rows, n_epochs, device)
        return orders[key] if key in orders else orders.setdefault(key, fit_orders.device_orders(
            n_rows, n_epochs, generator, device))

    TritonOps.fit_small, fit_per_batch.fused_sgd_step = fit_small, step
    fit_per_batch.GraphedEpochs, train.device_orders = Replayed, device_orders
    fit_per_batch._GRAPHS.clear()  # a kept graph of the real steps would replay them
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        fit_per_batch._GRAPHS.clear()


def run(ctx) -> None:
    from linreg_fused import FusedLinearRegressor, FusedSGD
    from linreg_fused.data import crop_yields

    device, smoke = ctx.device, ctx.smoke
    _parity(ctx, "tutorial fit (one launch) vs DataLoader loop, float64", 15, 3, 2, 20 if smoke else 100, 5, 1e-3)
    if smoke:  # 32 x 32 x 16 per batch: more than one program holds, so per-batch steps
        _parity(ctx, "mini-batch fit vs DataLoader loop, float64", 70, 32, 16, 2, 32, 0.01)
    else:
        _parity(ctx, "mini-batch fit (CUDA-graphed) vs DataLoader loop, float64", 8192, 64, 8, 3, 512, 0.01)

    # ---------------------------------------------------------------- the tutorial fit per step
    x, y = crop_yields(device=device)
    epochs = 10 if smoke else 100
    steps = epochs * 3
    model = FusedLinearRegressor(3, 2, device=device)
    for shuffle, label in ((True, "DataLoader order"), ("device", "device shuffle")):
        call = lambda: model.fit(x, y, epochs=epochs, batch_size=5, lr=1e-5, seed=0, shuffle=shuffle,  # noqa: E731
                                 check_finite=False)
        call()  # compiles
        ms = _wall_ms(call, device, repeats=1 if smoke else 20)
        ctx.record(f"tutorial fit per step, {label}", us_per_step=ms * 1e3 / steps, ms_per_call=ms, steps=steps,
                   timing="best wall time of a call, synced")
        with _stubbed_launches():
            host = _wall_ms(call, device, repeats=3 if smoke else 50)
        ctx.record(f"tutorial fit host per call, {label}", host_ms=host, timing="launches stubbed, best of calls")

    # ---------------------------------------------------------------- mini-batch fit: first and repeat call
    if not smoke and ctx.left_s() < 60:
        ctx.skip("mini-batch fit per step", f"{ctx.left_s():.0f} s left")
        return
    n, d, o, batch, epochs = (64, 8, 2, 16, 3) if smoke else (65536, 256, 16, 1024, 5)
    g = torch.Generator().manual_seed(0)
    xm, ym = torch.randn(n, d, generator=g).to(device), torch.randn(n, o, generator=g).to(device)
    steps = epochs * -(-n // batch)
    for shuffle, label in ((True, "DataLoader order"), ("device", "device shuffle")):
        net = FusedLinearRegressor(d, o, device=device)
        opt = FusedSGD(net.parameters(), lr=1e-4, momentum=0.9)
        call = lambda: net.fit(xm, ym, epochs=epochs, batch_size=batch, optimizer=opt, seed=0,  # noqa: E731
                               shuffle=shuffle, check_finite=False)
        first = _wall_ms(call, device)
        repeat = _wall_ms(call, device, repeats=1 if smoke else 5)
        ctx.record(f"mini-batch fit per step, first call, {label}", us_per_step=first * 1e3 / steps, ms_per_call=first,
                   shape=f"{n}x{d}->{o}", batch_size=batch, epochs=epochs, note="eager epoch and capture included")
        ctx.record(f"mini-batch fit per step, repeat call, {label}", us_per_step=repeat * 1e3 / steps,
                   ms_per_call=repeat, shape=f"{n}x{d}->{o}", batch_size=batch, epochs=epochs,
                   note="the kept CUDA graph replayed" if device.type == "cuda" else "eager (no CUDA)")
        with _stubbed_launches():
            call()  # the stubbed graph is captured once, then kept
            host = _wall_ms(call, device, repeats=3 if smoke else 20)
        ctx.record(f"mini-batch fit host per call, {label}", host_ms=host, host_share_of_repeat_call=host / repeat,
                   prediction="<= 0.05 with the device shuffle")
