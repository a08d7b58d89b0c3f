"""GPU check section "kernels": the rows, chunks and mma formulations next to the default kernels.

For each full-batch regime (tall, wide, deep) and dtype (fp32, bf16), every formulation that
serves the shape (kernels/config.formulation_serves), IEEE products:

    parity    the summed partials [dW | db | loss] against float64, against the default kernel,
              and bitwise equal over two runs (a formulation that fails is not timed)
    timing    the gradient kernel alone and the whole step (gradient + reduce-and-update), each as
              do_bench (cold L2) and as the steady loop (100 back-to-back calls, one sync), with the
              bytes of one read of X and T (GB/s and % of copy from the ctx; % of the FMA roof from
              the flops where the regime is FMA-bound)

and inference (fp32; X read, Y written) in each formulation and as nn.Linear. First, the mma
formulation's splits are checked to be exact on the card (X = I: residual and dW equal W bitwise). bf16 also times
today's default launch for 16-bit inputs (the default kernel in tf32x3) and the mma formulation
(bf16 tensor cores, tf32x3-accurate) that would replace it. The predictions these are
to be checked against are in docs/kernels.md. Cost on an H200 host, estimated: ~20 new kernel
specialisations (2-4 s each to compile) and ~1 s of timing per launch: 60-100 s. Work is ordered by what matters most
(fp32 steps, then inference, then bf16) and stops when the section's budget runs low; on the CPU
smoke run (Triton's interpreter) the shapes are tiny and the section takes a few seconds.
"""

from __future__ import annotations

import torch

SECTION = "kernels"
ORDER = 55  # a timing section (its parity rows come first, within it)

GPU_REGIMES = (("tall", 4_194_304, 64, 4), ("wide", 1_048_576, 256, 16), ("deep", 262_144, 1024, 8))
# Smoke: shapes that cross tiles, chunks and lanes under the interpreter, a few launches each.
SMOKE_REGIMES = (("tall", 70, 16, 4), ("wide", 40, 72, 16))
FORMULATIONS = ("default", "rows", "chunks")
TOL = 2e-5  # IEEE products, fp32 accumulation (honest errors ~1e-7, bench/parity.py); bf16 inputs exact
LEFT_PER_REGIME_S = 12  # stop starting new work below this much budget
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _data(n: int, d: int, o: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(n * 7 + d * 3 + o)  # fresh random, not zeros
    x = torch.randn(n, d, device=device, generator=gen).to(dtype)
    t = torch.randn(n, o, device=device, generator=gen).to(dtype)
    w = torch.randn(o, d, device=device, generator=gen) / d ** 0.5
    b = torch.randn(o, device=device, generator=gen)
    return x, t, w, b


def _grad_reference(x, t, w, b) -> torch.Tensor:
    """[dW (O·D) | db (O) | loss (1)] in float64."""
    xd = x.double()
    r = xd @ w.double().T + b.double() - t.double()
    return torch.cat([(r.T @ xd).flatten(), r.sum(0), (r * r).sum().reshape(1)])


def _serves(name: str, d: int, o: int, dtype: torch.dtype, precision: str = "ieee", kind: str = "grad") -> str | None:
    from linreg_fused.kernels.config import formulation_serves

    return formulation_serves(name, d, o, torch.float32, precision, dtype, kind)


def _update_plan(partials, w, b, n: int):
    """One SGD step's reduce-and-update launch over the partial buffer (TypeError where this build's
    reduce_update takes other arguments: the step is then not timed, the kernel still is)."""
    from linreg_fused.kernels import reduce_update
    from linreg_fused.kernels.specs import ColumnTarget, SGDHyper

    o, d = w.shape
    hyper, scale = SGDHyper(lr=1e-6), 1.0 / (n * o)
    loss = torch.empty((), device=w.device, dtype=torch.float32)
    return reduce_update.plan_reduce_update(
        partials.buffer, [ColumnTarget(0, w, hyper), ColumnTarget(o * d, b, hyper)], scale=2 * scale,
        loss_out=loss, loss_column=partials.loss_column, loss_scale=scale)


def _grad(ctx, regime: str, n: int, d: int, o: int, dtype_name: str) -> None:
    from linreg_fused.kernels import formulations

    dtype = _DTYPES[dtype_name]
    elem = torch.finfo(dtype).bits // 8
    x, t, w, b = _data(n, d, o, dtype, ctx.device)
    ref = _grad_reference(x, t, w, b)
    where = f"{regime} {dtype_name} {n}x{d}->{o}"
    passed, default_sum = [], None
    # Every formulation in IEEE; for bf16 also today's default launch, tf32x3 ("auto" for 16-bit inputs),
    # and the mma formulation (bf16 tensor cores, tf32x3-accurate) that would replace it.
    candidates = [(name, "ieee") for name in FORMULATIONS] \
        + ([("default", "tf32x3"), ("mma", "tf32x3")] if dtype == torch.bfloat16 else [])
    for formulation, precision in candidates:
        name = formulation if precision == "ieee" else f"{formulation} {precision}"
        why = _serves(formulation, d, o, dtype, precision)
        if why:
            ctx.skip(f"grad {where} {name}", why)
            continue
        plan, partials = formulations.plan_grad_partials(x, w, b, t, input_precision=precision,
                                                         formulation=formulation)
        plan.launch()
        first = partials.buffer.clone()
        got = first.double().sum(0)
        info = dict(formulation=formulation, precision=precision, regime=regime, dtype=dtype_name,
                    grid=plan.grid[0], warps=plan.num_warps)
        ok = ctx.parity(f"grad {where} {name} vs float64", got, ref, TOL, **info)
        if default_sum is not None:
            ok &= ctx.parity(f"grad {where} {name} vs default", got, default_sum, 2 * TOL, **info)
        plan.launch()
        same = bool(torch.equal(first, partials.buffer))
        ctx.record(f"grad {where} {name} bitwise run to run", status="pass" if same else "fail", equal=same, **info)
        if name == "default":  # the IEEE default kernel: what the others are compared with
            default_sum = got
        if ok and same:
            passed.append((name, plan, partials, info))
    moved = n * (d + o) * elem
    flops = 4 * n * d * o  # X·Wᵀ and Rᵀ·X: a multiply-add is 2 flops
    for name, plan, partials, info in passed:
        ctx.time(f"grad {where} {name}", plan.launch, bytes=moved, flops=flops, view="kernel", **info)
        ctx.steady(f"grad {where} {name} steady", plan.launch, bytes=moved, view="kernel", **info)
        w2, b2 = w.clone(), b.clone()  # the step updates these in place
        try:
            update = _update_plan(partials, w2, b2, n)
        except TypeError as err:  # reduce_update's arguments changed: time the kernel alone
            ctx.skip(f"step {where} {name}", f"reduce_update.plan_reduce_update: {err}")
            continue

        def step(plan=plan, update=update) -> None:
            plan.launch()
            update.launch()

        ctx.time(f"step {where} {name}", step, bytes=moved, flops=flops, view="step", **info)
        ctx.steady(f"step {where} {name} steady", step, bytes=moved, view="step", **info)


def _mma_exact(ctx) -> None:
    """The mma formulation's three-term bf16 splits on the card's own conversions and MMAs: with X = I
    and T = 0 the residual is Wᵀ and dW is W, bit for bit (a two-term split would pass TOL's parity)."""
    from linreg_fused.kernels import formulations

    d, o = 64, 16
    gen = torch.Generator(device=ctx.device).manual_seed(d * o)
    x = torch.eye(d, device=ctx.device, dtype=torch.bfloat16)
    w = torch.randn(o, d, device=ctx.device, generator=gen) * torch.logspace(-6, 6, d, device=ctx.device)
    t = torch.zeros(d, o, device=ctx.device, dtype=torch.bfloat16)
    got = formulations.grad_partials(x, w, None, t, store_residual=True, input_precision="tf32x3", formulation="mma")
    residual = bool(torch.equal(got.residual, w.T))
    dw = bool(torch.equal(got.buffer.sum(0)[: o * d], w.flatten()))
    ctx.record(f"grad mma exact splits {d}x{d}->{o} (X = I)", status="pass" if residual and dw else "fail",
               residual_equal=residual, dw_equal=dw, formulation="mma", precision="tf32x3")


def _forward(ctx, regime: str, n: int, d: int, o: int) -> None:
    from linreg_fused.kernels import formulations

    x, _, w, b = _data(n, d, o, torch.float32, ctx.device)
    ref = x.double() @ w.double().T + b.double()
    where = f"inference-{regime} fp32 {n}x{d}->{o}"
    moved = n * d * 4 + n * o * 4
    lin_ms = None
    if ctx.device.type == "cuda":
        ctx.parity(f"forward {where} nn.Linear vs float64", torch.nn.functional.linear(x, w, b), ref, TOL)
        lin_ms = ctx.time(f"forward {where} nn.Linear", lambda: torch.nn.functional.linear(x, w, b), bytes=moved,
                          formulation="nn.Linear")
    for name in FORMULATIONS:
        why = _serves(name, d, o, torch.float32, kind="forward")
        if why:
            ctx.skip(f"forward {where} {name}", why)
            continue
        # The default formulation's kernel itself (linear_forward may route IEEE fp32 to PyTorch's GEMM).
        plan, y = formulations.plan_forward(x, w, b, out_dtype=torch.float32, formulation=name)
        plan.launch()
        if not ctx.parity(f"forward {where} {name} vs float64", y, ref, TOL, formulation=name):
            continue
        ms = ctx.time(f"forward {where} {name}", plan.launch, bytes=moved, formulation=name)
        ctx.steady(f"forward {where} {name} steady", plan.launch, bytes=moved, formulation=name)
        if lin_ms:
            ctx.record(f"forward {where} {name} vs nn.Linear", speedup=lin_ms / ms, formulation=name,
                       status="pass" if ms <= lin_ms else "fail")


def run(ctx) -> None:
    regimes = SMOKE_REGIMES if ctx.smoke else GPU_REGIMES
    work = [("grad", r, "fp32") for r in regimes] + [("forward", r, "fp32") for r in regimes] \
        + [("grad", r, "bf16") for r in regimes]
    if ctx.smoke:  # a few seconds on the interpreter: every formulation once, one bf16 shape
        work = [("grad", regimes[0], "fp32"), ("forward", regimes[0], "fp32"), ("grad", regimes[1], "bf16")]
    if not ctx.smoke and ctx.left_s() < LEFT_PER_REGIME_S:
        ctx.skip("grad mma exact splits", f"{ctx.left_s():.0f} s of the section's budget left")
    else:
        with ctx.guard("grad mma exact splits"):  # one small compile, and what parity within TOL cannot show
            _mma_exact(ctx)
    for kind, (regime, n, d, o), dtype_name in work:
        if not ctx.smoke and ctx.left_s() < LEFT_PER_REGIME_S:
            ctx.skip(f"{kind} {regime} {dtype_name}", f"{ctx.left_s():.0f} s of the section's budget left")
            continue
        if kind == "grad":
            _grad(ctx, regime, n, d, o, dtype_name)
        else:
            _forward(ctx, regime, n, d, o)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()  # the next regime's 1 GB of data
