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
    inflight    estimated bytes of loads in flight per SM: resident programs ×
                tiles loading per program (num_stages − 1 when pipelined) × tile bytes

Checks (the "ok" column; tests/test_compile.py asserts them): every launch
fits shared memory; hot launches (fp32/bf16) do not spill; an "ieee" launch
has no tf32 MMA; a tf32/tf32x3 tensor-core launch has some; the memory-bound
full-batch launches keep >= 25 KB in flight per SM. Needs Triton with its
NVIDIA backend (ptxas, cuobjdump); TRITON_INTERPRET must be unset.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/regimes.py

import torch  # noqa: E402

from regimes import REGIMES, Regime  # noqa: E402


@dataclass(frozen=True)
class Arch:
    """Limits of one GPU architecture (CUDA programming guide, compute capability tables)."""

    capability: int
    card: str
    multiprocessors: int
    shared_per_block: int  # opt-in maximum per block
    shared_per_sm: int
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024


ARCHS = {
    90: Arch(90, "H100/H200 SXM", 132, 232448, 233472),
    80: Arch(80, "A100", 108, 166912, 167936),
}
IN_FLIGHT_TARGET = 25 * 1024
PRECISIONS = ("ieee", "tf32", "tf32x3")


# ------------------------------------------------------------------ the launches
@dataclass
class Case:
    regime: str
    kernel: str
    dtype: str
    precision: str
    plan: Any  # kernels.plan.LaunchPlan
    hot: bool  # a launch of a benchmark regime in fp32/bf16 (must not spill)
    memory_bound: bool  # must keep IN_FLIGHT_TARGET bytes in flight per SM
    tile_bytes: int  # bytes one program loads per tile (per pipeline stage)
    tensor_core: bool  # a tl.dot with a tensor-core precision
    fp64_args: tuple[str, ...] = ()  # float arguments that must reach the GPU as fp64


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def regime_cases(regime: Regime, dtype_name: str, precision: str, profile) -> list[Case]:
    """The launches one step (or forward, or fit) of ``regime`` makes."""
    from linreg_fused.kernels import fused_fit, linear_forward, linear_mse_grad, reduce_update
    from linreg_fused.kernels.specs import ColumnTarget, SGDHyper

    dt = _DTYPES[dtype_name]
    pdt = torch.float64 if dt == torch.float64 else torch.float32  # fp32 master weights for bf16 inputs
    n, d, o = regime.n_rows, regime.in_features, regime.out_features
    elem = torch.finfo(dt).bits // 8
    hot = dtype_name != "fp64"
    common = dict(regime=regime.name, dtype=dtype_name, precision=precision, hot=hot)
    x, t = _meta(n, d, dtype=dt), _meta(n, o, dtype=dt)
    w, b = _meta(o, d, dtype=pdt), _meta(o, dtype=pdt)
    if regime.kind == "statistics":
        return []  # the statistics pass and epochs kernels: bench/compile_stats.py
    if regime.kind == "fit" and fused_fit.fit_small_supported(regime.batch_size, d, o):
        steps = regime.epochs
        plan = fused_fit.plan_fit_small(
            x, t, w, b, None, None, _meta(steps, n, dtype=torch.int64), _meta(steps, 2, dtype=pdt),
            batch_size=regime.batch_size, mean=True, weight_hyper=SGDHyper(regime.lr), bias_hyper=SGDHyper(regime.lr),
            init_weight_buffer=False, init_bias_buffer=False, profile=profile)
        fp64 = ("w_lr", "w_momentum", "w_dampening", "w_weight_decay", "b_lr")
        return [Case(kernel="fit", plan=plan, memory_bound=False, tile_bytes=0, tensor_core=False,
                     fp64_args=fp64, **common)]
    if regime.kind == "inference":
        plan, _ = linear_forward.plan_linear_forward(x, w, b, out_dtype=pdt, input_precision=precision,
                                                     profile=profile)
        c = plan.constexprs
        tile = c["BLOCK_N"] * min(c["BLOCK_D"], d) * elem
        return [Case(kernel="forward", plan=plan, memory_bound=True, tile_bytes=tile,
                     tensor_core=c["USE_DOT"] and c["INPUT_PRECISION"] != "ieee", **common)]
    rows = _meta(regime.batch_size, dtype=torch.int64) if regime.batch_size else None
    grad, partials = linear_mse_grad.plan_linear_mse_partials(x, w, b, t, row_index=rows, input_precision=precision,
                                                              profile=profile)
    c = grad.constexprs
    tile = c["BLOCK_N"] * ((min(c["BLOCK_D"], d) + o) if c["ONE_D_BLOCK"] else c["BLOCK_D"]) * elem
    cases = [Case(kernel="grad", plan=grad, memory_bound=regime.batch_size is None, tile_bytes=tile,
                  tensor_core=c["USE_DOT"] and c["INPUT_PRECISION"] != "ieee", **common)]
    buffer = partials.buffer
    rows_per_step = regime.rows_per_step
    scale = 1.0 / (rows_per_step * o)
    hyper = SGDHyper(lr=regime.lr)
    update = reduce_update.plan_reduce_update(
        buffer, [ColumnTarget(0, w, hyper), ColumnTarget(o * d, b, hyper)], scale=2 * scale,
        loss_out=_meta(dtype=pdt), loss_column=partials.loss_column, loss_scale=scale, profile=profile)
    reduce_tile = update.constexprs["BLOCK_P"] * update.constexprs["BLOCK_COLS"] * buffer.element_size()
    fp64 = ("scale", "a_lr", "a_momentum", "a_weight_decay", "loss_scale")
    cases.append(Case(kernel="update", plan=update, memory_bound=False, tile_bytes=reduce_tile, tensor_core=False,
                      fp64_args=fp64, **common))
    if regime.name == "wide" and precision == "ieee":  # every branch of the update, once per accumulator dtype
        full = SGDHyper(lr=regime.lr, momentum=0.9, dampening=0.1, weight_decay=1e-4, nesterov=False, maximize=True)
        targets = [ColumnTarget(0, w, full, _meta(o, d, dtype=pdt)), ColumnTarget(o * d, b, full, _meta(o, dtype=pdt))]
        update_all = reduce_update.plan_reduce_update(
            buffer, targets,
            scale=2 * scale, grad_output=_meta(dtype=pdt), loss_out=_meta(dtype=pdt),
            loss_column=partials.loss_column, loss_scale=scale, profile=profile)
        cases.append(Case(kernel="update+momentum", plan=update_all, memory_bound=False, tile_bytes=reduce_tile,
                          tensor_core=False, fp64_args=fp64, **common))
        grads = reduce_update.plan_reduce_update(
            buffer, [ColumnTarget(0, _meta(o, d, dtype=pdt)), ColumnTarget(o * d, _meta(o, dtype=pdt))],
            scale=2 * scale, grad_output=_meta(dtype=pdt), profile=profile)
        cases.append(Case(kernel="backward", plan=grads, memory_bound=False, tile_bytes=reduce_tile,
                          tensor_core=False, fp64_args=("scale",), **common))
        loss = reduce_update.plan_sum_column(buffer, partials.loss_column, scale, _meta(dtype=pdt), profile=profile)
        cases.append(Case(kernel="loss", plan=loss, memory_bound=False, tile_bytes=0, tensor_core=False,
                          fp64_args=("scale",), **common))
    return cases


def probe_cases(profile) -> list[Case]:
    """Configs that no regime picks today but that must keep their promise: a
    16×256×16 FMA product (all three dims >= 16) stays FMAs in IEEE fp32."""
    from linreg_fused.kernels import linear_mse_grad
    from linreg_fused.kernels.config import TileConfig

    x, t = _meta(1 << 20, 256, dtype=torch.float32), _meta(1 << 20, 16, dtype=torch.float32)
    w, b = _meta(16, 256, dtype=torch.float32), _meta(16, dtype=torch.float32)
    cfg = TileConfig(16, 256, 16, use_dot=False, max_programs=2 * profile.multiprocessors, num_warps=8, num_stages=3)
    plan, _ = linear_mse_grad.plan_linear_mse_partials(x, w, b, t, config=cfg, profile=profile)
    return [Case(regime="probe 16x256x16", kernel="grad-fma", dtype="fp32", precision="ieee", plan=plan, hot=False,
                 memory_bound=False, tile_bytes=16 * 272 * 4, tensor_core=False)]


def all_cases(arch: Arch) -> list[Case]:
    from linreg_fused.kernels.config import DeviceProfile

    # What device_profile() reads from a card of this architecture.
    profile = DeviceProfile(gpu=True, multiprocessors=arch.multiprocessors, shared_per_block=arch.shared_per_block,
                            shared_per_sm=arch.shared_per_sm)
    cases: list[Case] = []
    fp64_done: set[tuple] = set()
    for regime in (r for r in REGIMES if r.gpu):
        shape = (regime.kind, regime.n_rows, regime.in_features, regime.out_features, regime.batch_size)
        dtypes = [regime.dtype_name]
        if shape not in fp64_done:
            fp64_done.add(shape)
            dtypes.append("fp64")
        for dtype_name in dtypes:
            precisions = ("ieee",) if dtype_name == "fp64" or regime.kind == "fit" else PRECISIONS
            for precision in precisions:
                cases += regime_cases(regime, dtype_name, precision, profile)
    return cases + probe_cases(profile)


# Awkward shapes: D and O not multiples of any block, 1-sized dims (Triton makes an integer
# argument equal to 1 a constant), D beyond one block, O beyond one block of the forward,
# every dtype and precision. (N, D, O, dtype, precision, bias); N = 1 also gives n_rows = 1.
SHAPES = (
    (1, 1, 1, "fp32", "ieee", True), (517, 300, 33, "fp32", "ieee", False), (50001, 700, 70, "fp32", "tf32", True),
    (10001, 1000, 200, "fp32", "ieee", True), (517, 3, 2, "bf16", "tf32", False),
    (517, 1500, 257, "fp32", "tf32x3", False), (517, 4100, 1, "bf16", "ieee", True),
    (517, 1000, 200, "fp32", "tf32x3", True), (517, 700, 70, "fp64", "ieee", True),
    (517, 4100, 257, "fp64", "ieee", False),
)


def shape_cases(arch: Arch) -> list[Case]:
    """The launches the helpers choose for SHAPES: gradient and forward on every shape, the
    reduce-update where its specialisation differs (1-sized, fp64), the fused fit and the
    statistics kernels at 1-sized dims."""
    from linreg_fused.kernels import fused_fit, linear_forward, linear_mse_grad, linear_stats, reduce_update
    from linreg_fused.kernels.config import DeviceProfile
    from linreg_fused.kernels.plan import LaunchPlan
    from linreg_fused.kernels.specs import ColumnTarget, SGDHyper

    profile = DeviceProfile(gpu=True, multiprocessors=arch.multiprocessors, shared_per_block=arch.shared_per_block,
                            shared_per_sm=arch.shared_per_sm)
    cases: list[Case] = []
    for n, d, o, dtype_name, precision, has_bias in SHAPES:
        dt = _DTYPES[dtype_name]
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        common = dict(regime=f"{n}x{d}x{o}{'' if has_bias else ' nobias'}", dtype=dtype_name, precision=precision,
                      hot=False, memory_bound=False, tile_bytes=0)
        x, t, w = _meta(n, d, dtype=dt), _meta(n, o, dtype=dt), _meta(o, d, dtype=pdt)
        b = _meta(o, dtype=pdt) if has_bias else None
        grad, partials = linear_mse_grad.plan_linear_mse_partials(x, w, b, t, input_precision=precision,
                                                                  profile=profile)
        tc = grad.constexprs["USE_DOT"] and precision != "ieee"
        cases.append(Case(kernel="grad", plan=grad, tensor_core=tc, **common))
        forward, _ = linear_forward.plan_linear_forward(x, w, b, out_dtype=pdt, input_precision=precision,
                                                        profile=profile)
        cases.append(Case(kernel="forward", plan=forward, tensor_core=tc, **common))
        if n == 1 or dt == torch.float64:
            targets = [ColumnTarget(0, w, SGDHyper(0.1, momentum=0.9), _meta(o, d, dtype=pdt))]
            targets += [ColumnTarget(o * d, b, SGDHyper(0.1))] if b is not None else []
            update = reduce_update.plan_reduce_update(partials.buffer, targets, scale=1.0, loss_out=_meta(dtype=pdt),
                                                      loss_column=partials.loss_column, profile=profile)
            cases.append(Case(kernel="update", plan=update, tensor_core=False, **common))
    # The fused fit and the statistics epochs at N = D = O = batch = 1 (every integer argument 1).
    common = dict(regime="1x1x1", dtype="fp32", precision="ieee", hot=False, memory_bound=False, tile_bytes=0,
                  tensor_core=False)
    x, t, w, b = _meta(1, 1, dtype=torch.float32), _meta(1, 1, dtype=torch.float32), _meta(1, 1, dtype=torch.float32), \
        _meta(1, dtype=torch.float32)
    fit = fused_fit.plan_fit_small(x, t, w, b, None, None, _meta(1, 1, dtype=torch.int64),
                                   _meta(1, 2, dtype=torch.float32), batch_size=1, mean=True,
                                   weight_hyper=SGDHyper(0.1), bias_hyper=SGDHyper(0.1), init_weight_buffer=False,
                                   init_bias_buffer=False, profile=profile)
    cases.append(Case(kernel="fit", plan=fit, **common))
    f64 = _meta(1, dtype=torch.float64)
    epochs = dict(mean_x_ptr=f64, mean_t_ptr=f64, m_xx_ptr=f64, m_tx_ptr=f64, m_tt_ptr=f64,
                  hyper_ptr=_meta(8, dtype=torch.float64), history_ptr=_meta(1, dtype=torch.float32),
                  w_ptr=w, b_ptr=b, w_buf_ptr=w, b_buf_ptr=b, w_state_ptr=_meta(2, 1, 1, dtype=torch.float32),
                  b_state_ptr=_meta(2, 1, dtype=torch.float32), w_buf_state_ptr=_meta(2, 1, 1, dtype=torch.float32),
                  b_buf_state_ptr=_meta(2, 1, dtype=torch.float32), n_rows=1, D=1, O=1, n_epochs=1)
    flags = dict(HAS_BIAS=True, UPDATE_W=True, UPDATE_B=True, MEAN=True, W_FLAGS=15, B_FLAGS=15,
                 INIT_W_BUFFER=True, INIT_B_BUFFER=True, **linear_stats.epoch_blocks(1, 1))
    cases.append(Case(kernel="stats-epochs", plan=LaunchPlan(linear_stats._stats_sgd_kernel, (1,), epochs, flags,
                                                             linear_stats.EPOCH_WARPS, 1), **common))
    return cases


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
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", ptx)
    ptx_params = [" ".join(p.split()[1:-1]) for p in entry.group(1).split(",")] if entry else []
    return dict(compile_s=seconds, shared=compiled.metadata.shared, regs=int(res.get("REG", 0)),
                stack=int(res.get("STACK", 0)), local=int(res.get("LOCAL", 0)), ptx_params=ptx_params,
                **ptx_counts(ptx))


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


def analyse(arch: Arch, case: Case, signature: dict, result: dict) -> Row:
    plan, c = case.plan, case.plan.constexprs
    blocks = "×".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_D", "BLOCK_O", "BLOCK_P", "BLOCK_COLS") if k in c)
    if "USE_DOT" in c:
        blocks += " dot" if c["USE_DOT"] else " fma"
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
    if case.tensor_core and not result["mma_tf32"]:
        problems.append(f"no tf32 MMA in a {case.precision} launch")
    if case.hot and case.memory_bound and inflight < IN_FLIGHT_TARGET:
        problems.append(f"{inflight} B in flight per SM < {IN_FLIGHT_TARGET}")
    for name, ptx_type in fp64_params.items():
        if ".f64" not in ptx_type:
            problems.append(f"{name} is passed as {ptx_type}, not f64")
    return Row(arch.capability, case.regime, case.kernel, case.dtype, case.precision, case.hot, case.memory_bound,
               case.tensor_core, blocks, grid, plan.num_warps, plan.num_stages, result["shared"],
               arch.shared_per_block, result["regs"], spill, result["mma"], result["mma_tf32"], result["fma"],
               result["cp_async"], per_sm, fit, inflight, result["compile_s"],
               fp64_params, problems)


def report(capabilities: list[int], jobs: int = 1, only: str | None = None, hot_only: bool = False,
           progress=None, cases_of=None) -> tuple[list[Row], dict]:
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
            "mma(tf32)", "fma", "cp.async", "grid/SM", "fit/SM", "inflight/SM", "ok")
    lines = [head]
    for r in rows:
        lines.append((f"sm_{r.arch}", r.regime, r.kernel, r.dtype, r.precision, r.blocks, str(r.num_warps),
                      str(r.num_stages), f"{r.shared / 1024:.1f}K", str(r.regs), str(r.spill),
                      f"{r.mma}({r.mma_tf32})", str(r.fma), str(r.cp_async), str(r.programs_per_sm), str(r.fit_per_sm),
                      f"{r.inflight_per_sm / 1024:.1f}K" if r.memory_bound else "-",
                      "ok" if not r.problems else "; ".join(r.problems)))
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
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Triton's cache directory (default: a fresh one, so compile times are cold)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the report compiles for a GPU target")
    with tempfile.TemporaryDirectory() as cache:
        if not args.warm_cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # read by Triton at compile time, also in the workers
        rows, summary = report(args.arch, args.jobs, args.only, args.hot, cases_of=shape_cases if args.shapes else None,
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
