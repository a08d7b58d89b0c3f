"""The one prepared script for a GPU session (as the project's performance brief asks).

From a clean checkout on the GPU machine (torch with CUDA and Triton already
installed, no network), in the repository root -- bench/README.md explains:

    python3 -m pip install --no-index --no-deps --no-build-isolation -e . ; \
        PYTHONUNBUFFERED=1 python3 bench/gpu_check.py "$OUT"

Other modes:

    python bench/gpu_check.py OUTDIR --cpu-smoke     # every section on the CPU (Triton's interpreter,
                                                     # the tiny regimes; no timing claims)
    python bench/gpu_check.py OUTDIR --compile-only  # no GPU: the launch shapes of this run, for the
                                                     # compile report (bench/compile_report.py)

In one run, within a time budget (--budget-s, default 240 s; bench/README.md says why):

  1. versions: torch, triton, CUDA, driver, GPU, and which linreg_fused was imported;
  2. the device-to-device copy ceiling (GB/s, bytes read + written);
  3. worker processes (8; each its own CUDA context) share two kinds of job until
     40 % of the budget: the parity checks of bench/parity.py (against float64, on
     NaN-poisoned memory), and one call of every fused and torch.compile peer of
     the timed regimes, which fills the on-disk Triton and Inductor caches, so the
     cold-cache compilation (0.6-3.7 s per Triton specialization, tens of seconds
     per torch.compile) runs in parallel and stays out of the timing phase;
  4. in this process, every regime of bench/regimes.py against its peers (the
     runners of bench/harness.py): a warm-up call, the shuffled-epoch check
     against float64, peak memory over one call, then triton.testing.do_bench
     (median); the torch.compile peers last;
  5. OUTDIR/gpu_check.json (every row, the workers' too) and OUTDIR/gpu_check.log,
     and a short table printed last.

Every check and every timing is wrapped: a failure (even a compile error) is
recorded and the run goes on. Exit status: 0 all passed, 1 something failed
or errored, 2 no CUDA device (without --cpu-smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

from parity import dn, parity_checks, parity_shapes, poison_allocator
from timing import bench_ms
from regimes import FP32, REGIMES, Regime, peers_for, regimes_for, skip_reason

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# The budget (bench/README.md): the worker phase (parity + pre-compilation) may run until
# WORKER_SHARE of it; the timings get the rest, less RESERVE_S for the JSON and the table.
DEFAULT_BUDGET_S = 240.0
SMOKE_BUDGET_S = 900.0  # the interpreter on a shared CPU is slow, and no device time is at stake
WORKER_SHARE = 0.4
RESERVE_S = 10.0
INTEGRATION_S = 45.0  # section 5: opcheck, a compiled and a graphed train_step, a one-rank process group
WORKER_GRACE_S = 10.0  # a worker still busy this long after the phase's deadline is stopped
COMPILE_PEER_NEED_S = 30.0  # a torch.compile peer starts only with this much left (its compile, if cold)


# =============================================================== 0. setup
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


def import_project() -> tuple[ModuleType, str]:
    """Import linreg_fused from THIS checkout: the installed package when it points here (the
    documented command installs it in editable mode), else this source tree directly.
    Returns (bench/harness.py as a module, how linreg_fused was found)."""
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
    import harness

    return harness, how


# =============================================================== bookkeeping
class Run:
    """Log, rows, time budget and the wrappers that keep one failure from stopping the run."""

    def __init__(self, outdir: Path, budget_s: float, device: torch.device, reserve_s: float = RESERVE_S) -> None:
        self.outdir = outdir
        outdir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(outdir / "gpu_check.log", "w")
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.reserve_s = reserve_s
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.cuda_broken: str | None = None
        self.deadline: float | None = None  # the current section's end, seconds since start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.log_file.write(msg + "\n")
        self.log_file.flush()

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        row.setdefault("t_s", round(self.elapsed(), 2))
        self.rows.append(row)
        return row

    def blocked(self, need_s: float) -> str | None:
        if self.cuda_broken:
            return f"skipped: the CUDA context broke earlier ({self.cuda_broken})"
        if self.left() - self.reserve_s < need_s:
            return f"skipped: time budget ({self.left():.0f} s left, this needs ~{need_s:.0f} s)"
        if self.deadline is not None and self.elapsed() + need_s > self.deadline:
            return f"skipped: this section's share of the budget (until t={self.deadline:.0f} s) is spent"
        return None

    def skip(self, section: str, name: str, reason: str, **extra: Any) -> None:
        self.record({"section": section, "name": name, "status": "skip", "reason": reason, **extra})
        self.log(f"  skip  {name}: {reason}")

    def error(self, section: str, name: str, err: BaseException, **extra: Any) -> None:
        text = f"{type(err).__name__}: {err}"
        if any(s in text for s in ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch")):
            self.cuda_broken = text.splitlines()[0][:200]
        tb = traceback.format_exc(limit=8)
        self.log(f"  ERROR {name}: {text.splitlines()[0][:300]}")
        self.log_file.write(tb + "\n")
        self.record({"section": section, "name": name, "status": "error", "error": text[:2000],
                     "traceback": tb[-4000:], **extra})

    def check(self, section: str, name: str, fn: Callable[[], dict[str, Any]], need_s: float = 2.0) -> None:
        """fn returns {"errors": {quantity: (error, tolerance)}, **extra}; pass iff every error <= its
        tolerance (a NaN error fails)."""
        blocked = self.blocked(need_s)
        if blocked:
            self.skip(section, name, blocked)
            return
        t0 = time.monotonic()
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 -- recorded, and the run goes on
            self.error(section, name, err)
            return
        errors = out.pop("errors", {})
        bad = {k: v for k, v in errors.items() if not (v[0] <= v[1])}
        status = "fail" if bad or out.pop("fail", False) else "pass"
        detail = ", ".join(f"{k} {e:.2e}/{t:.0e}" for k, (e, t) in errors.items())
        self.log(f"  {status.upper():5s} {name}: {detail}{'  ' + out['note'] if out.get('note') else ''}")
        self.record({"section": section, "name": name, "status": status, "seconds": round(time.monotonic() - t0, 3),
                     "errors": {k: {"error": e, "tol": t} for k, (e, t) in errors.items()},
                     "failed": sorted(bad), **out})

    @contextlib.contextmanager
    def section(self, title: str, need_s: float = 5.0) -> Iterator[bool]:
        """Yields False when the budget (or a broken context) leaves no room; catches what escapes."""
        self.log(f"\n=== {title}  (t={self.elapsed():.0f} s, {self.left():.0f} s left)")
        blocked = self.blocked(need_s)
        if blocked:
            self.skip(title, "(section)", blocked)
            yield False
            return
        compiled = compiled_kernel_count()
        t0 = time.monotonic()
        try:
            yield True
        except Exception as err:  # noqa: BLE001
            self.error(title, "(section)", err)
        self.meta.setdefault("sections", {})[title] = {
            "seconds": round(time.monotonic() - t0, 1),
            "triton_kernels_compiled": None if compiled is None else compiled_kernel_count() - compiled}

    def write(self) -> Path:
        path = self.outdir / "gpu_check.json"
        doc = {"meta": self.meta, "elapsed_s": round(self.elapsed(), 1), "rows": self.rows}
        path.write_text(json.dumps(doc, indent=1, default=str))
        return path


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


class LaunchSignatures:
    """--cpu-smoke: the distinct kernel specializations that the run's launches would compile
    on a GPU, by Triton's JIT rules (constexpr values, launch options, each tensor's dtype and
    16-byte alignment, each int's == 1 and % 16 == 0), counted from the interpreter's launches.
    The interpreter uses its own block sizes, so this is the count at CPU configurations."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()
        self._constexprs: dict[Any, set[str]] = {}

    def install(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        signatures = self

        def run(fn_self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            signatures.add(fn_self, args, kwargs)
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def add(self, fn: Any, args: tuple, kwargs: dict) -> None:
        import inspect

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

        key = (fn.fn.__module__, fn.fn.__name__, tuple(spec(n, v) for n, v in zip(fn.arg_names, args)),
               tuple(sorted(spec(n, v) for n, v in kwargs.items())))
        self.seen.add(key)

    def count(self) -> int:
        return len(self.seen)


# =============================================================== 1. versions
def section_versions(run: Run, import_how: str, commit: str | None) -> None:
    import triton

    import linreg_fused

    meta: dict[str, Any] = {
        "mode": "gpu" if run.device.type == "cuda" else "cpu-smoke", "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__, "cuda_runtime": torch.version.cuda,
        "platform": platform.platform(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "linreg_fused": linreg_fused.__version__, "linreg_fused_import": import_how,
        "linreg_fused_path": str(Path(linreg_fused.__file__).parent), "triton_cache_dir": str(triton_cache_dir()),
        "triton_kernels_in_cache_at_start": compiled_kernel_count(), "budget_s": run.budget_s,
    }
    meta["commit_given"] = commit  # --commit: for a copy of the tree that travels without .git
    for key, cmd in (("git_commit", ["git", "rev-parse", "HEAD"]), ("git_status", ["git", "status", "--porcelain"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
            meta[key] = out.stdout.strip() if out.returncode == 0 else f"unknown ({out.stderr.strip()[:200]})"
        except Exception as err:  # noqa: BLE001 -- git may be absent on the GPU machine
            meta[key] = f"unknown ({err})"
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        meta.update(gpu=props.name, sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", l2_bytes=getattr(props, "L2_cache_size", None))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.sm,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            meta["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except Exception as err:  # noqa: BLE001
            meta["nvidia_smi"] = f"unavailable ({err})"
    else:
        meta.update(gpu=None, cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                    triton_interpret=os.environ.get("TRITON_INTERPRET"))
    run.meta.update(meta)
    for k, v in meta.items():
        run.log(f"  {k}: {v}")


# =============================================================== 2. copy ceiling
def section_copy(run: Run) -> float:
    n_bytes = (1 << 30) if run.device.type == "cuda" else (64 << 20)
    buffers = [torch.empty(n_bytes // 4, device=run.device).uniform_(), torch.empty(n_bytes // 4, device=run.device)]
    ms = bench_ms(lambda: buffers[1].copy_(buffers[0]), run.device, rep_ms=300)
    gbps = 2 * n_bytes / (ms * 1e-3) / 1e9
    buffers.clear()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    run.meta["copy_gbps"] = gbps
    run.record({"section": "copy", "name": f"copy {n_bytes >> 20} MiB", "status": "pass", "ms": ms, "gbps": gbps})
    run.log(f"  device copy of {n_bytes >> 20} MiB: {ms:.4f} ms -> {gbps:,.1f} GB/s (read + write)")
    return gbps


# =============================================================== 3+4. worker processes: parity and pre-compilation
def prewarm_cases(on_gpu: bool, with_compile: bool = True) -> list[tuple[Regime, str]]:
    """(regime, peer name) pairs whose first call compiles something: the fused peers (Triton's
    JIT) and the torch.compile peers (Inductor); those first, they take longest. Eager and
    CUDA-graph peers compile nothing."""
    cases = [(r, p) for r in regimes_for(on_gpu) for p in peers_for(r, on_gpu)
             if ((p.is_fused and p.backend == "triton") or (with_compile and p.family == "compile"))
             and skip_reason(r, p, on_gpu) is None]
    cases.sort(key=lambda case: case[1].family != "compile")
    return [(r, p.name) for r, p in cases]


# Rough costs (s) of a job on a cold cache, to balance the workers: a torch.compile of a training
# step tens of seconds; a parity check or a fused peer's first call a few Triton compiles.
JOB_COST_S = {"compile": 40.0, "parity": 4.0, "fused": 4.0}
JOB_ORDER = ("parity", "fused", "compile")  # within a worker: correctness first


def worker_shares(smoke: bool, device: torch.device, with_compile: bool, n_workers: int) -> list[list[tuple[str, int]]]:
    """The jobs of each worker: ("parity", i) indexes parity_checks, ("fused" | "compile", i)
    indexes prewarm_cases. Dealt longest first to the least loaded worker (so the torch.compile
    jobs spread out); each worker runs its parity checks first and its torch.compile jobs last."""
    cases = prewarm_cases(device.type == "cuda", with_compile)
    jobs = [("parity", i) for i in range(len(parity_checks(smoke, device)))]
    jobs += [("compile" if name.endswith("compile") else "fused", i) for i, (_, name) in enumerate(cases)]
    loads, shares = [0.0] * n_workers, [[] for _ in range(n_workers)]
    for job in sorted(jobs, key=lambda job: -JOB_COST_S[job[0]]):
        k = loads.index(min(loads))
        shares[k].append(job)
        loads[k] += JOB_COST_S[job[0]]
    return [sorted(share, key=lambda job: JOB_ORDER.index(job[0])) for share in shares]


def prewarm(run: Run, harness: ModuleType, regime: Regime, peer_name: str) -> None:
    """One call of a peer: its kernels land in the on-disk caches that the timing process reads."""
    on_gpu = run.device.type == "cuda"
    name = f"{regime.group} :: {peer_name}"
    blocked = run.blocked(COMPILE_PEER_NEED_S if peer_name.endswith("compile") else 2.0)
    if blocked:
        run.skip("prewarm", name, blocked)
        return
    t0 = time.monotonic()
    try:
        peer = next(p for p in peers_for(regime, on_gpu) if p.name == peer_name)
        harness.make_runner(harness.data_for(regime, run.device, n_sets=1), peer).call()
    except Exception as err:  # noqa: BLE001 -- the timing of this peer will meet it again, and record it
        run.error("prewarm", name, err)
        return
    run.record({"section": "prewarm", "name": name, "status": "pass", "seconds": round(time.monotonic() - t0, 2)})
    run.log(f"  warm  {name}: {time.monotonic() - t0:.1f} s")


def worker_main(args: argparse.Namespace, device: torch.device, harness: ModuleType,
                signatures: LaunchSignatures | None) -> int:
    """One worker process: its share of the jobs (worker_shares), rows and log in its own folder."""
    shard, n_shards = (int(v) for v in args.worker.split("/"))
    run = Run(args.outdir, args.deadline_epoch - time.time(), device, reserve_s=1.0)
    checks = parity_checks(args.cpu_smoke, device)
    with_compile = not args.skip_compile
    cases = prewarm_cases(device.type == "cuda", with_compile)
    for kind, index in worker_shares(args.cpu_smoke, device, with_compile, n_shards)[shard]:
        if kind == "parity":
            check = checks[index]
            poison_allocator(device)
            run.check("parity", check.name, check.fn, check.need_s)
        else:
            prewarm(run, harness, *cases[index])
    if signatures is not None:
        run.meta["launch_signature_keys"] = sorted(repr(k) for k in signatures.seen)
    run.write()
    return 0


class Workers:
    """The worker processes of the parity and pre-compile phase. Each gets its own CUDA context
    (a kernel that breaks one cannot break the timings'), its own folder (in a temporary
    directory: $OUT takes few files) and a budget that ends at the phase's deadline."""

    def __init__(self, run: Run, n_workers: int, smoke: bool, with_compile: bool, deadline_s: float) -> None:
        import tempfile

        self.run, self.deadline_s = run, deadline_s
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_workers_"))
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        deadline_epoch = time.time() + deadline_s - run.elapsed()  # the workers' clocks start after their imports
        for shard in range(n_workers):
            folder = self.tmp / f"worker{shard}"
            folder.mkdir()
            cmd = [sys.executable, str(Path(__file__).resolve()), str(folder), "--worker", f"{shard}/{n_workers}",
                   "--deadline-epoch", f"{deadline_epoch:.1f}", *(["--cpu-smoke"] if smoke else []),
                   *([] if with_compile else ["--skip-compile"])]
            out = open(folder / "stdout.txt", "w")
            self.procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT), folder))
        n_jobs = sum(len(share) for share in worker_shares(smoke, run.device, with_compile, n_workers))
        run.log(f"  {n_workers} worker(s), {n_jobs} jobs, until t={deadline_s:.0f} s "
                f"(folders under {self.tmp})")

    def join(self) -> set[str]:
        """Wait for the workers (those past the deadline are stopped); merge their rows and logs.
        Returns the launch signatures they saw (--cpu-smoke)."""
        signature_keys: set[str] = set()
        for i, (proc, folder) in enumerate(self.procs):
            try:
                proc.wait(timeout=max(1.0, self.deadline_s + WORKER_GRACE_S - self.run.elapsed()))
            except subprocess.TimeoutExpired:
                proc.kill()  # one of ours, by its handle
                proc.wait()
            self.run.log(f"  -- worker {i} (exit {proc.returncode})")
            log = folder / "gpu_check.log"
            for line in (log.read_text() if log.is_file() else "").splitlines():
                if line.startswith("  "):  # its check and warm lines (its header is the main one's)
                    self.run.log(line)
            result = folder / "gpu_check.json"
            if result.is_file():
                doc = json.loads(result.read_text())
                for row in doc["rows"]:
                    row["worker"] = i
                    self.run.rows.append(row)
                signature_keys.update(doc["meta"].get("launch_signature_keys", []))
            if proc.returncode != 0 or not result.is_file():
                tail = (folder / "stdout.txt").read_text()[-3000:]
                self.run.record({"section": "workers", "name": f"worker {i}", "status": "error", "worker": i,
                                 "error": f"exit code {proc.returncode}; its jobs after the last row did not run",
                                 "stdout_tail": tail})
                self.run.log(f"  ERROR worker {i}: exit code {proc.returncode}; the end of its output:")
                for line in tail.splitlines()[-5:]:
                    self.run.log(f"    {line}")
        shutil.rmtree(self.tmp, ignore_errors=True)  # what mattered is merged into this run's rows and log
        return signature_keys


# =============================================================== 5. timings
def rep_ms_for(call_ms: float) -> float:
    """do_bench's measuring time: at least ~10 calls, 200 ms to 1.5 s."""
    return min(1500.0, max(200.0, 10 * call_ms))


def time_peer(run: Run, harness: ModuleType, regime: Regime, peer: Any, copy_gbps: float | None,
              baselines: dict[str, float]) -> None:
    name = f"{regime.group} :: {peer.name}"
    base_row = {"section": "timing", "name": name, "group": regime.group, "peer": peer.name, "kind": regime.kind,
                "dtype": regime.dtype_name, "shape": regime.shape, "baseline": peer.baseline}
    reason = skip_reason(regime, peer, run.device.type == "cuda") or harness.unavailable_reason(peer, run.device)
    blocked = reason or run.blocked(COMPILE_PEER_NEED_S if peer.family == "compile" else 3.0)
    if blocked:
        run.skip("timing", name, blocked, **{k: v for k, v in base_row.items() if k not in ("section", "name")})
        return
    t0 = time.monotonic()
    try:
        data = harness.data_for(regime, run.device, n_sets=1)  # do_bench flushes the L2 before each call
        runner = harness.make_runner(data, peer)
        t_first = time.monotonic()
        runner.call()  # warm-up: JIT (a cache hit after the pre-compile workers), compile, cuBLAS handles
        first_call_s = time.monotonic() - t_first
        poison_allocator(run.device)
        try:
            check = harness.check_against_reference(runner)
        except AssertionError as err:
            run.record({**base_row, "status": "fail", "error": f"not timed: {err}"})
            run.log(f"  FAIL  {peer.name}: {err} -- not timed")
            return
        t_call = time.monotonic()
        peak, peak_extra = harness.peak_extra_bytes(runner)
        if peak is None:
            runner.call()
        call_ms = (time.monotonic() - t_call) * 1e3
        ms = bench_ms(runner.call, run.device, rep_ms=rep_ms_for(call_ms))
        runner.call()
        last = runner.last_loss
        finite = last is not None and bool(torch.isfinite(last).all())
        per_step_ms = ms / regime.steps_per_call
        gbps = regime.bytes_per_step / (per_step_ms * 1e-3) / 1e9
        if peer.baseline:
            baselines[regime.group] = per_step_ms
        base = baselines.get(regime.group)
        row = {**base_row, "status": "pass" if finite else "fail", "backend": peer.backend if peer.is_fused else "torch",
               "input_precision": peer.precision if peer.is_fused else None,
               "ms_per_call": ms, "steps_per_call": regime.steps_per_call, "ms_per_step": per_step_ms,
               "bytes_per_step": regime.bytes_per_step, "gbps": gbps, "copy_gbps": copy_gbps,
               "frac_copy": gbps / copy_gbps if copy_gbps else None,
               "speedup_vs_eager": base / per_step_ms if base else None, "peak_mem_bytes": peak,
               "peak_extra_bytes": peak_extra, "first_call_s": round(first_call_s, 3),
               "timer": "do_bench median" if run.device.type == "cuda" else "perf_counter median of 3",
               "seconds": round(time.monotonic() - t0, 2), **check}
        if not finite:
            row["error"] = "non-finite output after timing"
        run.record(row)
        run.log(f"  {peer.name:26s} {per_step_ms * 1e3:12.2f} us/step {gbps:10.1f} GB/s"
                + (f" {100 * gbps / copy_gbps:6.1f}% copy" if copy_gbps else "")
                + (f" {base / per_step_ms:7.2f}x eager" if base else "")
                + (f"  peak +{peak_extra / 2**20:.1f} MiB" if peak_extra is not None else "")
                + f"  (first call {first_call_s:.2f} s)")
    except Exception as err:  # noqa: BLE001
        run.error("timing", name, err, **{k: v for k, v in base_row.items() if k not in ("section", "name")})


def section_timing(run: Run, harness: ModuleType, copy_gbps: float | None, with_compile: bool) -> None:
    """Every regime, its peers in order; the torch.compile peers after all regimes (their compile,
    when the workers could not warm it, costs tens of seconds each)."""
    on_gpu = run.device.type == "cuda"
    baselines: dict[str, float] = {}
    compile_later = []
    for regime in regimes_for(on_gpu):
        run.log(f"  -- {regime.group} ({regime.bytes_per_step / 1e6:.4g} MB per step)")
        for peer in peers_for(regime, on_gpu):
            if peer.family == "compile":
                compile_later.append((regime, peer))
                continue
            time_peer(run, harness, regime, peer, copy_gbps, baselines)
    if not with_compile:
        for regime, peer in compile_later:
            run.skip("timing", f"{regime.group} :: {peer.name}", "--skip-compile", group=regime.group, peer=peer.name)
        return
    run.log("  -- torch.compile peers (fp32 regimes first)")
    for regime, peer in sorted(compile_later, key=lambda case: case[0].dtype != FP32):
        time_peer(run, harness, regime, peer, copy_gbps, baselines)


# =============================================================== 6. summary
def summary(run: Run) -> int:
    path = run.write()
    counts: dict[str, int] = {}
    for row in run.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    run.log(f"\n=== summary  ({run.elapsed():.0f} s of {run.budget_s:.0f}; rows: {counts}; JSON: {path})")
    for title, sec in run.meta.get("sections", {}).items():
        compiled = sec["triton_kernels_compiled"]
        run.log(f"  {title:48s} {sec['seconds']:7.1f} s" + ("" if compiled is None else f"  {compiled} kernels compiled"))
    if "launch_signatures" in run.meta:
        run.log(f"  distinct kernel specializations launched, all processes (interpreter, CPU blocks): "
                f"{run.meta['launch_signatures']}")
    budget_skips = [row for row in run.rows if row["status"] == "skip" and "budget" in row.get("reason", "")]
    if budget_skips:
        run.log(f"  NOT RUN for the time budget: {len(budget_skips)} checks or timings (rows with status 'skip')")
    bad = [row for row in run.rows if row["status"] in ("fail", "error")]
    for row in bad:
        why = row.get("error") or ", ".join(
            f"{k} {v['error']:.2e} > {v['tol']:.0e}" for k, v in row.get("errors", {}).items() if k in row.get("failed", []))
        run.log(f"  {row['status'].upper():5s} [{row['section']}] {row['name']}: {str(why).splitlines()[0][:200]}")
    timing = [row for row in run.rows if row["section"] == "timing" and "ms_per_step" in row]
    if timing:
        copy = run.meta.get("copy_gbps")
        run.log(f"\ncopy ceiling {copy:,.1f} GB/s" if copy else "\ncopy ceiling: not measured")
        if run.device.type != "cuda":
            run.log("CPU SMOKE RUN: interpreter figures, not GPU performance")
        head = f"{'group':44s} {'peer':26s} {'us/step':>11s} {'GB/s':>9s} {'%copy':>6s} {'x eager':>8s} {'peak+MiB':>9s}"
        run.log(head)
        run.log("-" * len(head))
        for row in timing:
            frac, sp, pk = row.get("frac_copy"), row.get("speedup_vs_eager"), row.get("peak_extra_bytes")
            run.log(f"{row['group'][:44]:44s} {row['peer'][:26]:26s} {row['ms_per_step'] * 1e3:11.2f} {row['gbps']:9.1f} "
                    f"{'' if frac is None else f'{100 * frac:5.1f}%':>6s} {'' if sp is None else f'{sp:7.2f}x':>8s} "
                    f"{'' if pk is None else f'{pk / 2**20:9.1f}':>9s}")
    return 1 if bad else 0


# =============================================================== entry points
def compile_only(outdir: Path) -> int:
    """--compile-only, a dry run without a GPU: every launch shape this run makes -- the regimes
    (bench/regimes.py) and the parity shapes -- written to OUTDIR/launch_shapes.json; then the
    compile report (bench/compile_report.py, the project's one compiler driver) compiles every
    regime's launches for sm_90 at the configurations the launch helpers pick, and fails on
    shared memory over the limit, spills, or a product of the wrong kind. The parity shapes are
    listed, not compiled: they are small and use the same kernels at smaller blocks."""
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="linreg-fused GPU check: versions, copy ceiling, parity, timings.")
    p.add_argument("outdir", type=Path)
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"wall-clock budget for the whole run (s; default {DEFAULT_BUDGET_S:.0f}, "
                        f"{SMOKE_BUDGET_S:.0f} with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every section on the CPU through Triton's interpreter on the tiny regimes")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile peers")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for parity and pre-compilation (default: 8 on a GPU, 2 with --cpu-smoke; "
                        "0: parity in this process, nothing pre-compiled)")
    p.add_argument("--commit", help="the commit this tree is, recorded in the JSON (where .git does not travel)")
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU: write the run's launch shapes and hand them to bench/compile_report.py")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "i/k": this process is worker i of k
    p.add_argument("--deadline-epoch", type=float, help=argparse.SUPPRESS)  # a worker's end, time.time()
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.budget_s is None:
        args.budget_s = SMOKE_BUDGET_S if args.cpu_smoke else DEFAULT_BUDGET_S
    if args.compile_only:
        return compile_only(args.outdir)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before linreg_fused's kernels are imported
        torch.set_num_threads(1)  # tiny shapes; a shared CPU's thread pool only adds noise
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this script measures a GPU. Run it on an H100/H200 "
              "(or use --cpu-smoke to dry-run every section through Triton's interpreter).", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda")
    harness, import_how = import_project()
    signatures = None
    if args.cpu_smoke:
        signatures = LaunchSignatures()
        signatures.install()
    if args.worker:
        return worker_main(args, device, harness, signatures)

    run = Run(args.outdir, args.budget_s, device)
    run.log(f"linreg-fused gpu_check ({'CPU SMOKE RUN' if args.cpu_smoke else 'GPU'}) -> {args.outdir}, "
            f"budget {args.budget_s:.0f} s")
    with run.section("1. versions", need_s=1.0) as ok:
        if ok:
            section_versions(run, import_how, args.commit)
    copy_gbps = None
    with run.section("2. copy ceiling", need_s=2.0) as ok:
        if ok:
            copy_gbps = section_copy(run)
    n_workers = args.workers if args.workers is not None else (2 if args.cpu_smoke else 8)
    worker_keys: set[str] = set()
    run.deadline = WORKER_SHARE * args.budget_s
    with run.section("3. parity and pre-compilation (worker processes)", need_s=10.0) as ok:
        if ok and n_workers > 0:
            workers = Workers(run, n_workers, args.cpu_smoke, not args.skip_compile, run.deadline)
            worker_keys = workers.join()  # always joined: no worker runs during the timings
        elif ok:
            for check in parity_checks(args.cpu_smoke, device):
                poison_allocator(device)
                run.check("parity", check.name, check.fn, check.need_s)
    # The timings end INTEGRATION_S before the budget does: the PyTorch-integration checks get the rest.
    run.deadline = args.budget_s - RESERVE_S - INTEGRATION_S
    with run.section("4. timings (triton.testing.do_bench medians)", need_s=10.0) as ok:
        if ok:
            section_timing(run, harness, copy_gbps, with_compile=not args.skip_compile)
    run.deadline = None
    with run.section("5. PyTorch integration (ops, compile, CUDA graph, process group)", need_s=10.0) as ok:
        if ok:
            from torch_integration_check import torch_integration_checks

            for check in torch_integration_checks(device, smoke=args.cpu_smoke):
                run.check("torch", check.name, check.fn, check.need_s)
    if signatures is not None:
        run.meta["launch_signatures"] = len(worker_keys | {repr(k) for k in signatures.seen})
    return summary(run)


if __name__ == "__main__":
    sys.exit(main())
