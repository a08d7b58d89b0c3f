"""The rows of a GPU check run and the ``ctx`` each section gets (bench/gpu_check.py runs them).

A section (bench/gpu_<topic>.py) uses only this interface of ``Ctx``:

    ctx.device, ctx.smoke, ctx.left_s(), ctx.copy_gbps
    ctx.parity(name, got, ref, tol, **info) -> bool
    ctx.time(name, fn, *, bytes=None, flops=None, **info) -> float     # ms, do_bench median, cold L2
    ctx.steady(name, step, *, n=100, bytes=None, **info) -> float      # ms per call, n calls, one sync
    ctx.record(name, **fields)
    ctx.skip(name, reason)

The project's own sections also use ``ctx.log``, ``ctx.guard`` (one failure recorded, the
section goes on), ``ctx.sync``, ``ctx.ceilings`` (every ceiling measured by the run),
``ctx.shard`` and ``ctx.options``. Every row is a dict with "section", "name", "status" and "t_s" (seconds
since the run began); "measure" says which method made it. Status: "pass"/"fail" (a check),
"ok" (a measurement), "info" (a record), "skip", "error".
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from timing import bench_ms

SMOKE_STEADY_N = 2  # the steady loop's calls per round on the CPU smoke run (the interpreter is slow)
CUDA_BROKEN = ("CUDA error", "illegal memory access", "device-side assert", "unspecified launch",
               "CUBLAS_STATUS_EXECUTION_FAILED", "an illegal instruction")


class SectionTimeout(BaseException):
    """Raised in a section that outlives its time limit (a BaseException: ``except Exception``
    in a section does not swallow it)."""


class Recorder:
    """The rows of one process, its log, and where they go: printed, appended to the log file,
    and (in a child process of the parallel phase) appended to a JSON-lines file as they come,
    so that the rows of a child that is stopped are not lost."""

    def __init__(self, start: float, log_path: Path | None = None, rows_path: Path | None = None,
                 echo: bool = True) -> None:
        self.start = start  # time.monotonic() at the run's start (this process's clock)
        self.rows: list[dict[str, Any]] = []
        self.cuda_broken: str | None = None
        self.echo = echo
        self._log = open(log_path, "a") if log_path else None
        self._rows_file = open(rows_path, "a") if rows_path else None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, msg: str = "") -> None:
        if self.echo:
            print(msg, flush=True)
        if self._log:
            self._log.write(msg + "\n")
            self._log.flush()

    def add(self, row: dict[str, Any], line: str | None = None) -> dict[str, Any]:
        row.setdefault("t_s", round(self.elapsed(), 2))
        self.rows.append(row)
        if self._rows_file:
            self._rows_file.write(json.dumps(row, default=str) + "\n")
            self._rows_file.flush()
        if line:
            self.log(line)
        return row


def max_rel_error(got: Any, ref: Any) -> tuple[float, float]:
    """(max |got - ref| / max |ref|, ||got - ref|| / ||ref||) in float64; NaN anywhere gives NaN."""
    g = torch.as_tensor(got).detach()
    r = torch.as_tensor(ref).detach()
    g, r = g.to(device=r.device, dtype=torch.float64), r.to(torch.float64)
    diff = (g - r).abs()
    if diff.numel() == 0:
        return 0.0, 0.0
    if torch.isnan(diff).any():
        return math.nan, math.nan
    scale, norm = float(r.abs().max()), float(r.norm())
    max_err, norm_err = float(diff.max()), float(diff.norm())
    return (max_err / scale if scale > 0 else max_err), (norm_err / norm if norm > 0 else norm_err)


class Ctx:
    """What one section sees. deadline: time.monotonic() at which the section's budget ends."""

    def __init__(self, recorder: Recorder, section: str, *, device: torch.device, smoke: bool, deadline: float,
                 ceilings: dict[str, float | None] | None = None, alone: bool = True,
                 shard: tuple[int, int] = (0, 1), options: dict[str, Any] | None = None,
                 sync: Callable[[], None] | None = None, bench: Callable[..., float] | None = None) -> None:
        self.recorder, self.section = recorder, section
        self.device, self.smoke, self.deadline = device, smoke, deadline
        self.ceilings = dict(ceilings or {})
        self.copy_gbps = None if smoke else self.ceilings.get("copy_gbps")
        self.alone = alone  # False in the parallel phase: timings there share the GPU with other processes
        self.shard = shard  # (i, k): this process does the i-th of k shares of a section's warm-up
        self.options = dict(options or {})
        self._sync = sync or ((lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None))
        self._bench = bench or (_one_call_ms if smoke else bench_ms)

    # ------------------------------------------------------------ the budget
    def left_s(self) -> float:
        """Seconds left of this section's budget (never more than the run has left)."""
        return self.deadline - time.monotonic()

    def _out_of_time(self, name: str) -> bool:
        if self.left_s() > 0:
            return False
        self.skip(name, "the section's time budget is spent")
        return True

    # ------------------------------------------------------------ rows
    def _row(self, name: str, status: str, measure: str, fields: dict[str, Any]) -> dict[str, Any]:
        row = {"section": self.section, "name": name, "status": status, "measure": measure}
        row.update((k, v) for k, v in fields.items() if k not in row)  # a section cannot rename its rows
        if not self.alone and measure in ("time", "steady"):
            row["timed_alone"] = False  # beside the other processes of the parallel phase: not a performance figure
        return row

    def record(self, name: str, **fields: Any) -> dict[str, Any]:
        """Any row (a host time, a count); status "info" unless fields say otherwise."""
        status = fields.pop("status", "info")
        shown = ", ".join(f"{k}={_short(v)}" for k, v in fields.items() if not isinstance(v, (dict, list)))[:240]
        return self.recorder.add(self._row(name, status, "record", fields),
                                 f"  {status.upper():5s} {name}" + (f": {shown}" if shown else ""))

    def skip(self, name: str, reason: str) -> None:
        self.recorder.add(self._row(name, "skip", "skip", {"reason": reason}), f"  skip  {name}: {reason}")

    def error(self, name: str, err: BaseException, **fields: Any) -> None:
        """An exception as a row; a CUDA error that breaks the context is remembered (bench/gpu_check.py
        then goes on in a fresh process)."""
        text = f"{type(err).__name__}: {err}"
        if any(marker in text for marker in CUDA_BROKEN):
            self.recorder.cuda_broken = text.splitlines()[0][:200]
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=8))
        self.recorder.add(self._row(name, "error", "error", {"error": text[:2000], "traceback": tb[-4000:], **fields}),
                          f"  ERROR {name}: {text.splitlines()[0][:300] if text else type(err).__name__}")

    @contextlib.contextmanager
    def guard(self, name: str, **fields: Any) -> Iterator[None]:
        """Run a block; an exception in it becomes an error row and the section goes on."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 -- recorded; the run goes on
            self.error(name, err, **fields)

    def log(self, msg: str) -> None:
        self.recorder.log(msg)

    def sync(self) -> None:
        """Wait for the device (a no-op on the CPU)."""
        self._sync()

    # ------------------------------------------------------------ checks and timings
    def parity(self, name: str, got: Any, ref: Any, tol: float, **info: Any) -> bool:
        """Max relative error of got against the float64 reference ref (max |got - ref| over
        max |ref|; the norm-relative error is recorded too); pass iff error <= tol (NaN fails)."""
        got_shape, ref_shape = tuple(torch.as_tensor(got).shape), tuple(torch.as_tensor(ref).shape)
        if got_shape != ref_shape:
            err = norm_err = math.nan
            info["shape_mismatch"] = f"{got_shape} vs {ref_shape}"
        else:
            err, norm_err = max_rel_error(got, ref)
        ok = err <= tol  # False for NaN
        row = self._row(name, "pass" if ok else "fail", "parity",
                        {"error": err, "norm_rel_error": norm_err, "tol": tol, **info})
        self.recorder.add(row, f"  {row['status'].upper():5s} {name}: error {err:.2e} (tol {tol:.0e})"
                          + (f" {info['shape_mismatch']}" if "shape_mismatch" in info else ""))
        return ok

    def time(self, name: str, fn: Callable[[], Any], *, bytes: float | None = None, flops: float | None = None,
             **info: Any) -> float:
        """do_bench median of one call of fn, L2 flushed before each (CPU smoke: one call on the host
        clock), in ms; the row has GB/s and % of copy when bytes (moved per call) is given, TFLOP/s
        when flops is. info may hold steps=k (the call runs k steps: ms_per_step) and rep_ms."""
        if self._out_of_time(name):
            return math.nan
        steps, rep_ms = info.pop("steps", 1), info.pop("rep_ms", 200.0)
        ms = float(self._bench(fn, self.device, rep_ms=rep_ms))
        timer = ("do_bench median, L2 flushed (calls over 100 ms: median of 3)" if self.device.type == "cuda"
                 else "one call, host clock (CPU)")
        return self._timed(name, "time", "cold", timer, ms, steps, bytes, flops, info)

    def steady(self, name: str, step: Callable[[], Any], *, n: int = 100, bytes: float | None = None,
               **info: Any) -> float:
        """n back-to-back calls of step, one synchronize at the end, no flush: ms per call (the median
        of `rounds` such loops, 3 by default; each loop is timed on the host clock, synchronised
        before and after). A warm-up call and a synchronize come first. On the CPU smoke run the
        loop has at most SMOKE_STEADY_N calls, one round and no warm-up call. info may hold steps=k (a call runs k
        steps: ms_per_step), rounds and warmup."""
        if self._out_of_time(name):
            return math.nan
        steps, rounds = info.pop("steps", 1), info.pop("rounds", 1 if self.smoke else 3)
        warmup = info.pop("warmup", 0 if self.smoke else 1)
        n_run = min(n, SMOKE_STEADY_N) if self.smoke else n
        for _ in range(warmup):
            step()
        self._sync()
        per_call = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n_run):
                step()
            self._sync()
            per_call.append((time.perf_counter() - t0) * 1e3 / n_run)
        info.update(n=n_run, rounds=rounds, ms_rounds=[round(v, 6) for v in per_call])
        return self._timed(name, "steady", "steady", f"{n_run} back-to-back calls, one sync (median of {rounds})",
                           statistics.median(per_call), steps, bytes, None, info)

    def _timed(self, name: str, measure: str, view: str, timer: str, ms: float, steps: int, n_bytes: float | None,
               flops: float | None, info: dict[str, Any]) -> float:
        fields: dict[str, Any] = {**info, "view": view, "timer": timer, "ms": ms, "steps": steps, "ms_per_step": ms / steps}
        line = f"  {name}: {ms / steps * 1e3:,.2f} us/step ({view})"
        if n_bytes:
            gbps = n_bytes / (ms * 1e-3) / 1e9
            fields.update(bytes=n_bytes, gbps=gbps, copy_gbps=self.copy_gbps,
                          frac_copy=gbps / self.copy_gbps if self.copy_gbps else None)
            line += f" {gbps:,.1f} GB/s" + (f" {100 * gbps / self.copy_gbps:.1f}% of copy" if self.copy_gbps else "")
        if flops:
            fields.update(flops=flops, tflops=flops / (ms * 1e-3) / 1e12)
        if not math.isfinite(ms):
            self.recorder.add(self._row(name, "fail", measure, {**fields, "error": "no finite time"}), line)
            return ms
        self.recorder.add(self._row(name, "ok", measure, fields), line)
        return ms


def _one_call_ms(fn: Callable[[], Any], device: torch.device, rep_ms: float = 0.0) -> float:
    """The CPU smoke run's timer: one call on the host clock (the interpreter is slow; no claims)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:60]


def run_checks(ctx: Ctx, checks: list, before: Callable[[], None] | None = None) -> None:
    """Run parity.Check items (fn() -> {"errors": {quantity: (error, tol)}, ...}) as rows: pass iff
    every error <= its tolerance and fn did not set "fail". A check starts only with its need_s
    left; one that raises is an error row and the next one runs."""
    for check in checks:
        if ctx.left_s() < check.need_s:
            ctx.skip(check.name, f"time budget ({ctx.left_s():.0f} s left, this needs ~{check.need_s:.0f} s)")
            continue
        t0 = time.monotonic()
        with ctx.guard(check.name):
            if before is not None:
                before()
            out = check.fn()
            errors = out.pop("errors", {})
            bad = sorted(k for k, (e, tol) in errors.items() if not e <= tol)
            status = "fail" if bad or out.pop("fail", False) else "pass"
            detail = ", ".join(f"{k} {e:.2e}/{tol:.0e}" for k, (e, tol) in errors.items())
            row = {"section": ctx.section, "name": check.name, "status": status, "measure": "check",
                   "seconds": round(time.monotonic() - t0, 3),
                   "errors": {k: {"error": e, "tol": tol} for k, (e, tol) in errors.items()}, "failed": bad, **out}
            if "ms" in out and not ctx.alone:
                row["timed_alone"] = False  # its "ms" were taken beside other processes: not performance figures
            ctx.recorder.add(row, f"  {status.upper():5s} {check.name}: {detail}"
                             + (f"  {out['note']}" if out.get("note") else ""))
