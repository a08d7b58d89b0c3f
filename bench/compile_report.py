"""Compile report: every kernel launch of the benchmark regimes, compiled for a
GPU target on a machine without one.

    python bench/compile_report.py [--arch 90 80] [--json PATH] [--jobs N] [--only REGEX]

For each regime of bench/regimes.py (the GPU ones) × dtype (the regime's, and
fp64 once per shape) × input precision (ieee, tf32, tf32x3; fp64: ieee), the
launch helpers' own plan_* functions decide the launch (kernel, grid,
arguments, constants, warps, stages) exactly as they would on a GPU with that
architecture's SM count, with tensors on the meta device; Triton then
compiles that plan with the same specialisation its launcher would make
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``), and
the cubin is read with the cuobjdump bundled with Triton:

    shared      bytes of shared memory per program, against the per-block limit
    regs        registers per thread; spill = local + stack bytes per thread
    mma / fma   static PTX instruction counts: mma.sync/wgmma (tensor cores; tf32
                ones in brackets), fma.rn.f32/f64; cp.async (pipelined loads)
    fit/SM      programs per SM that fit (registers, shared memory, threads)
    warps/SM    resident_warps_per_sm: resident programs (fit, and what the grid
                gives each SM) × warps per program
    inflight    estimated bytes of loads in flight per SM: resident programs ×
                tiles loading per program (num_stages − 1 when pipelined) × tile bytes
    loop        main_loop: SASS counts of the main loop, found by its back edge
                (bench/sass.py): total, ffma, mma, lds, shfl, bar (and fmul, fadd, ...)
    pred ms     predicted_ms on an H200, for gradient and inference launches, from
                the loop counts, the bytes and the resident warps (bench/sass.py's
                model; the JSON has its memory, issue and bound terms)

Rows carry ``formulation`` (default, rows, chunks: kernels/formulations.py);
the rows and chunks formulations are compiled on the full-batch regimes they
serve (bench/compile_cases.py).

Checks (the "ok" column; tests/test_compile.py asserts them): every launch
fits shared memory; hot launches (fp32/bf16) do not spill; an "ieee" launch
has no tf32 MMA; a tf32/tf32x3 tensor-core launch has some; the memory-bound
full-batch launches keep >= 25 KB in flight per SM. The "targets" column
(roofline_targets; tests/test_compile_formulations.py asserts it on the rows
and chunks formulations): >= 16 resident warps per SM for memory-bound
launches, FFMA >= 75 % of the main loop for FMA-bound IEEE launches, no spills,
no tf32 MMA in IEEE; the default kernels are reported against them too.
Needs Triton with its NVIDIA backend (ptxas, cuobjdump); TRITON_INTERPRET must
be unset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/regimes.py

import torch  # noqa: E402

import sass  # noqa: E402
from compile_cases import ARCHS, IN_FLIGHT_TARGET, Arch, Case, all_cases, shape_cases  # noqa: E402


# ------------------------------------------------------------------ compiling
def compile_spec(plan, capability: int) -> tuple[dict, tuple]:
    """What Triton's launcher would compile for ``plan`` on sm_<capability>:
    (a picklable spec, its key). Uses the launcher's own binder, so integer
    specialisation (== 1, divisibility by 16) and fp64 annotations are the real ones."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = plan.kernel
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)
    bound, specialization, options = binder(**plan.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    spec = dict(module=kernel.fn.__module__, name=kernel.fn.__name__, signature=signature, constexprs=constexprs,
                attrs=attrs, options={"num_warps": plan.num_warps, "num_stages": plan.num_stages},
                capability=capability)
    key = (spec["module"], spec["name"], repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), plan.num_warps, plan.num_stages, capability)
    return spec, key


def _nvidia_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} (Triton's bundled NVIDIA tools)")
    return str(path)


def tools_available() -> str | None:
    """None if this machine can compile for NVIDIA targets, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401

        for tool in ("ptxas", "cuobjdump"):
            _nvidia_tool(tool)
    except Exception as e:  # ImportError, FileNotFoundError
        return f"Triton's NVIDIA compiler tools are not available: {e}"
    return None


_PTX_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)", re.MULTILINE)


def ptx_counts(ptx: str) -> dict[str, int]:
    """Static instruction counts from the PTX (each maps to one SASS instruction here):
    tensor-core MMAs (mma.sync / wgmma; tf32 ones separately), fp32/fp64 FMAs, cp.async copies."""
    counts = dict(mma=0, mma_tf32=0, fma=0, cp_async=0)
    for op in _PTX_OP.findall(ptx):
        if op.startswith(("mma.sync", "wgmma.mma_async")):
            counts["mma"] += 1
            counts["mma_tf32"] += ".tf32" in op
        elif op.startswith(("fma.rn.f32", "fma.rn.f64", "fma.rn.ftz.f32")):
            counts["fma"] += 1
        elif op.startswith(("cp.async.ca.", "cp.async.cg.")):
            counts["cp_async"] += 1
    return counts


def compile_one(spec: dict) -> dict:
    """Compile one spec; read the PTX and the cubin's resource usage. Runs in a worker process."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    src = ASTSource(kernel, spec["signature"], spec["constexprs"], spec["attrs"])
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", spec["capability"], 32), options=spec["options"])
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    main_loop = sass.main_loop_counts(compiled.asm["cubin"], _nvidia_tool("cuobjdump"))
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", ptx)
    ptx_params = [" ".join(p.split()[1:-1]) for p in entry.group(1).split(",")] if entry else []
    return dict(compile_s=seconds, shared=compiled.metadata.shared, regs=int(res.get("REG", 0)),
                stack=int(res.get("STACK", 0)), local=int(res.get("LOCAL", 0)), ptx_params=ptx_params,
                main_loop=main_loop, **ptx_counts(ptx))


# ------------------------------------------------------------------ analysis
def programs_that_fit(arch: Arch, regs: int, shared: int, num_warps: int) -> int:
    """Resident programs per SM: registers (allocated per warp in 256s), shared memory, threads, blocks."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = arch.registers_per_sm // (regs_per_warp * num_warps)
    by_shared = arch.shared_per_sm // (shared + arch.reserved_shared_per_block) if shared else arch.blocks_per_sm
    by_threads = arch.threads_per_sm // (32 * num_warps)
    return max(0, min(by_regs, by_shared, by_threads, arch.blocks_per_sm))


@dataclass
class Row:
    arch: int
    regime: str
    kernel: str
    dtype: str
    precision: str
    hot: bool
    memory_bound: bool
    tensor_core: bool
    blocks: str
    grid: int
    num_warps: int
    num_stages: int
    shared: int
    shared_limit: int
    regs: int
    spill: int
    mma: int
    mma_tf32: int
    fma: int
    cp_async: int
    programs_per_sm: int  # that the grid gives each SM
    fit_per_sm: int  # that fit on one SM
    inflight_per_sm: int
    compile_s: float
    fp64_params: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    formulation: str = "default"
    resident_warps_per_sm: int = 0  # resident programs (what fits and what the grid gives) × warps
    main_loop: dict[str, int] = field(default_factory=dict)  # SASS counts of the main loop (bench/sass.py)
    fma_bound: bool = False  # its FMAs at the IEEE rate take longer than its bytes at the copy rate
    predicted: dict[str, float] = field(default_factory=dict)  # H200 model (bench/sass.py), ms
    predicted_ms: float | None = None  # predicted["predicted_ms"], for gradient and inference launches
    targets: list[str] = field(default_factory=list)  # roofline targets missed (see roofline_targets)


RESIDENT_WARPS_TARGET = 16  # per SM, for memory-bound launches (latency hiding)
FFMA_TARGET = 0.75  # of the main loop, for FMA-bound IEEE launches


def _blocks(case: Case) -> str:
    c = case.plan.constexprs
    if case.formulation == "rows":  # rows per tile, lanes per row × columns per lane, outputs
        return f"{c['ROWS']}r {c['LANES']}×{c['J'] * c['V']}c ×{c['BLOCK_O']} rows"
    if case.formulation in ("chunks", "mma"):
        return f"{c['BLOCK_N']}×{c['NC']}·{c['K_CHUNK']}×{c['BLOCK_O']} {case.formulation}"
    blocks = "×".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_D", "BLOCK_O", "BLOCK_P", "BLOCK_COLS") if k in c)
    if "USE_DOT" in c:
        blocks += " dot" if c["USE_DOT"] else " fma"
    return blocks


def roofline_targets(row: Row, case: Case) -> list[str]:
    """The targets of a full-batch gradient or inference launch that it misses (reported for every
    launch; tests/test_compile_formulations.py asserts them on the rows and chunks formulations)."""
    missed = []
    loop = row.main_loop
    if case.hot and case.memory_bound and case.bytes_moved:
        if not row.fma_bound and row.resident_warps_per_sm < RESIDENT_WARPS_TARGET:
            missed.append(f"{row.resident_warps_per_sm} resident warps/SM < {RESIDENT_WARPS_TARGET} (memory-bound)")
        share = loop.get("ffma", 0) / loop["total"] if loop.get("total") else 0.0
        if row.fma_bound and case.precision == "ieee" and share < FFMA_TARGET:
            missed.append(f"FFMA {share:.0%} of the loop < {FFMA_TARGET:.0%} (FMA-bound)")
    if case.hot and row.spill:
        missed.append(f"spills {row.spill} B/thread")
    if case.precision == "ieee" and (row.mma_tf32 or loop.get("mma_tf32")):
        missed.append("tf32 MMA in ieee")
    return missed


def analyse(arch: Arch, case: Case, signature: dict, result: dict) -> Row:
    plan = case.plan
    blocks = _blocks(case)
    grid = math.prod(plan.grid)
    fit = programs_that_fit(arch, result["regs"], result["shared"], plan.num_warps)
    per_sm = math.ceil(grid / arch.multiprocessors)
    pipelined = result["cp_async"] > 0 and plan.num_stages > 1
    tiles = plan.num_stages - 1 if pipelined else 1
    inflight = min(fit, per_sm) * tiles * case.tile_bytes
    spill = result["stack"] + result["local"]
    # Which PTX parameter each float argument became (the PTX lists the runtime arguments in order).
    runtime = [name for name, ty in signature.items() if ty != "constexpr"]
    fp64_params = {name: result["ptx_params"][runtime.index(name)] for name in case.fp64_args if name in runtime}
    problems = []
    if result["shared"] > arch.shared_per_block:
        problems.append(f"shared {result['shared']} B > {arch.shared_per_block} B")
    if fit < 1:
        problems.append("no program fits an SM")
    if case.hot and spill:
        problems.append(f"spills {spill} B/thread")
    if case.precision == "ieee" and result["mma_tf32"]:
        problems.append("tf32 MMA in an ieee launch")
    if case.tensor_core and not (result["mma"] if case.formulation == "mma" else result["mma_tf32"]):
        problems.append(f"no {'bf16' if case.formulation == 'mma' else 'tf32'} MMA in a {case.precision} launch")
    if case.hot and case.memory_bound and inflight < IN_FLIGHT_TARGET:
        problems.append(f"{inflight} B in flight per SM < {IN_FLIGHT_TARGET}")
    for name, ptx_type in fp64_params.items():
        if ".f64" not in ptx_type:
            problems.append(f"{name} is passed as {ptx_type}, not f64")
    row = Row(arch.capability, case.regime, case.kernel, case.dtype, case.precision, case.hot, case.memory_bound,
              case.tensor_core, blocks, grid, plan.num_warps, plan.num_stages, result["shared"],
              arch.shared_per_block, result["regs"], spill, result["mma"], result["mma_tf32"], result["fma"],
              result["cp_async"], per_sm, fit, inflight, result["compile_s"],
              fp64_params, problems, formulation=case.formulation)
    row.resident_warps_per_sm = min(fit, per_sm) * plan.num_warps
    row.main_loop = {k: v for k, v in result["main_loop"].items() if k != "kernel"}
    if case.bytes_moved:
        row.fma_bound = sass.fma_bound(case.fmas, case.bytes_moved)
        if arch.capability == 90:  # the model's constants are the H200's
            loop_total = row.main_loop["total"] or result["main_loop"]["kernel"]  # no loop: the whole program
            row.predicted = sass.predict(loop_total=loop_total, loop_trips=case.loop_trips,
                                         num_warps=plan.num_warps, resident_warps=row.resident_warps_per_sm,
                                         bytes_moved=case.bytes_moved, inflight_per_sm=inflight)
            row.predicted_ms = row.predicted["predicted_ms"]
    row.targets = roofline_targets(row, case)
    return row


def report(capabilities: list[int], jobs: int = 1, only: str | None = None, hot_only: bool = False,
           progress=None, cases_of=None, default_only: bool = False) -> tuple[list[Row], dict]:
    """Compile every case for every architecture: (rows, summary)."""
    reason = tools_available()
    if reason:
        raise RuntimeError(reason)
    specs: dict[tuple, dict] = {}
    planned: list[tuple[Arch, Case, tuple, dict]] = []
    for capability in capabilities:
        arch = ARCHS[capability]
        for case in (cases_of or all_cases)(arch):
            if only and not re.search(only, f"{case.regime} {case.kernel} {case.dtype} {case.precision}"):
                continue
            if default_only and case.formulation != "default":
                continue
            if hot_only and not (case.hot or case.regime.startswith("probe")):
                continue
            spec, key = compile_spec(case.plan, capability)
            specs.setdefault(key, spec)
            planned.append((arch, case, key, spec["signature"]))
    results: dict[tuple, dict] = {}
    start = time.perf_counter()
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(compile_one, spec): key for key, spec in specs.items()}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                if progress:
                    progress(len(results), len(specs))
    else:
        for key, spec in specs.items():
            results[key] = compile_one(spec)
            if progress:
                progress(len(results), len(specs))
    wall = time.perf_counter() - start
    rows = [analyse(arch, case, signature, results[key]) for arch, case, key, signature in planned]
    times = [r["compile_s"] for r in results.values()]
    import triton

    summary = dict(
        specializations=len(specs), launches=len(rows), wall_s=wall, jobs=jobs,
        compile_s_mean=sum(times) / len(times) if times else 0.0, compile_s_max=max(times, default=0.0),
        compile_s_min=min(times, default=0.0), triton=triton.__version__, torch=torch.__version__,
        problems=sum(bool(r.problems) for r in rows),
    )
    return rows, summary


def format_table(rows: list[Row]) -> str:
    head = ("arch", "regime", "kernel", "dtype", "prec", "blocks", "warps", "stages", "shared", "regs", "spill",
            "mma(tf32)", "fma", "cp.async", "grid/SM", "fit/SM", "warps/SM", "inflight/SM", "loop", "ffma%",
            "lds/shfl/bar", "pred ms", "ok", "targets")
    lines = [head]
    for r in rows:
        loop = r.main_loop
        lines.append((f"sm_{r.arch}", r.regime, r.kernel, r.dtype, r.precision, r.blocks, str(r.num_warps),
                      str(r.num_stages), f"{r.shared / 1024:.1f}K", str(r.regs), str(r.spill),
                      f"{r.mma}({r.mma_tf32})", str(r.fma), str(r.cp_async), str(r.programs_per_sm), str(r.fit_per_sm),
                      str(r.resident_warps_per_sm), f"{r.inflight_per_sm / 1024:.1f}K" if r.memory_bound else "-",
                      str(loop.get("total", 0)),
                      f"{100 * loop['ffma'] / loop['total']:.0f}" if loop.get("total") else "-",
                      f"{loop.get('lds', 0)}/{loop.get('shfl', 0)}/{loop.get('bar', 0)}",
                      f"{r.predicted_ms:.3f}" if r.predicted_ms is not None else "-",
                      "ok" if not r.problems else "; ".join(r.problems),
                      "met" if not r.targets else "; ".join(r.targets)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    parser.add_argument("--json", type=Path, help="write rows and summary here")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--only", help="regex over 'regime kernel dtype precision'")
    parser.add_argument("--hot", action="store_true", help="only the fp32/bf16 launches (and the probes)")
    parser.add_argument("--shapes", action="store_true", help="the awkward SHAPES instead of the regimes")
    parser.add_argument("--default-only", action="store_true", help="leave out the rows and chunks formulations")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Triton's cache directory (default: a fresh one, so compile times are cold)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the report compiles for a GPU target")
    with tempfile.TemporaryDirectory() as cache:
        if not args.warm_cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # read by Triton at compile time, also in the workers
        rows, summary = report(args.arch, args.jobs, args.only, args.hot, cases_of=shape_cases if args.shapes else None,
                               default_only=args.default_only,
                               progress=lambda i, n: print(f"\rcompiled {i}/{n}", end="", file=sys.stderr))
    print(file=sys.stderr)
    print(format_table(rows))
    print(f"\n{summary['specializations']} specializations for {summary['launches']} launches in "
          f"{summary['wall_s']:.1f} s with {summary['jobs']} process(es); per specialization "
          f"{summary['compile_s_min']:.2f}-{summary['compile_s_max']:.2f} s (mean {summary['compile_s_mean']:.2f} s, "
          f"{'cold' if not args.warm_cache else 'possibly cached'}); "
          f"Triton {summary['triton']}, torch {summary['torch']}; "
          f"{summary['problems']} launch(es) with problems")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": [asdict(r) for r in rows]}, indent=1))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
