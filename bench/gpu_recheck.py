"""GPU check section: recheck, on the card, register spills that were fixed without a GPU.

Triton 3.6 spilled registers in two launches measured on the H200 (2026-11-26), since changed
by compiling on the CPU only: the deep tf32 gradient (now 8 warps) and IEEE deep inference
(now 32-row tiles). Each is planned by its launch helper for this card, compiled by the
machine's Triton through the launcher's own path (JITFunction.warmup), loaded, and its
n_regs / n_spills read: pass iff no spills. Then every Triton kernel this process compiled so
far (the timing sections' launches) is listed with its registers, spills and shared memory;
the row fails if any spills. The other rechecks of issue 19 run elsewhere: the compiled
train_step with FusedSGD (Dynamo and the scheduler flag) and the one-rank NCCL step in
bench/gpu_torch.py, the distributed tests in bench/gpu_pytest.py.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from check_ctx import Ctx

SECTION = "recheck"
ORDER = 90
BUDGET_S = 15.0
DEEP = (4096, 1024, 8)  # rows (any: the configuration depends on D, O, precision and dtype), D, O


def loaded(kernel: Any) -> Any:
    """A compiled kernel with its handles loaded (n_regs and n_spills are read at load time)."""
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        init()
    return kernel


def kernel_row(name: str, kernel: Any, **extra: Any) -> dict[str, Any]:
    meta = getattr(kernel, "metadata", None)
    return {"kernel": name, "n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
            "shared_bytes": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
            "num_stages": getattr(meta, "num_stages", None), **extra}


def compile_plan(plan: Any) -> Any:
    return loaded(plan.kernel.warmup(**plan.args, **plan.constexprs, grid=plan.grid, num_warps=plan.num_warps,
                                     num_stages=plan.num_stages))


def named_launches(device: torch.device) -> dict[str, Any]:
    """The two launches that spilled with Triton 3.6, planned for this card: name -> LaunchPlan."""
    from linreg_fused.kernels.linear_forward import plan_linear_forward
    from linreg_fused.kernels.linear_mse_grad import plan_linear_mse_partials

    n, d, o = DEEP
    g = torch.Generator(device=device).manual_seed(3)
    x, w, b, t = (torch.randn(shape, generator=g, device=device) for shape in ((n, d), (o, d), (o,), (n, o)))
    grad, _ = plan_linear_mse_partials(x, w, b, t, input_precision="tf32")
    forward, _ = plan_linear_forward(x, w, b, out_dtype=torch.float32, input_precision="ieee")
    return {f"deep tf32 gradient {d}->{o}": grad, f"IEEE deep inference kernel {d}->{o}": forward}


def compiled_in_this_process() -> list[dict[str, Any]]:
    """Every compiled specialization held by the JIT caches of linreg_fused's kernel modules."""
    from triton.runtime.jit import JITFunction

    rows, seen = [], set()
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("linreg_fused") or module is None:
            continue
        for obj in list(vars(module).values()):
            fn = obj
            while fn is not None and not isinstance(fn, JITFunction):
                fn = getattr(fn, "fn", None)  # autotuner or heuristics wrappers
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            for entry in getattr(fn, "device_caches", {}).values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for key, kernel in list(getattr(cache, "items", lambda: [])()):
                    if hasattr(kernel, "metadata"):  # not a compile still in flight
                        rows.append(kernel_row(f"{fn.fn.__module__}.{fn.fn.__name__}", loaded(kernel),
                                               key=str(key)[:400]))
    return rows


def run(ctx: Ctx) -> None:
    if ctx.device.type != "cuda":
        ctx.skip("Triton spills on the card", "compiled kernels need a GPU (bench/compile_report.py compiles "
                 "them for sm_90 on the CPU)")
        return
    plans: dict[str, Any] = {}
    with ctx.guard("plan the launches that spilled with Triton 3.6"):
        plans = named_launches(ctx.device)
    for name, plan in plans.items():
        with ctx.guard(f"Triton spills: {name}"):
            row = kernel_row(name, compile_plan(plan), block=dict(plan.constexprs))
            ctx.record(f"Triton spills: {name}", status="pass" if row["n_spills"] == 0 else "fail", **row)
    with ctx.guard("Triton spills: every kernel compiled in this process"):
        kernels = compiled_in_this_process()
        spilling = [k for k in kernels if k["n_spills"]]
        ctx.record("Triton spills: every kernel compiled in this process", status="fail" if spilling else "pass",
                   compiled=len(kernels), spilling=len(spilling),
                   max_regs=max((k["n_regs"] or 0 for k in kernels), default=None),
                   spilling_kernels=[f"{k['kernel']} {k['n_spills']} B" for k in spilling], kernels=kernels)
