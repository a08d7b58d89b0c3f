"""Median time of a callable, the one timer of the GPU check and its companions."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def bench_ms(fn: Callable[[], Any], device: torch.device, rep_ms: float = 200, warmup_ms: float = 25) -> float:
    """Median milliseconds of fn: triton.testing.do_bench on a GPU (CUDA events; it flushes
    the L2 before each call); a perf_counter median of 3 calls on the CPU smoke run."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
