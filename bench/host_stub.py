"""Host time of the fused steps without a GPU: Triton's own launch path against a stand-in driver.

``install()`` builds bench/fake_libcuda.c (a libcuda.so.1 whose calls succeed
and whose cuLaunchKernelEx only counts), makes Triton's NVIDIA driver the
active one, and lets linreg_fused run its Triton backend on CPU tensors with
an H200's launch plans. Kernels are compiled for sm_90 (Triton's cache keeps
them) and loaded; each launch runs all of the project's Python and all of
Triton's Python and C launch code, and stops at the driver call. Host memory
stands in for device memory, so nothing a kernel would write is written.

This must run in its own process, before linreg_fused's kernels are imported
and with TRITON_INTERPRET unset (jit decoration reads it): bench/host_cases.py
is that process. Needs a C compiler (Triton builds its launcher with one).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fake_libcuda.c"

# What the stand-in device reports (an H200), for the project's launch plans.
MULTIPROCESSORS = 132
SHARED_PER_BLOCK = 232448
SHARED_PER_SM = 233472


def unavailable_reason() -> str | None:
    """Why the stand-in driver cannot be built here, or None."""
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        return "no C compiler (Triton builds its launcher with one)"
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return "this Triton has no NVIDIA backend"
    return None


def _build_library() -> Path:
    """libcuda.so.1 built from fake_libcuda.c against Triton's cuda.h, cached by content."""
    import triton.backends.nvidia as nvidia

    include = Path(nvidia.__file__).parent / "include"
    digest = hashlib.sha256(SOURCE.read_bytes() + str(include).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"linreg-fused-fake-cuda-{os.getuid()}-{digest}"
    library = folder / "libcuda.so.1"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
        partial = folder / f"libcuda.{os.getpid()}.tmp"
        subprocess.check_call([cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", f"-I{include}",
                               str(SOURCE), "-o", str(partial)])
        partial.replace(library)  # atomic: a concurrent build finds a whole file or none
    return library


class FakeCuda:
    """The loaded stand-in driver: how many launches reached it, and the last one."""

    def __init__(self, library: Path) -> None:
        # Loaded first and globally: Triton's launcher, linked against libcuda.so.1, binds to it.
        self.lib = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
        self.lib.fake_cuda_launches.restype = ctypes.c_ulonglong

    def launches(self) -> int:
        return int(self.lib.fake_cuda_launches())

    def last_launch(self) -> dict[str, Any]:
        grid, block = (ctypes.c_uint * 3)(), (ctypes.c_uint * 3)()
        shared, function = ctypes.c_uint(), ctypes.c_ulonglong()
        self.lib.fake_cuda_last_launch(grid, block, ctypes.byref(shared), ctypes.byref(function))
        return {"grid": tuple(grid), "threads": block[0], "shared": shared.value, "function": function.value}


def install() -> FakeCuda:
    """Make Triton launch through the stand-in driver and linreg_fused plan for an H200 on CPU tensors."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("host_stub.install() needs TRITON_INTERPRET unset (run it in its own process)")
    if "linreg_fused.kernels.linear_mse_grad" in sys.modules:
        raise RuntimeError("host_stub.install() must run before linreg_fused's kernels are imported")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    library = _build_library()
    fake = FakeCuda(library)

    import triton
    from triton import knobs
    from triton.backends.nvidia.driver import CudaDriver

    knobs.nvidia.libcuda_path = str(library.parent)
    driver = CudaDriver()
    # torch here has no CUDA: the driver asks the stand-in for the device, stream and capability
    # (its torch-free path, as cheap as torch's C calls on a GPU machine).
    driver.get_current_device = driver._get_current_device
    driver.get_current_stream = driver._get_current_stream
    driver.get_device_capability = driver._get_device_capability
    triton.runtime.driver.set_active(driver)

    from linreg_fused import backend
    from linreg_fused.kernels import config

    h200 = config.DeviceProfile(gpu=True, multiprocessors=MULTIPROCESSORS, shared_per_block=SHARED_PER_BLOCK,
                                shared_per_sm=SHARED_PER_SM)
    backend.triton_unavailable_reason = lambda device: None  # Triton "runs" on these CPU tensors
    config.device_profile = lambda device: h200
    for name in ("linear_mse_grad", "reduce_update", "linear_forward", "step"):
        module = sys.modules.get(f"linreg_fused.kernels.{name}") or _import_kernel(name)
        if module is not None and hasattr(module, "device_profile"):
            module.device_profile = config.device_profile
    return fake


def _import_kernel(name: str):
    import importlib

    try:
        return importlib.import_module(f"linreg_fused.kernels.{name}")
    except ImportError:
        return None


# ---------------------------------------------------------------- measurements
def us_per_call(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """Minimum over ``repeats`` of the mean CPU time of ``calls`` back-to-back calls, in µs.

    CPU time of this thread (time.thread_time), not wall time: on a shared machine the wall
    clock also counts the time other jobs hold the core; the minimum, because load only adds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, time.thread_time() - t0)
    return best / calls * 1e6


def python_calls(fn: Callable[[], Any]) -> int:
    """Python function calls (frames entered) during one call of fn, fn's own frame excluded."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call":
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count - 1


def aten_ops_and_allocations(fn: Callable[[], Any]) -> tuple[int, int]:
    """(aten operator calls, nested ones included; operators that allocated memory) during one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::"))
    # The profiler charges each allocation to the operator that made it (self memory > 0); frees are negative.
    allocations = sum(1 for e in events if e.self_cpu_memory_usage > 0)
    return ops, allocations
