"""What the GPU check (bench/gpu_check.py) learns before its sections run: which linreg_fused it
imported, the versions and the card, and the ceilings measured in the same run (device copy,
pinned host-to-device copy, IEEE fp32 / tf32 / bf16 matrix-product rates). Also the launch
signatures of a CPU smoke run and the --compile-only dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


# ------------------------------------------------------------------ which linreg_fused
def _map_source_tree() -> None:
    """Import linreg_fused from this checkout's source tree, with kernels/ as linreg_fused.kernels
    (what pyproject.toml's package-dir mapping does on install)."""
    def package(name: str, folder: Path) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        return module

    root_pkg, kernels = package("linreg_fused", ROOT / "linreg_fused"), package("linreg_fused.kernels", ROOT / "kernels")
    root_pkg.kernels = kernels
    kernels.__spec__.loader.exec_module(kernels)
    root_pkg.__spec__.loader.exec_module(root_pkg)


def import_project() -> str:
    """Import linreg_fused from THIS checkout: the installed package when it points here (the
    documented command installs it in editable mode), else this source tree directly.
    Returns how it was found."""
    spec = importlib.util.find_spec("linreg_fused")
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent.parent == ROOT:
        how = "installed (editable, this checkout)"
    else:
        _map_source_tree()
        how = "this source tree (" + ("not installed" if spec is None else f"an install at {spec.origin} ignored") + ")"
    import linreg_fused.kernels

    for module, folder in ((linreg_fused, "linreg_fused"), (linreg_fused.kernels, "kernels")):
        if Path(module.__file__).resolve().parent != ROOT / folder:
            raise RuntimeError(f"{module.__name__} was imported from {module.__file__}, not from {ROOT / folder}")
    return how


# ------------------------------------------------------------------ versions and the card
def triton_cache_dir() -> Path:
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):
        return Path.home() / ".triton" / "cache"


def compiled_kernel_count() -> int | None:
    """Kernel binaries in Triton's on-disk cache (one per compiled specialization); None without a GPU."""
    if not torch.cuda.is_available():
        return None
    root = triton_cache_dir()
    return sum(1 for _ in root.rglob("*.cubin")) if root.is_dir() else 0


def versions(device: torch.device, import_how: str) -> dict[str, Any]:
    import triton

    import linreg_fused

    meta: dict[str, Any] = {
        "mode": "gpu" if device.type == "cuda" else "cpu-smoke", "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda_runtime": torch.version.cuda,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "linreg_fused": linreg_fused.__version__, "linreg_fused_import": import_how,
        "linreg_fused_path": str(Path(linreg_fused.__file__).parent), "triton_cache_dir": str(triton_cache_dir()),
        "triton_kernels_in_cache_at_start": compiled_kernel_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=props.name, sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", l2_bytes=getattr(props, "L2_cache_size", None))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.sm,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            meta["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
            meta["driver"] = meta["nvidia_smi"].split(",")[0].strip()
        except Exception as err:  # noqa: BLE001 -- the figures stand without it
            meta["nvidia_smi"] = f"unavailable ({err})"
    else:
        meta.update(gpu=None, cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                    triton_interpret=os.environ.get("TRITON_INTERPRET"))
    return meta


# ------------------------------------------------------------------ ceilings
def _event_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median of CUDA-event timings of fn (one warm-up call first)."""
    from timing import events_median_ms

    fn()
    return events_median_ms(fn, repeats)


def copy_ceiling(device: torch.device) -> dict[str, Any]:
    """Device-to-device copy of 1 GiB (CPU smoke: 64 MiB), counting bytes read + written."""
    from timing import bench_ms

    n_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, rep_ms=300)
    del src, dst
    return {"name": f"device copy {n_bytes >> 20} MiB", "ms": ms, "gbps": 2 * n_bytes / (ms * 1e-3) / 1e9}


def h2d_ceiling(device: torch.device) -> dict[str, Any]:
    """Pinned host memory to the device, 512 MiB (bytes moved once), CUDA events."""
    n_bytes = 512 << 20
    host = torch.empty(n_bytes // 4, pin_memory=True).uniform_()
    dev = torch.empty(n_bytes // 4, device=device)
    ms = _event_ms(lambda: dev.copy_(host, non_blocking=True))
    pageable = host.clone()  # the same bytes from ordinary (pageable) memory: what a NumPy array is
    ms_pageable = _event_ms(lambda: dev.copy_(pageable), repeats=3)
    del host, dev, pageable
    return {"name": "host-to-device copy 512 MiB (pinned)", "ms": ms, "gbps": n_bytes / (ms * 1e-3) / 1e9,
            "pageable_gbps": n_bytes / (ms_pageable * 1e-3) / 1e9}


def matmul_ceiling(device: torch.device, mode: str) -> dict[str, Any]:
    """An 8192³ matrix product on random data through PyTorch: "ieee" (fp32, IEEE FMAs, the SGEMM
    rate the FMA floor of IEEE fp32 steps is counted at), "tf32" (fp32 on tensor cores) or "bf16"."""
    from timing import bench_ms

    n = 8192
    before = torch.get_float32_matmul_precision()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    try:
        torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
        ms = bench_ms(lambda: torch.mm(a, b), device, rep_ms=200)
    finally:
        torch.set_float32_matmul_precision(before)
    del a, b
    return {"name": f"matmul {n}^3 {mode}", "ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def measure_ceilings(device: torch.device, record: Callable[[str, dict[str, Any] | None, str | None], None]
                     ) -> dict[str, float | None]:
    """Every ceiling, each on its own (one that fails is recorded and left None).
    record(key, result or None, error or None) makes its row."""
    ceilings: dict[str, float | None] = {"copy_gbps": None, "h2d_gbps": None, "h2d_pageable_gbps": None,
                                         "sgemm_tflops": None, "tf32_tflops": None, "bf16_tflops": None}
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [("copy_gbps", lambda: copy_ceiling(device))]
    if device.type == "cuda":
        jobs += [("h2d_gbps", lambda: h2d_ceiling(device))]
        jobs += [(f"{mode if mode != 'ieee' else 'sgemm'}_tflops", lambda m=mode: matmul_ceiling(device, m))
                 for mode in ("ieee", "tf32", "bf16")]
    for key, job in jobs:
        try:
            result = job()
        except Exception as err:  # noqa: BLE001 -- a missing ceiling leaves its targets unevaluated
            record(key, None, f"{type(err).__name__}: {err}")
            continue
        ceilings[key] = result.get("gbps", result.get("tflops"))
        if "pageable_gbps" in result:
            ceilings["h2d_pageable_gbps"] = result["pageable_gbps"]
        record(key, result, None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ceilings


# ------------------------------------------------------------------ CPU smoke: launch signatures
class LaunchSignatures:
    """--cpu-smoke: the distinct kernel specializations that the run's launches would compile on
    a GPU, by Triton's JIT rules (constexpr values, each tensor's dtype and 16-byte alignment,
    each int's == 1 and % 16 == 0), counted from the interpreter's launches in this process (the
    interpreter uses its own block sizes, so this is the count at CPU configurations)."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()
        self.launches = 0
        self._constexprs: dict[Any, set[str]] = {}

    def install(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        original, signatures = InterpretedFunction.run, self

        def run(fn_self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            signatures.add(fn_self, args, kwargs)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def add(self, fn: Any, args: tuple, kwargs: dict) -> None:
        import inspect

        self.launches += 1
        if fn.fn not in self._constexprs:
            params = inspect.signature(fn.fn).parameters.values()
            self._constexprs[fn.fn] = {p.name for p in params if "constexpr" in str(p.annotation)}
        constexprs = self._constexprs[fn.fn]

        def spec(name: str, value: Any) -> Any:
            if name in constexprs or name not in fn.arg_names:
                return (name, repr(value))
            if isinstance(value, torch.Tensor):
                return (name, str(value.dtype), value.data_ptr() % 16 == 0)
            if isinstance(value, bool) or value is None:
                return (name, value)
            if isinstance(value, int):
                return (name, "i", value == 1, value % 16 == 0)
            return (name, type(value).__name__)

        self.seen.add((fn.fn.__module__, fn.fn.__name__, tuple(spec(n, v) for n, v in zip(fn.arg_names, args)),
                       tuple(sorted(spec(n, v) for n, v in kwargs.items()))))


# ------------------------------------------------------------------ --compile-only
def compile_only(outdir: Path) -> int:
    """No GPU: every launch shape this run makes (the regimes and the parity shapes) written to
    OUTDIR/launch_shapes.json; then the compile report (bench/compile_report.py, the project's one
    compiler driver) compiles every regime's launches for sm_90 at the configurations the launch
    helpers pick. The parity shapes are listed, not compiled: they use the same kernels at
    smaller blocks."""
    from parity import dn, parity_shapes
    from regimes import REGIMES

    outdir.mkdir(parents=True, exist_ok=True)
    shapes = {"regimes": [{**asdict(r), "dtype": r.dtype_name} for r in REGIMES if r.gpu],
              "parity": {k: [{**asdict(s), "dtype": dn(s.dtype)} for s in v] for k, v in parity_shapes(False).items()}}
    path = outdir / "launch_shapes.json"
    path.write_text(json.dumps(shapes, indent=1))
    print(f"wrote {path}: {len(shapes['regimes'])} regimes, "
          f"{sum(len(v) for v in shapes['parity'].values())} parity shapes")
    if importlib.util.find_spec("compile_report") is None:
        print("bench/compile_report.py is not in this checkout: nothing compiled", file=sys.stderr)
        return 2
    import compile_report

    return compile_report.main(["--arch", "90", "--json", str(outdir / "compile_report.json")])


def now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
