"""Fixtures for the pytest-benchmark suite in bench/.

Run from the repository root:

    pytest bench --benchmark-only                          # CPU: tiny shapes, reference + interpreter
    pytest bench --benchmark-only --benchmark-json out.json
    python bench/report.py out.json --out-dir bench/out    # Markdown table + plot

On a machine without CUDA the Triton kernels run in Triton's interpreter:
TRITON_INTERPRET must be set before linreg_fused's kernels are first
imported (jit decoration reads it), so it is set here, before any test
module imports linreg_fused -- the same rule as tests/conftest.py.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU shapes are tiny: one intra-op thread is the right setting for them, and on a
    # shared 2-core machine the default pool was seen to stall ~8 ms per op at random
    # (nn.Linear on 256x16 taking 8 ms instead of 12 us). LINREG_BENCH_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("LINREG_BENCH_THREADS", "1")))

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class BenchEnv:
    """Where the benchmarks run; copied into every result's extra_info."""

    device: torch.device
    on_gpu: bool
    device_name: str
    interpreter: bool
    torch_version: str
    triton_version: str | None

    def labels(self) -> dict[str, Any]:
        return {
            "device": self.device_name,
            "cpu": not self.on_gpu,
            "interpreter": self.interpreter,
            "torch": self.torch_version,
            "triton": self.triton_version,
            "cpu_threads": None if self.on_gpu else torch.get_num_threads(),
        }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _bench_env() -> BenchEnv:
    if ON_GPU:
        device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return BenchEnv(device, ON_GPU, name, interp, torch.__version__, _triton_version())


@pytest.fixture(scope="session")
def bench_env() -> BenchEnv:
    return _bench_env()


def measure_copy_bandwidth(device: torch.device) -> float:
    """Device copy ceiling in GB/s, counting bytes read + bytes written (as
    the project's performance brief does). GPU: 1 GiB device-to-device copy, median of
    CUDA-event timings. CPU: 64 MiB tensor copy, median wall time."""
    if device.type == "cuda":
        n_bytes = 1 << 30
        src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize(device)
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
    else:
        n_bytes = 64 << 20
        src = torch.rand(n_bytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times) / 1e9


@pytest.fixture(scope="session")
def copy_gbps(bench_env: BenchEnv) -> float:
    """Measured once per session: the ceiling that 'fraction of copy bandwidth' divides by."""
    return measure_copy_bandwidth(bench_env.device)


@pytest.fixture(scope="session")
def baseline_times() -> dict[str, float]:
    """group -> the eager baseline's seconds per step, filled as the baseline
    peer of each group finishes. Cases run in collection order and the
    baseline is listed first in every group, so the peers after it can
    record their speedup in extra_info; a run that deselects the baseline
    (e.g. with -k) leaves speedup None, and bench/report.py recomputes it
    from the JSON in any case."""
    return {}


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    """Put the accelerator and library versions into the JSON header, for report.py."""
    env = _bench_env()
    machine_info["linreg_fused_bench"] = env.labels()
    if env.on_gpu:
        props = torch.cuda.get_device_properties(env.device)
        machine_info["linreg_fused_bench"].update(
            cuda=torch.version.cuda, sm_count=props.multi_processor_count, gpu_memory_bytes=props.total_memory)
