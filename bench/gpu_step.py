"""GPU check section "step": the repeat-call path and the one-launch step (docs/host-path.md).

Parity first (bitwise where the design promises it, else against float64):
- the one-launch step (kernels/sgd_step.py) against the two-launch path, bitwise, over a few
  steps with momentum, for shapes where the rule picks one launch and forced where it does not;
  both against torch.optim.SGD in float64;
- the repeat path's cheap launches (kernels/launch.py) against the full path through the ops
  (Triton's own launch), bitwise, with aligned inputs and with x off 16-byte alignment;
- a learning rate read from a tensor against the same rate as a float, bitwise.
Then timing:
- host µs per call of train_step, loss(optimizer=).backward() and FusedSGD.step() while the GPU
  is kept busy (torch.cuda._sleep queued first), so only the Python and the launch calls count;
- steady-state steps (ctx.steady) of train_step with one launch and with two, and of the eager
  nn.Linear + F.mse_loss + backward + optim.SGD step beside them.

Runs in the smoke mode on the CPU (Triton's interpreter, tiny shapes; host timing skipped).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD, backend, step_cache

SECTION = "step"
ORDER = 55  # after the parity sections: its own parity rows come first within it

SHAPES = {"tutorial": (5, 3, 2), "odd": (37, 5, 3), "minibatch": (1024, 256, 16)}
SMOKE_SHAPES = {"tutorial": (5, 3, 2), "odd": (37, 5, 3)}


def _data(n, d, o, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g).to(device), torch.randn(n, o, generator=g).to(device)) for _ in range(4)]


def _fused(d, o, device, **sgd):
    torch.manual_seed(0)
    model = FusedLinearRegressor(d, o, backend="triton", device=device)
    return model, FusedSGD(model.parameters(), backend="triton", **sgd)


def _run(d, o, batches, device, launches, repeat=True, **sgd):
    """Parameters after train_step over the batches, with STEP_LAUNCHES = launches; repeat=False
    sends every call through the ops (the full path)."""
    saved, real = backend.STEP_LAUNCHES, step_cache.try_step
    backend.STEP_LAUNCHES = launches
    if not repeat:
        step_cache.try_step = lambda *args: None
    try:
        model, opt = _fused(d, o, device, **sgd)
        for x, t in batches:
            model.train_step(x, t, opt)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    finally:
        backend.STEP_LAUNCHES, step_cache.try_step = saved, real


def _float64(d, o, batches, device, **sgd):
    torch.manual_seed(0)
    ref = nn.Linear(d, o, device=device)
    ref = ref.double()
    opt = torch.optim.SGD(ref.parameters(), **sgd)
    for x, t in batches:
        opt.zero_grad()
        F.mse_loss(ref(x.double()), t.double()).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in ref.parameters()])


def _parity(ctx) -> None:
    sgd = dict(lr=0.05, momentum=0.9)
    for name, (n, d, o) in (SMOKE_SHAPES if ctx.smoke else SHAPES).items():
        batches = _data(n, d, o, ctx.device)
        one, two = _run(d, o, batches, ctx.device, 1, **sgd), _run(d, o, batches, ctx.device, 2, **sgd)
        full = _run(d, o, batches, ctx.device, "auto", repeat=False, **sgd)
        ref = _float64(d, o, batches, ctx.device, **sgd)
        ctx.parity(f"{name}: one launch == two launches (bitwise)", one, two.double(), 0.0, shape=(n, d, o))
        ctx.parity(f"{name}: repeat path == ops path (bitwise)", _run(d, o, batches, ctx.device, "auto", **sgd),
                   full.double(), 0.0, shape=(n, d, o))
        ctx.parity(f"{name}: one launch vs float64 SGD", one, ref, 1e-4, shape=(n, d, o))
    # x off 16-byte alignment (a view one float into its storage): Triton specialises on alignment.
    n, d, o = SMOKE_SHAPES["odd"]
    base = _data(n + 1, d, o, ctx.device, seed=1)
    batches = [(x.reshape(-1)[1:1 + n * d].view(n, d), t[:n]) for x, t in base]
    ctx.parity("misaligned x: repeat path == ops path (bitwise)", _run(d, o, batches, ctx.device, "auto", **sgd),
               _run(d, o, batches, ctx.device, "auto", repeat=False, **sgd).double(), 0.0)
    # A tensor learning rate, read by the kernels, against the same rate as a float.
    batches = _data(n, d, o, ctx.device, seed=2)
    rate = torch.tensor(0.05, device=ctx.device)
    ctx.parity("tensor lr == float lr (bitwise)", _run(d, o, batches, ctx.device, "auto", lr=rate, momentum=0.9),
               _run(d, o, batches, ctx.device, "auto", lr=float(rate), momentum=0.9).double(), 0.0)


def _host_us(ctx, name: str, call, calls: int = 200) -> None:
    """Host µs per call while the GPU is busy: the launches queue behind a long sleep kernel."""
    for _ in range(5):
        call()
    torch.cuda.synchronize(ctx.device)
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU time: the calls below never wait for the GPU
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize(ctx.device)
    ctx.record(f"host µs per call: {name}", us_per_call=host, calls=calls, gpu_busy=True)


def _timing(ctx) -> None:
    if ctx.smoke or ctx.device.type != "cuda":
        ctx.skip("host µs per call and steady-state steps", "needs a CUDA GPU (not the smoke run)")
        return
    for name, (n, d, o) in SHAPES.items():
        if ctx.left_s() < 60:
            ctx.skip(f"timing {name}", "little time left")
            return
        x, t = _data(n, d, o, ctx.device)[0]
        model, opt = _fused(d, o, ctx.device, lr=1e-3)
        _host_us(ctx, f"train_step {name}", lambda: model.train_step(x, t, opt))
        _host_us(ctx, f"loss(optimizer=).backward() {name}", lambda: model.loss(x, t, optimizer=opt).backward())
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        _host_us(ctx, f"FusedSGD.step() {name}", opt.step)
        for launches in (1, 2):
            saved = backend.STEP_LAUNCHES
            backend.STEP_LAUNCHES = launches
            try:
                model, opt = _fused(d, o, ctx.device, lr=1e-3)
                ctx.steady(f"train_step {name}, {launches} launch(es)", lambda: model.train_step(x, t, opt), n=200,
                           bytes=n * (d + o) * 4, launches=launches)
            finally:
                backend.STEP_LAUNCHES = saved
        ref = nn.Linear(d, o, device=ctx.device)
        sgd = torch.optim.SGD(ref.parameters(), lr=1e-3)

        def eager():
            loss = F.mse_loss(ref(x), t)
            loss.backward()
            sgd.step()
            sgd.zero_grad()

        ctx.steady(f"eager step {name} (nn.Linear+F.mse_loss+SGD)", eager, n=200, bytes=n * (d + o) * 4)


def run(ctx) -> None:
    _parity(ctx)
    _timing(ctx)
