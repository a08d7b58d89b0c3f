"""Block-size sweep of the two hot kernels on a GPU: the data that chooses kernels/config.py.

For the full-batch regimes of bench/regimes.py (tall, wide, deep; inference also
manyout) and each input dtype and precision, every candidate configuration of

  - the single-pass gradient kernel (linear_mse_partials): BLOCK_N, warps,
    pipeline stages, BLOCK_D (one block or chunks), programs per SM, and for
    "ieee" the FMA-broadcast form beside the FMA dot;
  - the inference kernel (linear_forward): BLOCK_N, BLOCK_O, warps, BLOCK_D;

is compiled (in worker processes, in parallel, on a small problem of the same
specialization), then checked once against float64 (relative error of dW, or
of Y) and timed with do_bench on the full-size data (median; L2 flushed). The
heuristic's own choice (config=None) is timed beside them.

    python3 bench/sweep.py OUTDIR [--budget-s 150]

writes OUTDIR/sweep.json and prints, per (kernel, shape, dtype, precision), the
heuristic's time, the best candidate and its error. Candidates that do not fit
(shared memory, registers) are recorded with their error message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity import rel_err  # noqa: E402
from regimes import REGIMES  # noqa: E402
from timing import bench_ms  # noqa: E402

try:
    from linreg_fused.kernels.config import TileConfig, device_profile
    from linreg_fused.kernels.linear_forward import plan_linear_forward
    from linreg_fused.kernels.linear_mse_grad import plan_linear_mse_partials
except ImportError:  # the source tree, not installed: kernels/ is linreg_fused.kernels once installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kernels as _kernels

    sys.modules["linreg_fused.kernels"] = _kernels
    from kernels.config import TileConfig, device_profile
    from kernels.linear_forward import plan_linear_forward
    from kernels.linear_mse_grad import plan_linear_mse_partials

SHAPES = {r.name: (r.n_rows, r.in_features, r.out_features) for r in REGIMES
          if r.gpu and r.batch_size is None and r.name in ("tall", "wide", "deep", "inference-manyout")}
GRAD_SHAPES = ("tall", "wide", "deep")
FORWARD_SHAPES = ("tall", "wide", "deep", "inference-manyout")
GRAD_VARIANTS = ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float32, "tf32x3"),
                 (torch.bfloat16, "ieee"), (torch.bfloat16, "tf32x3"))
FORWARD_VARIANTS = ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float32, "tf32x3"))
PROGRAMS_PER_SM = (1, 2, 4)  # the gradient kernel's grid cap: a runtime choice, no compile
COMPILE_ROWS = 4096  # the workers' problem: same specialization (rows divisible by 16) as the full one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to smoke-test this script (interpreter)


def p2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def grad_candidates(d: int, o: int, dtype: torch.dtype, precision: str) -> list[TileConfig]:
    """Configurations of the gradient kernel around the heuristic (max_programs set at timing)."""
    bo = p2(o)
    rows = {64: (64, 128, 256), 256: (16, 32, 64), 1024: (16, 32)}[d]
    block_ds = (p2(d),) if d <= 256 else (p2(d), 256)
    out = [TileConfig(bn, bd, bo, True, 0, w, s) for bn in rows for bd in block_ds for w in (4, 8) for s in (2, 3)]
    if d == 64:
        out += [TileConfig(bn, bd, bo, True, 0, w, 4) for bn in rows[:2] for bd in block_ds for w in (4, 8)]
    if precision == "ieee" and dtype == torch.float32 and d == 64:  # the FMA-broadcast form
        out += [TileConfig(bn, p2(d), bo, False, 0, 4, s) for bn in (8, 16, 32) for s in (2, 3)]
    return out


def forward_candidates(d: int, o: int, precision: str) -> list[TileConfig]:
    block_os = sorted({min(p2(o), 16), min(p2(o), 64)})
    block_ds = (p2(d),) if d <= 256 else (p2(d), 256)
    out = []
    for bn in (32, 64, 128):
        for bo in block_os:
            for bd in block_ds:
                for w in (4, 8):
                    out.append(TileConfig(bn, bd, bo, True, 0, w, 1 if bd >= d else 3))
    if precision == "ieee" and d == 64:
        out += [TileConfig(bn, 64, min(p2(o), 16), False, 0, 4, 1) for bn in (8, 16, 32)]
    return out


def jobs() -> list[dict]:
    """Every (kernel, shape, dtype, precision, config) of the sweep, in a fixed order."""
    out = []
    for name in GRAD_SHAPES:
        n, d, o = SHAPES[name]
        for dtype, prec in GRAD_VARIANTS:
            for cfg in [None, *grad_candidates(d, o, dtype, prec)]:
                out.append(dict(kernel="grad", shape=name, dtype=dtype, precision=prec, config=cfg))
    for name in FORWARD_SHAPES:
        n, d, o = SHAPES[name]
        for dtype, prec in FORWARD_VARIANTS:
            for cfg in [None, *forward_candidates(d, o, prec)]:
                out.append(dict(kernel="forward", shape=name, dtype=dtype, precision=prec, config=cfg))
    return out


def problem(name: str, dtype: torch.dtype, rows: int | None = None, seed: int = 0):
    n, d, o = SHAPES[name]
    n = rows or n
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, d, device=DEVICE, generator=g).to(dtype)
    t = torch.randn(n, o, device=DEVICE, generator=g).to(dtype)
    w = torch.randn(o, d, device=DEVICE, generator=g) * d ** -0.5
    b = torch.randn(o, device=DEVICE, generator=g)
    return x, w, b, t


def plan(job: dict, x, w, b, t, programs_per_sm: int = 2):
    cfg = job["config"]
    if job["kernel"] == "grad":
        if cfg is not None:
            sms = device_profile(x.device).multiprocessors
            cfg = TileConfig(cfg.block_n, cfg.block_d, cfg.block_o, cfg.use_dot, programs_per_sm * sms,
                             cfg.num_warps, cfg.num_stages)
        launch, partials = plan_linear_mse_partials(x, w, b, t, input_precision=job["precision"], config=cfg)
        return launch, partials
    launch, y = plan_linear_forward(x, w, b, out_dtype=torch.float32, input_precision=job["precision"], config=cfg)
    return launch, y


def worker(index: int, count: int) -> None:
    """Compile this worker's share of the jobs (launch once on a small problem)."""
    data = {}
    for k, job in enumerate(jobs()):
        if k % count != index:
            continue
        key = (job["shape"], job["dtype"])
        if key not in data:
            data[key] = problem(job["shape"], job["dtype"], rows=COMPILE_ROWS)
        try:
            launch, _ = plan(job, *data[key])
            launch.launch()
        except Exception as e:  # recorded by the main process when it tries the same launch
            print(f"worker {index}: job {k}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reference(x, w, b, t) -> dict:
    x64 = x.double()
    y = x64 @ w.double().T + b.double()  # one float64 product serves the forward and the residual
    r = y - t.double()
    return dict(dw=r.T @ x64, db=r.sum(0), loss=(r * r).sum(), y=y)


def error_of(job: dict, out, ref: dict) -> float:
    if job["kernel"] == "grad":
        sums = out.buffer.double().sum(0)
        o, d = ref["dw"].shape
        return max(rel_err(sums[:o * d].view(o, d), ref["dw"]), rel_err(sums[o * d:o * d + o], ref["db"]),
                   rel_err(sums[-1], ref["loss"]))
    return rel_err(out, ref["y"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        i, k = map(int, args.worker.split("/"))
        worker(i, k)
        return 0
    start = time.time()
    args.outdir.mkdir(parents=True, exist_ok=True)
    all_jobs = jobs()
    print(f"sweep: {len(all_jobs)} launches; compiling in {args.workers} workers", flush=True)
    procs = [subprocess.Popen([sys.executable, __file__, str(args.outdir), "--worker", f"{i}/{args.workers}"])
             for i in range(args.workers)]
    compile_deadline = start + 0.45 * args.budget_s
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, compile_deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"sweep: compiled in {time.time() - start:.0f} s", flush=True)

    rows, data, ref = [], None, None
    current = None
    for job in all_jobs:
        if time.time() - start > args.budget_s:
            rows.append(dict(_describe(job), status="skip", reason="time budget"))
            continue
        key = (job["shape"], job["dtype"])
        if key != current:
            data = ref = None
            torch.cuda.empty_cache()
            data = problem(job["shape"], job["dtype"])
            ref = reference(*data)
            current = key
        per_sm = PROGRAMS_PER_SM if job["kernel"] == "grad" and job["config"] is not None else (None,)
        for k in per_sm:
            row = dict(_describe(job), programs_per_sm=k)
            try:
                launch, out = plan(job, *data, programs_per_sm=k or 2)
                launch.launch()
                torch.cuda.synchronize()
                row["error"] = error_of(job, out, ref)
                row["ms"] = bench_ms(launch.launch, data[0].device, rep_ms=40, warmup_ms=5)
                row["config_used"] = dict(grid=list(launch.grid), num_warps=launch.num_warps,
                                          num_stages=launch.num_stages,
                                          **{c: launch.constexprs[c] for c in ("BLOCK_N", "BLOCK_D", "BLOCK_O",
                                                                                  "USE_DOT")})
                row["status"] = "ok"
            except Exception as e:
                row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:200]}")
                if "OutOfResources" not in type(e).__name__:
                    traceback.print_exc()
            rows.append(row)
    meta = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), seconds=time.time() - start)
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        pass
    (args.outdir / "sweep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    _summary(rows)
    print(f"sweep: {time.time() - start:.0f} s; {sum(r['status'] == 'ok' for r in rows)} timed", flush=True)
    return 0


def _describe(job: dict) -> dict:
    cfg = job["config"]
    return dict(kernel=job["kernel"], shape=job["shape"], dtype=str(job["dtype"]).replace("torch.", ""),
                precision=job["precision"], config=asdict(cfg) if cfg is not None else "heuristic")


def _summary(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["shape"], r["dtype"], r["precision"]), []).append(r)
    print(f"{'kernel':8} {'shape':18} {'dtype':9} {'prec':7} {'heur ms':>8} {'best ms':>8} {'best err':>9}  best")
    for key, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        heur = next((r["ms"] for r in ok if r["config"] == "heuristic"), float("nan"))
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        if best is None:
            print(*key, "no result")
            continue
        c = best["config"]
        what = "heuristic" if c == "heuristic" else (
            f"n{c['block_n']} d{c['block_d']} o{c['block_o']} w{c['num_warps']} s{c['num_stages']}"
            f"{'' if c['use_dot'] else ' fma'} p{best.get('programs_per_sm')}")
        print(f"{key[0]:8} {key[1]:18} {key[2]:9} {key[3]:7} {heur:8.3f} {best['ms']:8.3f} {best['error']:9.2e}  {what}")


if __name__ == "__main__":
    sys.exit(main())
