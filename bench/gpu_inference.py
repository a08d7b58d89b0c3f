"""GPU check section: inference, model(x) against nn.Linear on the inference regimes of
bench/regimes.py, in both views (cold do_bench, steady loop of 100 back-to-back forwards).

IEEE fp32 inference with D > 64 or O > 16 runs PyTorch's GEMM (kernels.config.forward_uses_library;
the kernel measured 0.38-0.62x nn.Linear there on the H200): each row says which route ran. The
goal is never slower than nn.Linear, and >= 80 % of copy where the kernel runs. nn.Linear is
timed before and after the fused peers: the slower of its two times is the bar, the spread
between them the run's noise (bench/targets.py).
"""

from __future__ import annotations

from dataclasses import replace

from check_ctx import Ctx
from gpu_regimes import time_peer
from regimes import FP32, Peer, Regime, peers_for, regimes_for

SECTION = "inference"
ORDER = 62
BUDGET_S = 15.0


def route(ctx: Ctx, regime: Regime, peer: Peer) -> str:
    """Which code computes model(x) for this regime: "GEMM" (PyTorch's), "kernel" (Triton's), or
    "reference" (the torch backend)."""
    if peer.family != "fused-forward":
        return "GEMM"
    if peer.backend == "torch":
        return "reference"
    if ctx.device.type != "cuda":
        return "kernel"
    try:
        from linreg_fused.backend import resolve_precision
        from linreg_fused.kernels.config import device_profile, forward_uses_library

        precision = resolve_precision(peer.precision, regime.dtype)
        library = forward_uses_library(regime.in_features, regime.out_features, device_profile(ctx.device),
                                       regime.dtype, FP32, precision)
    except Exception as err:  # noqa: BLE001 -- the timing stands; the route is then unknown
        return f"unknown ({type(err).__name__}: {err})"
    return "GEMM" if library else "kernel"


def run(ctx: Ctx) -> None:
    on_gpu = ctx.device.type == "cuda"
    for regime in [r for r in regimes_for(on_gpu) if r.kind == "inference"]:
        ctx.log(f"  -- {regime.group} ({regime.bytes_per_step / 1e6:.4g} MB per call)")
        linear, *fused = peers_for(regime, on_gpu)
        time_peer(ctx, regime, linear, route="GEMM")
        for peer in fused:
            time_peer(ctx, regime, peer, route=route(ctx, regime, peer))
        time_peer(ctx, regime, replace(linear, name="nn.Linear (again)", baseline=False), route="GEMM")
