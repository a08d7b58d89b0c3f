"""Median time of a callable, the one timer of the GPU check and its companions."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

LONG_CALL_MS = 100.0  # beyond this, do_bench's own 5-call estimate and warm-up would cost seconds
LONG_CALLS = 3


def bench_ms(fn: Callable[[], Any], device: torch.device, rep_ms: float = 200, warmup_ms: float = 25) -> float:
    """Median milliseconds of fn: triton.testing.do_bench on a GPU (CUDA events; it flushes the L2
    before each call); for a call longer than LONG_CALL_MS, the median of LONG_CALLS calls timed
    the same way (L2 flushed, CUDA events); a perf_counter median of 3 calls on the CPU."""
    if device.type == "cuda":
        import triton.testing

        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        if (time.perf_counter() - t0) * 1e3 > LONG_CALL_MS:
            return flushed_median_ms(fn, LONG_CALLS)
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flushed_median_ms(fn: Callable[[], Any], calls: int) -> float:
    """do_bench's method without its estimate loop: 256 MB written before each call to flush the
    L2, each call between two CUDA events; the median."""
    return events_median_ms(fn, calls, flush=torch.empty(256 << 20, dtype=torch.int8, device="cuda"))


def events_median_ms(fn: Callable[[], Any], calls: int, flush: torch.Tensor | None = None) -> float:
    """Median of `calls` calls of fn, each between two CUDA events (after zeroing `flush`, if given)."""
    times = []
    for _ in range(calls):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
