"""The one prepared script for a GPU session (as the project's performance brief asks).

    python bench/gpu_check.py OUTDIR                 # on a machine with an H100/H200
    python bench/gpu_check.py OUTDIR --cpu-smoke     # dry run of every section on the CPU
                                                     # (Triton interpreter, tiny shapes, no timing claims)
    python bench/gpu_check.py OUTDIR --sweep         # a second call, if time is left: block configs of
                                                     # the single-pass kernel, for tuning kernels/config.py

In one run, within a time budget (default 330 s, --budget-s):

  1. versions: torch, triton, CUDA, driver, GPU;
  2. the device-to-device copy ceiling (GB/s, bytes read + written);
  3. parity of every kernel against float64 on fresh random inputs (never
     zeros; the allocator is poisoned with NaN first, and outputs the API lets
     us pass are NaN-filled): linear_mse loss/dW/db/dX/dT (fp32 IEEE, TF32,
     bf16 and fp16 inputs with fp32 weights, fp64; 1-sized dims, D wider than
     one block, O over 16, large N), the partial/reduce kernels directly
     (with and without a row index), determinism (bitwise), FusedSGD against
     torch.optim.SGD (.step() and the fused step), fit (persistent kernel and
     the per-batch path) against an eager loop, inference against nn.Linear;
  4. timings of every regime against its peers with triton.testing.do_bench
     (median; tiny steps timed as many steps per measured region: the whole
     tutorial fit, a whole mini-batch epoch; do_bench flushes the L2 before
     each region, so inputs need no rotation here); each peer's first step is
     checked against float64 before it is timed, and its peak extra memory
     (max_memory_allocated over one call) recorded;
  5. OUTDIR/gpu_check.json (every row) and OUTDIR/gpu_check.log, and a short
     table printed last.

Every check and every timing is wrapped: a failure (even a compile error) is
recorded and the run goes on. Exit status: 0 all passed, 1 something failed
or errored, 2 no CUDA device (without --cpu-smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# Parse before importing linreg_fused: --cpu-smoke must switch on Triton's interpreter first.
_PARSER = argparse.ArgumentParser(description="linreg-fused GPU check: versions, copy ceiling, parity, timings.")
_PARSER.add_argument("outdir", type=Path)
_PARSER.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget for the whole run")
_PARSER.add_argument("--cpu-smoke", action="store_true",
                     help="run every section on the CPU through Triton's interpreter on tiny shapes")
_PARSER.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile peers")
_PARSER.add_argument("--sweep", action="store_true",
                     help="instead of parity and timings: time the single-pass gradient kernel over a grid of "
                          "block configs per regime (data for tuning kernels/config.py); a second, separate call")

import torch  # noqa: E402  (imports no Triton kernels: TRITON_INTERPRET can still be set below)

# Imported as a module (to test this script), it takes the mode the machine allows.
ARGS = _PARSER.parse_args() if __name__ == "__main__" else _PARSER.parse_args(
    ["/tmp/gpu_check_import", *([] if torch.cuda.is_available() else ["--cpu-smoke"])])

if ARGS.cpu_smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # tiny shapes; a shared CPU's thread pool only adds noise

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

SMOKE: bool = ARGS.cpu_smoke
DEVICE = torch.device("cpu") if SMOKE else torch.device("cuda")
FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
RESERVE_S = 15.0  # kept back for writing the JSON and the table
PARITY_SHARE = 0.45  # parity stops starting checks after this share of the budget, so timings get the rest


def dn(dtype: torch.dtype) -> str:
    return {FP32: "fp32", BF16: "bf16", FP16: "fp16", FP64: "fp64"}[dtype]


def pick(gpu: Any, cpu: Any) -> Any:
    """The GPU value, or the tiny one for --cpu-smoke."""
    return cpu if SMOKE else gpu


# =============================================================== 0. bookkeeping
class Run:
    """Log, rows, time budget and the wrappers that keep one failure from stopping the run."""

    def __init__(self, outdir: Path, budget_s: float) -> None:
        self.outdir = outdir
        outdir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(outdir / "gpu_check.log", "w")
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.cuda_broken: str | None = None
        self.section_deadline: float | None = None  # seconds since start; None: only the overall budget

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

    def _blocked(self, need_s: float) -> str | None:
        if self.cuda_broken:
            return f"skipped: the CUDA context broke earlier ({self.cuda_broken})"
        if self.left() - RESERVE_S < need_s:
            return f"skipped: time budget ({self.left():.0f} s left, this needs ~{need_s:.0f} s)"
        if self.section_deadline is not None and self.elapsed() + need_s > self.section_deadline:
            return f"skipped: this section's share of the budget ({self.section_deadline:.0f} s) is spent"
        return None

    def _error(self, section: str, name: str, err: BaseException) -> dict[str, Any]:
        text = f"{type(err).__name__}: {err}"
        if any(s in text for s in ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch")):
            self.cuda_broken = text.splitlines()[0][:200]
        tb = traceback.format_exc(limit=8)
        self.log(f"  ERROR {name}: {text.splitlines()[0][:300]}")
        self.log_file.write(tb + "\n")
        return {"section": section, "name": name, "status": "error", "error": text[:2000], "traceback": tb[-4000:]}

    def check(self, section: str, name: str, fn: Callable[[], dict[str, Any]], need_s: float = 2.0) -> None:
        """fn returns {"errors": {quantity: (error, tolerance)}, **extra}; pass iff every error <= its
        tolerance (a NaN error fails)."""
        blocked = self._blocked(need_s)
        if blocked:
            self.record({"section": section, "name": name, "status": "skip", "reason": blocked})
            self.log(f"  skip  {name}: {blocked}")
            return
        t0 = time.monotonic()
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 -- recorded, and the run goes on
            self.record(self._error(section, name, err))
            return
        errors = out.pop("errors", {})
        bad = {k: v for k, v in errors.items() if not (v[0] <= v[1])}
        status = "fail" if bad or out.pop("fail", False) else "pass"
        detail = ", ".join(f"{k} {e:.2e}/{t:.0e}" for k, (e, t) in errors.items())
        self.log(f"  {status.upper():5s} {name}: {detail}{'  ' + out['note'] if 'note' in out else ''}")
        self.record({"section": section, "name": name, "status": status, "seconds": round(time.monotonic() - t0, 3),
                     "errors": {k: {"error": e, "tol": t} for k, (e, t) in errors.items()},
                     "failed": sorted(bad), **out})

    @contextlib.contextmanager
    def section(self, title: str, need_s: float = 5.0) -> Iterator[bool]:
        """Yields False when the budget (or a broken context) leaves no room; catches what escapes."""
        self.log(f"\n=== {title}  (t={self.elapsed():.0f} s, {self.left():.0f} s left)")
        blocked = self._blocked(need_s)
        if blocked:
            self.record({"section": title, "name": "(section)", "status": "skip", "reason": blocked})
            self.log(f"  skip section: {blocked}")
            yield False
            return
        try:
            yield True
        except Exception as err:  # noqa: BLE001
            self.record(self._error(title, "(section)", err))

    def write(self) -> Path:
        path = self.outdir / "gpu_check.json"
        doc = {"meta": self.meta, "elapsed_s": round(self.elapsed(), 1), "rows": self.rows}
        path.write_text(json.dumps(doc, indent=1, default=str))
        return path


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-relative error against a float64 reference (NaN anywhere gives NaN, which fails)."""
    a, ref = a.detach().double(), ref.detach().double()
    den = float(ref.norm())
    num = float((a - ref).norm())
    return num / den if den > 0 else num


def poison_allocator() -> None:
    """Fill the caching allocator's free blocks with NaN, so an output a kernel forgets to
    write reads as NaN instead of a stale value that might happen to be right."""
    if DEVICE.type != "cuda":
        return
    big = torch.full(((256 << 20) // 4,), float("nan"), device=DEVICE)
    small = [torch.full(((256 << 10) // 4,), float("nan"), device=DEVICE) for _ in range(32)]
    del big, small


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def init_params(o: int, d: int, gen: torch.Generator, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear's init range, from a seeded generator (fp32)."""
    bound = 1 / math.sqrt(d)
    w = (torch.rand((o, d), generator=gen, device=DEVICE) * 2 - 1) * bound
    b = (torch.rand((o,), generator=gen, device=DEVICE) * 2 - 1) * bound if bias else None
    return w, b


def make_xt(n: int, d: int, o: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random X and targets from a linear map plus noise, in dtype (never zeros)."""
    x = torch.randn((n, d), generator=gen, device=DEVICE)
    w_true = torch.randn((o, d), generator=gen, device=DEVICE) / math.sqrt(d)
    t = x @ w_true.t() + torch.randn((o,), generator=gen, device=DEVICE)
    t += 0.1 * torch.randn((n, o), generator=gen, device=DEVICE)
    return x.to(dtype), t.to(dtype)


def ref_loss_grads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 loss and gradients of mean((x·wᵀ + b − t)²) with respect to w, b, x and t."""
    x64, w64, t64 = x.detach().double(), w.detach().double(), t.detach().double()
    r = x64 @ w64.t() - t64
    if b is not None:
        r = r + b.detach().double()
    g = r * (2.0 / r.numel())
    out = {"loss": (r * r).mean(), "dW": g.t() @ x64, "dX": g @ w64, "dT": -g}
    if b is not None:
        out["db"] = g.sum(0)
    return out


# =============================================================== 1. versions
def section_versions(run: Run) -> None:
    import triton

    meta: dict[str, Any] = {
        "mode": "cpu-smoke" if SMOKE else "gpu", "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "cuda_runtime": torch.version.cuda, "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        import linreg_fused

        meta["linreg_fused"] = linreg_fused.__version__
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent)
        meta["git_commit"] = head.stdout.strip() or None
        meta["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except Exception as err:  # noqa: BLE001
        meta["git_commit"] = f"unknown ({err})"
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        meta.update(gpu=props.name, sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", l2_bytes=getattr(props, "L2_cache_size", None))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,clocks.max.mem",
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
def bench_ms(fn: Callable[[], Any], rep_ms: int = 200, warmup_ms: int = 25) -> float:
    """Median milliseconds of fn: triton.testing.do_bench on a GPU (it flushes L2 between runs);
    a perf_counter median on the CPU smoke run."""
    if DEVICE.type == "cuda":
        import triton.testing

        try:
            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except TypeError:  # a Triton whose do_bench lacks return_mode: CUDA events, median of 20
            fn()
            torch.cuda.synchronize()
            samples = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            return statistics.median(samples)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def section_copy(run: Run) -> float | None:
    n_bytes = pick(1 << 30, 64 << 20)
    buffers = [torch.empty(n_bytes // 4, device=DEVICE).uniform_(), torch.empty(n_bytes // 4, device=DEVICE)]
    ms = bench_ms(lambda: buffers[1].copy_(buffers[0]), rep_ms=300)
    gbps = 2 * n_bytes / (ms * 1e-3) / 1e9
    buffers.clear()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    run.meta["copy_gbps"] = gbps
    run.record({"section": "copy", "name": f"copy {n_bytes >> 20} MiB", "status": "pass", "ms": ms, "gbps": gbps})
    run.log(f"  device copy of {n_bytes >> 20} MiB: {ms:.4f} ms -> {gbps:,.1f} GB/s (read + write)")
    return gbps


# =============================================================== 3. parity
# Tolerances on norm-relative error against float64. Bugs show up as O(1) errors or NaN;
# these leave room for honest rounding: fp32 sums over millions of rows, TF32 products
# (10-bit mantissa), and gradients returned in a half input's dtype.
TOL = {"ieee": 2e-5, "tf32": 1e-2, "fp64": 1e-10}  # honest fp32 errors here are ~1e-7 (CPU run)
HALF_OUT_TOL = {BF16: 2e-2, FP16: 3e-3}  # dX / dT come back rounded to x's dtype


@dataclass(frozen=True)
class MseCase:
    n: int
    d: int
    o: int
    x_dtype: torch.dtype
    precision: str = "ieee"
    bias: bool = True

    @property
    def name(self) -> str:
        return f"{self.n}x{self.d}->{self.o} {dn(self.x_dtype)}-in {self.precision}{'' if self.bias else ' no-bias'}"


def mse_cases() -> list[MseCase]:
    # GPU blocks (kernels/config.py): BLOCK_O >= 16; BLOCK_D capped at 8192 // BLOCK_O, so D = 600 with
    # O <= 16 and D = 300 with O = 33 take the multi-chunk path. CPU blocks: BLOCK_D <= 64.
    big_n = pick(2_000_003, 300)
    wide_d = pick(600, 70)
    return [
        MseCase(1, 1, 1, FP32), MseCase(5, 3, 2, FP32), MseCase(7, 1, 5, FP32), MseCase(33, 17, 1, FP32),
        MseCase(pick(1000, 40), wide_d, 3, FP32), MseCase(pick(4099, 70), 40, 33, FP32),
        MseCase(pick(2048, 50), pick(300, 70), 33, FP32), MseCase(100, 20, 3, FP32, bias=False),
        MseCase(big_n, 16, 4, FP32),
        MseCase(pick(4099, 70), pick(300, 70), 16, FP32, "tf32"), MseCase(big_n, 64, 4, FP32, "tf32"),
        MseCase(pick(4099, 70), pick(300, 70), 16, BF16), MseCase(pick(1000, 40), wide_d, 3, BF16),
        MseCase(big_n, 64, 4, BF16), MseCase(7, 3, 2, BF16),
        MseCase(pick(4099, 70), pick(300, 70), 16, FP16), MseCase(7, 3, 2, FP16),
        MseCase(513, pick(70, 20), 5, FP64),
    ]


def check_linear_mse(case: MseCase, seed: int) -> dict[str, Any]:
    from linreg_fused import linear_mse

    gen = generator(seed)
    x, t = make_xt(case.n, case.d, case.o, case.x_dtype, gen)
    w_dtype = FP64 if case.x_dtype == FP64 else FP32
    w, b = init_params(case.o, case.d, gen, case.bias)
    w, b = w.to(w_dtype), None if b is None else b.to(w_dtype)
    ref = ref_loss_grads(x, w, b, t)
    leaves = [v.requires_grad_() for v in (x, w, b, t) if v is not None]
    poison_allocator()
    loss = linear_mse(x, w, b, t, backend="triton", input_precision=case.precision)
    loss.backward()
    base = TOL["fp64"] if case.x_dtype == FP64 else TOL[case.precision]
    half = HALF_OUT_TOL.get(case.x_dtype, 0.0)
    errors = {"loss": (rel_err(loss, ref["loss"]), base), "dW": (rel_err(w.grad, ref["dW"]), base),
              "dX": (rel_err(x.grad, ref["dX"]), max(base, half)), "dT": (rel_err(t.grad, ref["dT"]), max(base, half))}
    if b is not None:
        errors["db"] = (rel_err(b.grad, ref["db"]), base)
    expect = torch.promote_types(case.x_dtype, w_dtype)
    fail = loss.dtype != expect or x.grad.dtype != case.x_dtype
    del leaves
    return {"errors": errors, "fail": fail, "loss_dtype": str(loss.dtype),
            "note": f"loss dtype {loss.dtype} (expected {expect})" if fail else ""}


def check_partials_direct(n: int, d: int, o: int, with_index: bool, seed: int) -> dict[str, Any]:
    """The gradient kernel and the reduce kernels called directly, outputs NaN-filled first."""
    from linreg_fused.kernels import linear_mse_grad, reduce_update
    from linreg_fused.kernels.specs import ColumnTarget

    gen = generator(seed)
    x, t = make_xt(n, d, o, FP32, gen)
    w, b = init_params(o, d, gen)
    idx = None
    if with_index:  # a batch of rows in random order, as fit's per-batch path gathers them
        idx = torch.randperm(n, generator=gen, device=DEVICE)[: max(1, n // 2)]
    xs, ts = (x, t) if idx is None else (x[idx], t[idx])
    ref = ref_loss_grads(xs, w, b, ts)
    poison_allocator()
    parts = linear_mse_grad.linear_mse_partials(x, w, b, t, row_index=idx, store_residual=True)
    scale = 1.0 / (xs.shape[0] * o)
    loss = reduce_update.sum_column(parts.buffer, parts.loss_column, scale, torch.full((), float("nan"), device=DEVICE))
    g_w = torch.full((o, d), float("nan"), device=DEVICE)
    g_b = torch.full((o,), float("nan"), device=DEVICE)
    reduce_update.reduce_update_(parts.buffer, [ColumnTarget(parts.weight_columns[0], g_w),
                                                ColumnTarget(parts.bias_columns[0], g_b)], scale=2 * scale)
    r_ref = (xs.double() @ w.double().t() + b.double() - ts.double())
    tol = TOL["ieee"]
    return {"errors": {"loss": (rel_err(loss, ref["loss"]), tol), "dW": (rel_err(g_w, ref["dW"]), tol),
                       "db": (rel_err(g_b, ref["db"]), tol), "residual": (rel_err(parts.residual, r_ref), tol)},
            "n_programs": parts.buffer.shape[0]}


def check_determinism(n: int, d: int, o: int, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Same inputs twice: loss, grads and a fused SGD step must be bitwise equal."""
    from linreg_fused import FusedLinearRegressor, FusedSGD, linear_mse

    gen = generator(seed)
    x, t = make_xt(n, d, o, dtype, gen)
    w0, b0 = init_params(o, d, gen)
    outs = []
    for _ in range(2):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        poison_allocator()
        loss = linear_mse(x, w, b, t, backend="triton")
        loss.backward()
        model = FusedLinearRegressor(d, o, device=DEVICE, backend="triton")
        with torch.no_grad():
            model.weight.copy_(w0)
            model.bias.copy_(b0)
        opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            model.train_step(x, t, opt)
        outs.append([loss.detach(), w.grad, b.grad, model.weight.detach().clone(), model.bias.detach().clone()])
    equal = all(torch.equal(a, b) for a, b in zip(*outs))
    return {"errors": {"bitwise_mismatch": (0.0 if equal else 1.0, 0.0)}}


SGD_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "damp+wd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "maximize+wd": dict(lr=0.01, weight_decay=1e-2, maximize=True),
}


def check_sgd_step_api(variant: str, seed: int) -> dict[str, Any]:
    """FusedSGD.step() on given .grad tensors vs torch.optim.SGD.step(), 5 steps."""
    from linreg_fused import FusedSGD

    gen = generator(seed)
    shapes = [(16, pick(300, 20)), (16,), (3, 5)]
    ps = [torch.randn(s, generator=gen, device=DEVICE) for s in shapes]
    grads = [[torch.randn(s, generator=gen, device=DEVICE) for s in shapes] for _ in range(5)]
    mine = [p.clone().requires_grad_() for p in ps]
    theirs = [p.clone().requires_grad_() for p in ps]
    opt_m = FusedSGD(mine, backend="triton", **SGD_VARIANTS[variant])
    opt_t = torch.optim.SGD(theirs, **SGD_VARIANTS[variant])
    for step in grads:
        for pm, pt, g in zip(mine, theirs, step):
            pm.grad, pt.grad = g.clone(), g.clone()
        opt_m.step()
        opt_t.step()
    errors = {f"param{i}": (rel_err(a, b), 1e-6) for i, (a, b) in enumerate(zip(mine, theirs))}
    for i, (a, b) in enumerate(zip(mine, theirs)):
        buf_m, buf_t = opt_m.state[a].get("momentum_buffer"), opt_t.state[b].get("momentum_buffer")
        if buf_t is not None:
            errors[f"buffer{i}"] = (rel_err(buf_m, buf_t) if buf_m is not None else float("nan"), 1e-6)
    return {"errors": errors}


def check_sgd_train_step(variant: str, seed: int) -> dict[str, Any]:
    """FusedLinearRegressor.train_step (fused backward + update) vs nn.Linear + mse + SGD, 5 steps;
    and loss(optimizer=).backward() against train_step (documented as the same kernels)."""
    from linreg_fused import FusedLinearRegressor, FusedSGD

    n, d, o = pick(4099, 70), pick(300, 20), 16
    gen = generator(seed)
    x, t = make_xt(n, d, o, FP32, gen)
    w0, b0 = init_params(o, d, gen)
    lin = nn.Linear(d, o, device=DEVICE)
    models = [FusedLinearRegressor(d, o, device=DEVICE, backend="triton") for _ in range(2)]
    for m in (lin, *models):
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)
    opt_t = torch.optim.SGD(lin.parameters(), **SGD_VARIANTS[variant])
    opts = [FusedSGD(m.parameters(), backend="triton", **SGD_VARIANTS[variant]) for m in models]
    losses = []
    for _ in range(5):
        opt_t.zero_grad()
        loss_t = F.mse_loss(lin(x), t)
        loss_t.backward()
        opt_t.step()
        loss_m = models[0].train_step(x, t, opts[0])
        models[1].loss(x, t, optimizer=opts[1]).backward()
        losses.append((float(loss_m), float(loss_t)))
    tol = 1e-4
    errors = {"W": (rel_err(models[0].weight, lin.weight), tol), "b": (rel_err(models[0].bias, lin.bias), tol),
              "loss": (max(abs(a - b) / abs(b) for a, b in losses), tol),
              "autograd_path_vs_train_step": (rel_err(models[1].weight, models[0].weight), 1e-6)}
    bitwise = torch.equal(models[1].weight, models[0].weight) and torch.equal(models[1].bias, models[0].bias)
    return {"errors": errors, "autograd_path_bitwise_equal": bitwise}


def eager_fit(x: torch.Tensor, t: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, lr: float, momentum: float,
              epochs: int, bs: int) -> tuple[list[float], nn.Linear]:
    """The tutorial's loop in plain PyTorch, rows in order: the reference trajectory."""
    lin = nn.Linear(x.shape[1], t.shape[1], device=DEVICE)
    with torch.no_grad():
        lin.weight.copy_(w0)
        lin.bias.copy_(b0)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=momentum)
    history = []
    for _ in range(epochs):
        total = torch.zeros((), device=DEVICE)
        count = 0
        for s in range(0, x.shape[0], bs):
            opt.zero_grad()
            loss = F.mse_loss(lin(x[s : s + bs]), t[s : s + bs])
            loss.backward()
            opt.step()
            total += loss.detach()
            count += 1
        history.append(float(total / count))
    return history, lin


def check_fit(kind: str, seed: int) -> dict[str, Any]:
    """fit's trajectory against an eager loop over the same batches (no shuffling), or, shuffled,
    against the reference backend fed the same seeded permutations."""
    from linreg_fused import FusedLinearRegressor, FusedSGD
    from linreg_fused.backend import select_ops
    from linreg_fused.data import crop_yields

    gen = generator(seed)
    if kind.startswith("tutorial"):
        x, t = crop_yields(device=DEVICE)
        lr, bs, epochs = 1e-5, 5, pick(100, 10)
        momentum = 0.9 if "momentum" in kind else 0.0
    else:  # the per-batch path (too big for one program): rows gathered in the kernel
        x, t = make_xt(pick(4096, 128), pick(64, 32), pick(4, 8), FP32, gen)
        lr, bs, epochs, momentum = 0.05, pick(256, 64), 3, 0.0
    w0, b0 = init_params(t.shape[1], x.shape[1], gen)
    persistent = select_ops("triton", DEVICE).fit_small_supported(bs, x.shape[1], t.shape[1])
    backends = ("triton", "torch") if "shuffled" in kind else ("triton",)
    results = []
    for backend in backends:
        model = FusedLinearRegressor(x.shape[1], t.shape[1], device=DEVICE, backend=backend)
        with torch.no_grad():
            model.weight.copy_(w0)
            model.bias.copy_(b0)
        opt = FusedSGD(model.parameters(), lr=lr, momentum=momentum, backend=backend)
        hist = model.fit(x, t, epochs=epochs, batch_size=bs, optimizer=opt, shuffle="shuffled" in kind,
                         seed=seed if "shuffled" in kind else None, progress=False)
        results.append((hist, model))
    if "shuffled" in kind:
        (hist, model), (ref_hist, ref) = results
    else:
        (hist, model), = results
        ref_hist, ref = eager_fit(x, t, w0, b0, lr, momentum, epochs, bs)
    tol = 1e-4
    hist_err = max(abs(a - b) / abs(b) for a, b in zip(hist, ref_hist))
    wrong_path = persistent == (kind == "per-batch")  # the case must exercise the path it names
    return {"errors": {"history": (hist_err, tol), "W": (rel_err(model.weight, ref.weight), tol),
                       "b": (rel_err(model.bias, ref.bias), tol)},
            "fail": wrong_path, "persistent_kernel": persistent, "epochs": epochs, "final_loss": hist[-1],
            "note": f"persistent={persistent}"}


def check_inference(n: int, d: int, o: int, dtype: torch.dtype, precision: str, seed: int,
                    lead: tuple[int, ...] = ()) -> dict[str, Any]:
    """model(x) against float64 and against nn.Linear (fp32 inputs)."""
    from linreg_fused import FusedLinearRegressor

    gen = generator(seed)
    x, _ = make_xt(n, d, o, dtype, gen)
    if lead:
        x = x.reshape(*lead, -1, d)
    model = FusedLinearRegressor(d, o, device=DEVICE, backend="triton", input_precision=precision)
    w0, b0 = init_params(o, d, gen)
    with torch.no_grad():
        model.weight.copy_(w0)
        model.bias.copy_(b0)
        poison_allocator()
        y = model(x)
        ref = x.double() @ w0.double().t() + b0.double()
    tol = TOL[precision]
    errors = {"vs_float64": (rel_err(y, ref), tol)}
    if dtype == FP32:
        lin = nn.Linear(d, o, device=DEVICE)
        lin.load_state_dict(model.state_dict())
        with torch.no_grad():
            errors["vs_nn.Linear"] = (rel_err(y, lin(x)), tol)
    fail = y.shape != (*x.shape[:-1], o) or y.dtype != FP32
    return {"errors": errors, "fail": fail, "out_dtype": str(y.dtype)}


def section_parity(run: Run) -> None:
    sec = "parity"
    seed = 100
    run.log("  -- linear_mse loss / dW / db / dX / dT vs float64 (autograd Function, Triton backend)")
    for case in mse_cases():
        seed += 1
        run.check(sec, f"linear_mse {case.name}", lambda c=case, s=seed: check_linear_mse(c, s))
    run.log("  -- gradient + reduce kernels called directly (NaN-filled outputs)")
    for n, d, o, idx in ((pick(100_003, 200), pick(600, 70), 3, False), (pick(100_003, 200), 64, 4, True),
                         (1, 1, 1, False), (pick(5000, 90), pick(300, 70), 33, True)):
        seed += 1
        run.check(sec, f"partials+reduce {n}x{d}->{o}{' row_index' if idx else ''}",
                  lambda n=n, d=d, o=o, i=idx, s=seed: check_partials_direct(n, d, o, i, s))
    run.log("  -- determinism (two runs, bitwise)")
    for n, d, o, dt in ((pick(1_000_003, 200), 64, 4, FP32), (pick(4099, 70), pick(300, 70), 16, BF16)):
        seed += 1
        run.check(sec, f"determinism {n}x{d}->{o} {dn(dt)}", lambda n=n, d=d, o=o, dt=dt, s=seed: check_determinism(n, d, o, dt, s))
    run.log("  -- FusedSGD vs torch.optim.SGD")
    for variant in SGD_VARIANTS:
        seed += 1
        run.check(sec, f"FusedSGD.step() {variant}", lambda v=variant, s=seed: check_sgd_step_api(v, s))
        run.check(sec, f"train_step vs eager SGD {variant}", lambda v=variant, s=seed: check_sgd_train_step(v, s))
    run.log("  -- fit vs an eager loop")
    # Shuffled fits are compared with the reference backend only where both take the persistent path
    # (the tutorial): they then draw the same permutations from the same seed.
    for kind in ("tutorial", "tutorial-momentum", "tutorial-shuffled", "per-batch"):
        seed += 1
        run.check(sec, f"fit {kind}", lambda k=kind, s=seed: check_fit(k, s), need_s=5.0)
    run.log("  -- inference vs nn.Linear and float64")
    for n, d, o, dt, prec, lead in ((1, 1, 1, FP32, "ieee", ()), (pick(1000, 40), pick(600, 70), 3, FP32, "ieee", ()),
                                    (pick(4099, 70), pick(300, 70), 33, FP32, "ieee", ()),
                                    (pick(2_000_003, 300), 64, 4, FP32, "ieee", ()),
                                    (pick(4099, 70), pick(300, 70), 16, FP32, "tf32", ()),
                                    (pick(4099, 70), pick(300, 70), 16, BF16, "ieee", ()),
                                    (100, 30, 5, FP32, "ieee", (2,))):
        seed += 1
        run.check(sec, f"inference {n}x{d}->{o} {dn(dt)} {prec}{' 3-D' if lead else ''}",
                  lambda n=n, d=d, o=o, dt=dt, p=prec, lead=lead, s=seed: check_inference(n, d, o, dt, p, s, lead))


# =============================================================== 4. timings
@dataclass(frozen=True)
class Regime:
    name: str
    kind: str  # "fit" | "step" | "inference"
    n: int
    d: int
    o: int
    batch: int | None
    dtype: torch.dtype
    lr: float
    epochs: int = 1

    @property
    def group(self) -> str:
        return f"{self.name} {dn(self.dtype)} {self.n}x{self.d}->{self.o} {'full' if self.batch is None else f'batch {self.batch}'}"

    @property
    def steps_per_call(self) -> int:
        if self.kind == "fit":
            return self.epochs * math.ceil(self.n / self.batch)
        return 1 if self.batch is None else math.ceil(self.n / self.batch)

    @property
    def bytes_per_step(self) -> int:
        """One read of X and T (inference: X read, Y written), as the performance brief counts."""
        return (self.batch or self.n) * (self.d + self.o) * (torch.finfo(self.dtype).bits // 8)


def regimes() -> list[Regime]:
    full = pick((("tall", 4_194_304, 64, 4), ("wide", 1_048_576, 256, 16), ("deep", 262_144, 1024, 8)),
                (("small", 256, 16, 4),))
    mb = pick((65536, 256, 16, 1024), (512, 16, 4, 128))
    out = [Regime("tutorial", "fit", 15, 3, 2, 5, FP32, 1e-5, epochs=pick(100, 2))]
    for dt in (FP32, BF16):
        out.append(Regime("minibatch", "step", *mb, dt, 0.05))
    # Several shuffled epochs per call: fit's CUDA-graph replay (captured after the first epoch) against
    # eager and CUDA-graphed PyTorch over the same number of steps.
    out.append(Regime("minibatch-fit", "fit", *mb, FP32, 0.05, epochs=pick(10, 3)))
    for dt in (FP32, BF16):
        out += [Regime(name, "step", n, d, o, None, dt, 0.1) for name, n, d, o in full]
    out += [Regime(f"inference-{name}", "inference", n, d, o, None, FP32, 0.0) for name, n, d, o in full]
    return out


@dataclass
class Timed:
    """A peer ready to time: call() runs steps_per_call steps (and returns the last loss or output)."""

    call: Callable[[], Any]
    first_loss: Callable[[], torch.Tensor] | None  # one step from (w0, b0) on the first batch
    numerics: str


class Problem:
    """A regime's data and initial weights (one group held at a time)."""

    def __init__(self, r: Regime, seed: int) -> None:
        from linreg_fused.data import crop_yields

        self.r = r
        gen = generator(seed)
        if r.name == "tutorial":
            self.x, self.t = crop_yields(device=DEVICE)
        else:
            self.x, self.t = make_xt(r.n, r.d, r.o, r.dtype, gen)
        self.w0, self.b0 = init_params(r.o, r.d, gen)
        bs = r.batch or r.n
        self.batches = [(self.x[s : s + bs], self.t[s : s + bs]) for s in range(0, r.n, bs)]
        x0, t0 = self.batches[0]
        res = x0.double() @ self.w0.double().t() + self.b0.double() - t0.double()
        self.ref_first_loss = float((res * res).mean())

    def load(self, module: nn.Module) -> None:
        with torch.no_grad():
            module.weight.copy_(self.w0)
            module.bias.copy_(self.b0)

    def epoch_orders(self) -> Iterator[torch.Tensor]:
        for _ in range(self.r.epochs):
            yield torch.randperm(self.r.n, device=DEVICE)


def _eager_step_fn(lin: nn.Linear, opt: torch.optim.Optimizer, mode: str) -> Callable:
    def step(xb: torch.Tensor, yb: torch.Tensor, zero: bool = True) -> torch.Tensor:
        if zero:
            opt.zero_grad(set_to_none=True)
        if mode == "autocast":
            with torch.autocast(xb.device.type, dtype=BF16, cache_enabled=False):
                loss = F.mse_loss(lin(xb), yb)
        else:
            loss = F.mse_loss(lin(xb), yb)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _loop(p: Problem, step: Callable) -> Callable[[], Any]:
    """The call of a "fit" regime (shuffled batches gathered by index) or a "step" regime."""
    r = p.r
    if r.kind == "fit":
        def call() -> Any:
            for order in p.epoch_orders():
                for s in range(0, r.n, r.batch):
                    idx = order[s : s + r.batch]
                    loss = step(p.x[idx], p.t[idx])
            return loss
    else:
        def call() -> Any:
            for xb, yb in p.batches:
                loss = step(xb, yb)
            return loss
    return call


def build_peer(p: Problem, peer: str) -> Timed:
    """Peers: eager[-autocast|-pure-bf16][-sgd-fused], eager-cudagraph, eager-compile, fused, fused-tf32, fused-fit,
    nn.Linear, fused-forward."""
    from linreg_fused import FusedLinearRegressor, FusedSGD

    r = p.r
    if r.kind == "inference":
        model = nn.Linear(r.d, r.o, device=DEVICE) if peer == "nn.Linear" else \
            FusedLinearRegressor(r.d, r.o, device=DEVICE, backend="triton")
        p.load(model)

        @torch.no_grad()
        def forward() -> torch.Tensor:
            return model(p.x)
        return Timed(forward, None, "fp32")

    if peer.startswith("fused"):
        model = FusedLinearRegressor(r.d, r.o, device=DEVICE, backend="triton",
                                     input_precision="tf32" if peer == "fused-tf32" else "ieee")
        opt = FusedSGD(model.parameters(), lr=r.lr, backend="triton")
        p.load(model)
        numerics = "tf32" if peer == "fused-tf32" else "fp32"

        def first() -> torch.Tensor:
            p.load(model)
            return model.train_step(*p.batches[0], opt)
        if peer == "fused-fit":
            def fit_call() -> Any:
                return model.fit(p.x, p.t, epochs=r.epochs, batch_size=r.batch, optimizer=opt, progress=False)
            return Timed(fit_call, first, numerics)
        return Timed(_loop(p, lambda xb, yb: model.train_step(xb, yb, opt)), first, numerics)

    mode = "pure-bf16" if "pure-bf16" in peer else ("autocast" if r.dtype == BF16 else "fp32")
    numerics = {"pure-bf16": "pure-bf16", "autocast": "autocast", "fp32": "fp32"}[mode]
    lin = nn.Linear(r.d, r.o, device=DEVICE, dtype=BF16 if mode == "pure-bf16" else FP32)
    p.load(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=r.lr, fused=True if "sgd-fused" in peer else None)
    step = _eager_step_fn(lin, opt, mode)

    def first_eager() -> torch.Tensor:
        p.load(lin)
        return step(*p.batches[0])

    if peer.endswith("compile"):
        step = torch.compile(step)
        return Timed(_loop(p, step), first_eager, numerics)
    if not peer.endswith("cudagraph"):
        return Timed(_loop(p, step), first_eager, numerics)

    # CUDA graph: warm up on a side stream, then capture. "fit": one step gathering through a static
    # index buffer, refilled from each epoch's permutation; "step": one graph per batch.
    index = torch.arange(r.batch or 1, device=DEVICE)
    if r.kind == "fit":
        bodies = [lambda: step(p.x.index_select(0, index), p.t.index_select(0, index), zero=False)]
    else:
        bodies = [lambda xb=xb, yb=yb: step(xb, yb, zero=False) for xb, yb in p.batches]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for body in bodies:
                opt.zero_grad(set_to_none=True)
                body()
    torch.cuda.current_stream().wait_stream(side)
    graphs, losses = [], []
    for body in bodies:
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
        with torch.cuda.graph(g):
            losses.append(body())
        graphs.append(g)

    if r.kind == "fit":
        def graph_call() -> Any:
            for order in p.epoch_orders():
                for s in range(0, r.n, r.batch):
                    index.copy_(order[s : s + r.batch])
                    graphs[0].replay()
            return losses[0]

        def graph_first() -> torch.Tensor:
            p.load(lin)
            index.copy_(torch.arange(r.batch, device=DEVICE))
            graphs[0].replay()
            return losses[0]
    else:
        def graph_call() -> Any:
            for g in graphs:
                g.replay()
            return losses[-1]

        def graph_first() -> torch.Tensor:
            p.load(lin)
            graphs[0].replay()
            return losses[0]
    return Timed(graph_call, graph_first, numerics)


FIRST_LOSS_TOL = {"fp32": 2e-5, "tf32": 1e-2, "autocast": 3e-2, "pure-bf16": 5e-2}


def peers_of(r: Regime, with_compile: bool) -> list[str]:
    """Baseline first. Compile peers come last in the section (see section_timing)."""
    if r.kind == "inference":
        return ["nn.Linear", "fused-forward"]
    if r.dtype == BF16:
        eager = ["eager-autocast", "eager-autocast-sgd-fused", "eager-pure-bf16", "eager-autocast-cudagraph"]
    else:
        eager = ["eager", "eager-sgd-fused", "eager-cudagraph"]
    if SMOKE:
        eager = [e for e in eager if not e.endswith("cudagraph")]
    fused = ["fused"] + (["fused-tf32"] if r.dtype == FP32 and not SMOKE else [])
    if r.kind == "fit":
        fused = ["fused-fit", "fused"]
    elif r.batch is not None:
        fused.append("fused-fit")
    compile_ = [("eager-autocast-compile" if r.dtype == BF16 else "eager-compile")] if with_compile else []
    return eager + fused + compile_


def time_peer(run: Run, p: Problem, peer: str, copy_gbps: float | None, baselines: dict[str, float],
              need_s: float) -> None:
    r = p.r
    name = f"{r.group} :: {peer}"
    blocked = run._blocked(need_s)
    if blocked:
        run.record({"section": "timing", "name": name, "group": r.group, "peer": peer, "status": "skip", "reason": blocked})
        run.log(f"  skip  {peer}: {blocked}")
        return
    t0 = time.monotonic()
    try:
        timed = build_peer(p, peer)
        row: dict[str, Any] = {}
        if timed.first_loss is not None:  # the timed peer computes the right thing
            loss = float(timed.first_loss())
            err = abs(loss - p.ref_first_loss) / abs(p.ref_first_loss)
            tol = FIRST_LOSS_TOL[timed.numerics]
            row.update(first_loss_rel_err=err, first_loss_tol=tol)
            if not err <= tol:
                msg = f"first-step loss {loss} vs float64 {p.ref_first_loss} (rel {err:.2e} > {tol}): not timed"
                run.record({"section": "timing", "name": name, "group": r.group, "peer": peer, "status": "fail",
                            "error": msg, **row})
                run.log(f"  FAIL  {peer}: {msg}")
                return
        timed.call()  # warm-up: JIT, compile, cuBLAS handles
        timed.call()
        sync()
        peak_extra = peak = None
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            timed.call()
            sync()
            peak = torch.cuda.max_memory_allocated()
            peak_extra = peak - before
        ms = bench_ms(timed.call, rep_ms=pick(200, 1), warmup_ms=pick(25, 1))
        out = timed.call()
        sync()
        finite = out is None or (bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor)
                                 else all(math.isfinite(v) for v in out))
        per_step_ms = ms / r.steps_per_call
        gbps = r.bytes_per_step / (per_step_ms * 1e-3) / 1e9
        if peer in ("eager", "eager-autocast", "nn.Linear"):
            baselines[r.group] = per_step_ms
        base = baselines.get(r.group)
        row.update(section="timing", name=name, group=r.group, peer=peer, status="pass" if finite else "fail",
                   ms_per_call=ms, steps_per_call=r.steps_per_call, ms_per_step=per_step_ms,
                   bytes_per_step=r.bytes_per_step, gbps=gbps, frac_copy=gbps / copy_gbps if copy_gbps else None,
                   speedup_vs_eager=base / per_step_ms if base else None, peak_mem_bytes=peak,
                   peak_extra_bytes=peak_extra, seconds=round(time.monotonic() - t0, 2))
        if not finite:
            row["error"] = "non-finite output after timing"
        run.record(row)
        run.log(f"  {peer:26s} {per_step_ms * 1e3:12.2f} us/step {gbps:10.1f} GB/s"
                + (f" {100 * gbps / copy_gbps:6.1f}% copy" if copy_gbps else "")
                + (f" {base / per_step_ms:7.2f}x eager" if base else "")
                + (f"  peak +{peak_extra / 2**20:.1f} MiB" if peak_extra is not None else ""))
    except Exception as err:  # noqa: BLE001
        row = run._error("timing", name, err)
        row.update(group=r.group, peer=peer)
        run.record(row)


def section_timing(run: Run, copy_gbps: float | None) -> None:
    baselines: dict[str, float] = {}
    with_compile = not (ARGS.skip_compile or SMOKE)
    compile_later: list[Regime] = []
    for i, r in enumerate(regimes()):
        blocked = run._blocked(10.0)
        if blocked:
            run.record({"section": "timing", "name": r.group, "status": "skip", "reason": blocked})
            run.log(f"  skip group {r.group}: {blocked}")
            continue
        run.log(f"  -- {r.group} ({r.bytes_per_step / 1e6:.4g} MB per step)")
        try:
            p = Problem(r, seed=1000 + i)
        except Exception as err:  # noqa: BLE001
            run.record(run._error("timing", r.group, err))
            continue
        for peer in peers_of(r, with_compile=False):
            time_peer(run, p, peer, copy_gbps, baselines, need_s=3.0)
        # torch.compile takes tens of seconds per shape: only the performance brief's compile regimes, at the end.
        if with_compile and r.dtype == FP32 and r.name in ("tutorial", "tall", "wide"):
            compile_later.append(r)
        del p
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    for r in compile_later:
        run.log(f"  -- {r.group}: torch.compile peer")
        try:
            p = Problem(r, seed=1000 + regimes().index(r))
        except Exception as err:  # noqa: BLE001
            run.record(run._error("timing", r.group, err))
            continue
        time_peer(run, p, "eager-compile", copy_gbps, baselines, need_s=60.0)
        del p
        torch.cuda.empty_cache()


# =============================================================== 4b. block sweep (--sweep)
def sweep_configs(d: int, o: int) -> list[tuple[str, Any, str]]:
    """(label, TileConfig, input_precision): the heuristic, programs-per-SM variants of it,
    FMA-product blocks (O < 16) and tl.dot blocks in IEEE and TF32."""
    from dataclasses import replace

    from triton import next_power_of_2 as p2

    from linreg_fused.kernels.config import TileConfig, grad_config

    base = grad_config(d, o, DEVICE, FP32, "ieee")
    sms = base.max_programs // 2 if DEVICE.type == "cuda" else 2
    out = [("heuristic", base, "ieee")]
    out += [(f"heuristic, {k} programs/SM", replace(base, max_programs=k * sms), "ieee") for k in (1, 4, 8)]
    if o < 16:
        for bn, bd, warps in pick([(16, 64, 4), (32, 64, 4), (64, 64, 8), (32, 128, 8), (16, 128, 4)], [(8, 8, 4)]):
            bd = min(bd, p2(d))
            if bn * bd * p2(o) <= 16384:
                out.append((f"fma n{bn} d{bd} w{warps}", TileConfig(bn, bd, p2(o), False, base.max_programs, warps),
                            "ieee"))
    for bn, bd, warps in pick([(32, 64, 4), (64, 128, 4), (64, 256, 8), (128, 64, 8)], [(16, 16, 4)]):
        cfg = TileConfig(bn, max(16, min(bd, p2(d))), max(16, p2(o)), True, base.max_programs, warps)
        out += [(f"dot-{prec} n{bn} d{cfg.block_d} w{warps}", cfg, prec) for prec in ("ieee", "tf32")]
    seen, unique = set(), []
    for label, cfg, prec in out:
        if (cfg, prec) not in seen:
            seen.add((cfg, prec))
            unique.append((label, cfg, prec))
    return unique


def _sweep_regime(run: Run, group: str, tensors: tuple[torch.Tensor, ...], copy_gbps: float | None,
                  d: int, o: int) -> tuple[str, float, float] | None:
    """Every config of one regime, checked then timed; returns the fastest (label, ms, GB/s)."""
    from linreg_fused.kernels.linear_mse_grad import linear_mse_partials

    x, w, b, t = tensors
    ref = linear_mse_partials(x, w, b, t).buffer.double().sum(0)
    n_bytes = x.shape[0] * (d + o) * x.element_size()
    results: list[tuple[str, float, float]] = []
    for label, cfg, prec in sweep_configs(d, o):
        def one(label: str = label, cfg: Any = cfg, prec: str = prec) -> dict[str, Any]:
            sums = linear_mse_partials(x, w, b, t, config=cfg, input_precision=prec).buffer.double().sum(0)
            err = rel_err(sums, ref)
            ms = bench_ms(lambda: linear_mse_partials(x, w, b, t, config=cfg, input_precision=prec), rep_ms=100)
            gbps = n_bytes / (ms * 1e-3) / 1e9
            results.append((label, ms, gbps))
            frac = f", {100 * gbps / copy_gbps:.1f}% of copy" if copy_gbps else ""
            return {"errors": {"sums vs heuristic": (err, TOL["tf32"] if prec == "tf32" else TOL["ieee"])},
                    "group": group, "config": repr(cfg), "precision": prec, "ms": ms, "gbps": gbps,
                    "note": f"{ms:.4f} ms, {gbps:,.0f} GB/s{frac}"}
        run.check("sweep", f"{group} :: {label}", one, need_s=4.0)
    return min(results, key=lambda r: r[1]) if results else None


def section_sweep(run: Run, copy_gbps: float | None) -> None:
    """The single-pass kernel alone (it dominates a full-batch step) over block configs; every
    config's column sums are checked against the heuristic's before it is timed."""
    shapes = pick([("tall", 4_194_304, 64, 4, FP32), ("wide", 1_048_576, 256, 16, FP32),
                   ("deep", 262_144, 1024, 8, FP32), ("wide", 1_048_576, 256, 16, BF16),
                   ("tall", 4_194_304, 64, 4, BF16)], [("small", 256, 16, 4, FP32)])
    best: list[tuple[str, str, float, float]] = []
    for i, (name, n, d, o, dtype) in enumerate(shapes):
        group = f"{name} {dn(dtype)} {n}x{d}->{o}"
        run.log(f"  -- {group}")
        try:
            gen = generator(2000 + i)
            x, t = make_xt(n, d, o, dtype, gen)
            w, b = init_params(o, d, gen)
            fastest = _sweep_regime(run, group, (x, w, b, t), copy_gbps, d, o)
        except Exception as err:  # noqa: BLE001 -- recorded, and the run goes on
            run.record(run._error("sweep", group, err))
            continue
        if fastest:
            best.append((group, *fastest))
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    run.log("\nfastest config per regime (single-pass kernel only):")
    for group, label, ms, gbps in best:
        frac = f"{100 * gbps / copy_gbps:5.1f}% of copy" if copy_gbps else ""
        run.log(f"  {group:32s} {label:36s} {ms:9.4f} ms {gbps:9,.0f} GB/s {frac}")


# =============================================================== 5. summary
def summary(run: Run) -> int:
    path = run.write()
    counts: dict[str, int] = {}
    for row in run.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    run.log(f"\n=== summary  ({run.elapsed():.0f} s; rows: {counts}; JSON: {path})")
    bad = [row for row in run.rows if row["status"] in ("fail", "error")]
    for row in bad:
        why = row.get("error") or ", ".join(
            f"{k} {v['error']:.2e} > {v['tol']:.0e}" for k, v in row.get("errors", {}).items() if k in row.get("failed", []))
        run.log(f"  {row['status'].upper():5s} [{row['section']}] {row['name']}: {str(why).splitlines()[0][:200]}")
    timing = [row for row in run.rows if row["section"] == "timing" and "ms_per_step" in row]
    if timing:
        copy = run.meta.get("copy_gbps")
        run.log(f"\ncopy ceiling {copy:,.1f} GB/s" if copy else "\ncopy ceiling: not measured")
        if SMOKE:
            run.log("CPU SMOKE RUN: interpreter figures, not GPU performance")
        head = f"{'group':44s} {'peer':26s} {'us/step':>11s} {'GB/s':>9s} {'%copy':>6s} {'x eager':>8s} {'peak+MiB':>9s}"
        run.log(head)
        run.log("-" * len(head))
        for row in timing:
            frac = row.get("frac_copy")
            sp = row.get("speedup_vs_eager")
            pk = row.get("peak_extra_bytes")
            run.log(f"{row['group'][:44]:44s} {row['peer'][:26]:26s} {row['ms_per_step'] * 1e3:11.2f} {row['gbps']:9.1f} "
                    f"{'' if frac is None else f'{100 * frac:5.1f}%':>6s} {'' if sp is None else f'{sp:7.2f}x':>8s} "
                    f"{'' if pk is None else f'{pk / 2**20:9.1f}':>9s}")
    return 1 if bad else 0


def main() -> int:
    if not SMOKE and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this script measures a GPU. Run it on an H100/H200 "
              "(or use --cpu-smoke to dry-run every section through Triton's interpreter).", file=sys.stderr)
        return 2
    run = Run(ARGS.outdir, ARGS.budget_s)
    run.log(f"linreg-fused gpu_check ({'CPU SMOKE RUN' if SMOKE else 'GPU'}) -> {ARGS.outdir}, budget {ARGS.budget_s:.0f} s")
    with run.section("1. versions", need_s=1.0) as ok:
        if ok:
            section_versions(run)
    copy_gbps = None
    with run.section("2. copy ceiling", need_s=2.0) as ok:
        if ok:
            copy_gbps = section_copy(run)
    if ARGS.sweep:
        with run.section("4b. block sweep of the single-pass kernel", need_s=10.0) as ok:
            if ok:
                section_sweep(run, copy_gbps)
        return summary(run)
    run.section_deadline = PARITY_SHARE * ARGS.budget_s
    with run.section("3. parity against float64 and PyTorch", need_s=10.0) as ok:
        if ok:
            section_parity(run)
    run.section_deadline = None
    with run.section("4. timings (triton.testing.do_bench medians)", need_s=10.0) as ok:
        if ok:
            section_timing(run, copy_gbps)
    return summary(run)


if __name__ == "__main__":
    sys.exit(main())
