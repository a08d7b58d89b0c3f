"""GPU check section: host time per call on the GPU machine's own CPU, and launches per call.

Host time: the wall time of the Python call while the GPU is busy, so that nothing waits for
it: torch.cuda._sleep(cycles) queues a spin of about 4x the calls' synced wall time, then
CALLS calls are timed on the host clock, then one synchronize. An event recorded after the
spin says whether the GPU was still busy when the calls returned; if not, the calls waited
for it (a host sync inside the call), and the row fails. Median of ROUNDS rounds.
Launches: torch.profiler (CUPTI) counts the kernels, copies and memsets one call puts on the
GPU (CPU smoke run: Triton launches through the interpreter; torch ops not counted).

Subjects, on the tutorial's batch (5 rows of 3 -> 2) and a mini-batch (1024 rows of 256 -> 16):
train_step, loss(..., optimizer=).backward(), FusedSGD.step() beside torch.optim.SGD(foreach)
.step(), the eager step (nn.Linear + F.mse_loss + backward + SGD, and with SGD(fused=True)), and
fit() per call (which syncs: its wall time and its kernels' GPU time are recorded instead).
The target (bench/targets.py): a fused step's host time <= 0.15x the eager step's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from check_ctx import Ctx

SECTION = "host"
ORDER = 70
BUDGET_S = 20.0
CALLS, ROUNDS = 20, 5
LAUNCH_APIS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
               "cudaMemsetAsync", "cudaGraphLaunch"}


def shapes(smoke: bool) -> dict[str, tuple[int, int, int, int]]:
    """name -> (rows of the data, D, O, batch)."""
    if smoke:
        return {"tutorial": (15, 3, 2, 5), "minibatch": (192, 24, 5, 64)}
    return {"tutorial": (15, 3, 2, 5), "minibatch": (65536, 256, 16, 1024)}


def subjects(n: int, d: int, o: int, batch: int, device: torch.device, smoke: bool
             ) -> list[tuple[str, bool, Callable[[], Any]]]:
    """(name, is a fused step, call) for one shape; every call leaves the queue to the GPU."""
    from linreg_fused import FusedLinearRegressor, FusedSGD

    g = torch.Generator(device=device).manual_seed(7)
    x, t = torch.randn(n, d, generator=g, device=device), torch.randn(n, o, generator=g, device=device)
    xb, tb = x[:batch], t[:batch]
    models = [FusedLinearRegressor(d, o, device=device) for _ in range(4)]
    opts = [FusedSGD(m.parameters(), lr=1e-4) for m in models]
    for p in models[2].parameters():
        p.grad = torch.randn_like(p)
    sgd_params = [p.detach().clone().requires_grad_() for p in models[2].parameters()]
    for p in sgd_params:
        p.grad = torch.randn_like(p)
    torch_sgd = torch.optim.SGD(sgd_params, lr=1e-4, foreach=True)
    eager = [nn.Linear(d, o, device=device) for _ in range(2)]
    eager_opts = [torch.optim.SGD(eager[0].parameters(), lr=1e-4),
                  torch.optim.SGD(eager[1].parameters(), lr=1e-4, fused=True)]

    def eager_step(i: int) -> None:
        eager_opts[i].zero_grad(set_to_none=True)
        F.mse_loss(eager[i](xb), tb).backward()
        eager_opts[i].step()

    epochs = 1 if smoke else 3 if n > 15 else 100  # the tutorial's whole fit; 3 epochs: fit's graphed epochs

    def fit() -> None:
        models[3].fit(x, t, epochs=epochs, batch_size=batch, optimizer=opts[3], progress=False, check_finite=False)

    return [("train_step", True, lambda: models[0].train_step(xb, tb, opts[0])),
            ("loss(optimizer=).backward()", True, lambda: models[1].loss(xb, tb, optimizer=opts[1]).backward()),
            ("FusedSGD.step()", False, opts[2].step),
            ("torch.optim.SGD(foreach=True).step()", False, torch_sgd.step),
            ("eager step", False, lambda: eager_step(0)),
            ("eager step, SGD(fused=True)", False, lambda: eager_step(1)),
            (f"fit() call, {epochs} epochs", False, fit)]


def sleep_cycles_per_ms() -> float:
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def host_us(ctx: Ctx, fn: Callable[[], Any], calls: int, rounds: int, cycles_per_ms: float | None
            ) -> tuple[float, list[float], bool]:
    """(median us per call, each round's, whether the GPU went idle before the calls returned)."""
    for _ in range(1 if ctx.smoke else 3):
        fn()
    ctx.sync()
    synced_ms = 0.0
    if cycles_per_ms:  # the calls' wall time with the GPU's work: more than their host time
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        ctx.sync()
        synced_ms = (time.perf_counter() - t0) * 1e3
    per_round, waited = [], []
    for _ in range(rounds):
        done = None
        if cycles_per_ms:
            torch.cuda._sleep(int(min(2000.0, max(20.0, 4 * synced_ms)) * cycles_per_ms))
            done = torch.cuda.Event()
            done.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round.append((time.perf_counter() - t0) / calls * 1e6)
        waited.append(bool(done is not None and done.query()))
        ctx.sync()
    clean = [v for v, w in zip(per_round, waited) if not w] or per_round
    return statistics.median(clean), per_round, any(waited)


def launches(ctx: Ctx, fn: Callable[[], Any], calls: int = 3) -> dict[str, Any]:
    """Kernels, copies and memsets per call (the CPU smoke run: Triton launches per call)."""
    if ctx.device.type != "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        original, count = InterpretedFunction.run, [0]

        def counting(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return original(*args, **kwargs)

        InterpretedFunction.run = counting
        try:
            for _ in range(calls):
                fn()
        finally:
            InterpretedFunction.run = original
        return {"launches_per_call": count[0] / calls, "launches_counted": "Triton launches (interpreter); torch ops not"}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    ctx.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        ctx.sync()
    kinds = {"kernels": 0, "memcpy": 0, "memset": 0, "launch_api_calls": 0}
    gpu_us = 0.0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            name = e.name.lower()
            kinds["memcpy" if "memcpy" in name else "memset" if "memset" in name else "kernels"] += 1
            gpu_us += e.time_range.elapsed_us()
        elif e.name in LAUNCH_APIS:
            kinds["launch_api_calls"] += 1
    return {"launches_per_call": kinds["kernels"] / calls, "memcpy_per_call": kinds["memcpy"] / calls,
            "memset_per_call": kinds["memset"] / calls, "launch_api_calls_per_call": kinds["launch_api_calls"] / calls,
            "gpu_us_per_call": gpu_us / calls,
            "launches_counted": "torch.profiler (CUPTI): kernels on the device; launch API calls on the host"}


def run(ctx: Ctx) -> None:
    cycles = sleep_cycles_per_ms() if ctx.device.type == "cuda" else None
    calls, rounds = (2, 1) if ctx.smoke else (CALLS, ROUNDS)
    method = ("wall time of the calls behind torch.cuda._sleep, one sync after" if cycles
              else "wall time of the calls (CPU: nothing runs behind them)")
    for regime, (n, d, o, batch) in shapes(ctx.smoke).items():
        for name, fused, fn in subjects(n, d, o, batch, ctx.device, ctx.smoke):
            label = f"{regime} {d}->{o} batch {batch} :: {name}"
            if ctx.left_s() < 1.0:
                ctx.skip(label, "the section's time budget is spent")
                continue
            with ctx.guard(label):
                is_fit = name.startswith("fit()")
                us, rounds_us, waited = host_us(ctx, fn, 1 if is_fit else calls, 1 if is_fit else rounds,
                                                None if is_fit else cycles)
                fields: dict[str, Any] = dict(regime=regime, peer=name, fused=fused, shape=f"{d}->{o} batch {batch}")
                try:
                    fields.update(launches(ctx, fn, 1 if is_fit or ctx.smoke else 3))
                except Exception as err:  # noqa: BLE001 -- the host time stands without the count
                    fields["launches_error"] = f"{type(err).__name__}: {err}"
                if is_fit:  # fit syncs at its end: its wall time, and what of it the GPU was busy
                    fields.update(wall_us_per_call=us, method="wall time of one call (fit synchronises)")
                    if fields.get("gpu_us_per_call") is not None:
                        fields["host_us"] = us - fields["gpu_us_per_call"]
                    ctx.record(label, status="ok", **fields)
                    continue
                fields.update(host_us=us, host_us_rounds=[round(v, 2) for v in rounds_us], calls=calls,
                              method=method, gpu_waited=waited)
                if waited:
                    fields["error"] = "the GPU went idle before the calls returned: a host sync inside the call"
                ctx.record(label, status="fail" if waited else "ok", **fields)
