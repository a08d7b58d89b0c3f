"""GPU check section: every training regime of bench/regimes.py against its peers, in both views.

Per peer (fused, eager, SGD(fused=True), CUDA-graphed eager, torch.compile; fp32 and bf16):
a first call (its compile time: first_call_s), the shuffled-epoch check against float64
(bench/harness.py; a peer that fails it is not timed), peak memory over one call, then

  cold    ctx.time: triton.testing.do_bench median of one call, L2 flushed before each;
  steady  ctx.steady: 100 back-to-back steps (fit: one fit call of 100 epochs, many steps and
          fit's own single sync), one synchronize at the end, no flush: what a training loop sees.

The torch.compile peers come last (their compile is the cost: each starts only with
COMPILE_NEED_S of the section left, and all of them together get COMPILE_BUDGET_S of first-call
time). warm() runs in the parallel phase, in WARM_SHARDS processes: one call of every fused and
torch.compile peer, so that Triton's and Inductor's on-disk caches are filled before the
timings. Inference regimes are bench/gpu_inference.py's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from check_ctx import Ctx
from harness import check_against_reference, data_for, peak_extra_bytes, unavailable_reason
from parity import poison_allocator
from regimes import FP32, Peer, Regime, peers_for, regimes_for, skip_reason
from runners import make_runner

SECTION = "regimes"
ORDER = 60
BUDGET_S = 110.0
WARM_SHARDS = 3
COMPILE_NEED_S = 20.0  # a torch.compile peer starts only with this much of the section left
COMPILE_BUDGET_S = 45.0  # the torch.compile peers' first calls (their compiles) together
PEER_NEED_S = 3.0


def rep_ms_for(call_ms: float) -> float:
    """do_bench's measuring time: about 5 calls, 200 ms to 1 s."""
    return min(1000.0, max(200.0, 5 * call_ms))


def peer_fields(regime: Regime, peer: Peer) -> dict[str, Any]:
    """What every row of this peer carries (bench/targets.py reads these)."""
    precision = resolved = None
    if peer.is_fused:
        from linreg_fused.backend import resolve_precision

        precision, resolved = peer.precision, resolve_precision(peer.precision, regime.dtype)
    return dict(regime=regime.group, regime_name=regime.name, regime_kind=regime.kind, peer=peer.name,
                family=peer.family, baseline=peer.baseline, dtype=regime.dtype_name, shape=regime.shape,
                batch=regime.batch_size, backend=peer.backend if peer.is_fused else "torch", precision=precision,
                resolved_precision=resolved, bytes_per_step=regime.bytes_per_step, flops_per_step=regime.flops_per_step)


def cases(ctx: Ctx, kind: str) -> list[tuple[Regime, Peer]]:
    """The (regime, peer) pairs of this run: kind "timed" (all but the inference regimes) or
    "warm" (those whose first call compiles: Triton peers and torch.compile peers, these first)."""
    on_gpu = ctx.device.type == "cuda"
    out = [(r, p) for r in regimes_for(on_gpu) if r.kind != "inference" for p in peers_for(r, on_gpu)]
    if kind == "warm":
        out = [(r, p) for r, p in out if skip_reason(r, p, on_gpu) is None
               and ((p.is_fused and p.backend == "triton")
                    or (p.family == "compile" and not ctx.options.get("skip_compile")))]
        out.sort(key=lambda case: case[1].family != "compile")
    return out


def warm(ctx: Ctx) -> None:
    """One call of this shard's share of the peers that compile something."""
    i, k = ctx.shard
    mine = cases(ctx, "warm")[i::k]
    for regime, peer in mine[:1] if ctx.smoke else mine:  # the smoke run: the interpreter compiles nothing
        name = f"warm {regime.group} :: {peer.name}"
        need = COMPILE_NEED_S if peer.family == "compile" else PEER_NEED_S
        if ctx.left_s() < need:
            ctx.skip(name, f"time budget ({ctx.left_s():.0f} s left, this needs ~{need:.0f} s)")
            continue
        t0 = time.perf_counter()
        with ctx.guard(name):
            make_runner(data_for(regime, ctx.device), peer).call()
            ctx.record(name, status="ok", seconds=round(time.perf_counter() - t0, 2))


def time_peer(ctx: Ctx, regime: Regime, peer: Peer, **extra: Any) -> float:
    """Check, then both views (extra: more fields for its rows). Returns the first call's seconds
    (0 when not run)."""
    name = f"{regime.group} :: {peer.name}"
    fields = {**peer_fields(regime, peer), **extra}
    reason = skip_reason(regime, peer, ctx.device.type == "cuda") or unavailable_reason(peer, ctx.device)
    if reason or ctx.left_s() < PEER_NEED_S:
        ctx.skip(name, reason or f"time budget ({ctx.left_s():.0f} s left)")
        return 0.0
    first_call_s = 0.0
    with ctx.guard(name, **fields):
        runner = make_runner(data_for(regime, ctx.device), peer)
        t0 = time.perf_counter()
        runner.call()  # JIT (a cache hit after warm()), compile, cuBLAS handles
        first_call_s = time.perf_counter() - t0
        poison_allocator(ctx.device)
        try:
            check = check_against_reference(runner)
        except AssertionError as err:
            ctx.record(name, status="fail", error=f"not timed: {err}", **fields)
            return first_call_s
        t0 = time.perf_counter()
        peak, peak_extra = peak_extra_bytes(runner)  # one call (GPU)
        if peak is None and not ctx.smoke:
            runner.call()
        call_ms = (time.perf_counter() - t0) * 1e3  # sizes do_bench's measuring time
        spc = regime.steps_per_call
        ctx.time(f"{name} [cold]", runner.call, bytes=regime.bytes_per_step * spc, flops=regime.flops_per_step * spc,
                 steps=spc, rep_ms=rep_ms_for(call_ms), first_call_s=round(first_call_s, 3), peak_mem_bytes=peak,
                 peak_extra_bytes=peak_extra, **check, **fields)
        unit, steps, n = runner.steady_unit()
        ctx.steady(f"{name} [steady]", unit, n=n, bytes=regime.bytes_per_step * steps, steps=steps, **fields)
        last = runner.last_loss
        if last is None or not bool(torch.isfinite(torch.as_tensor(last)).all()):
            ctx.record(f"{name} [after timing]", status="fail", error="non-finite loss after timing", **fields)
    return first_call_s


def run(ctx: Ctx) -> None:
    compile_later = []
    current = None
    for regime, peer in cases(ctx, "timed"):
        if regime.group != current:
            current = regime.group
            ctx.log(f"  -- {regime.group} ({regime.bytes_per_step / 1e6:.4g} MB per step)")
        if peer.family == "compile":
            compile_later.append((regime, peer))
            continue
        time_peer(ctx, regime, peer)
    ctx.log("  -- torch.compile peers (fp32 regimes first)")
    spent = 0.0
    for regime, peer in sorted(compile_later, key=lambda case: case[0].dtype != FP32):
        name = f"{regime.group} :: {peer.name}"
        if ctx.options.get("skip_compile"):
            ctx.skip(name, "--skip-compile")
        elif spent > COMPILE_BUDGET_S:
            ctx.skip(name, f"the torch.compile peers' compile-time budget ({COMPILE_BUDGET_S:.0f} s) is spent")
        elif ctx.left_s() < COMPILE_NEED_S and skip_reason(regime, peer, ctx.device.type == "cuda") is None:
            ctx.skip(name, f"time budget ({ctx.left_s():.0f} s left, a torch.compile peer needs ~{COMPILE_NEED_S:.0f} s)")
        else:
            spent += time_peer(ctx, regime, peer)
    if spent:
        ctx.record("torch.compile peers: first calls together", seconds=round(spent, 1))
