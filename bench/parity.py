"""The parity checks of the GPU check (bench/gpu_parity_*.py): linreg-fused's kernels against
float64 on fresh random inputs (never zeros), with freed GPU memory NaN-filled before each
check so that an output a kernel forgets to write reads as NaN.

Every Triton specialization costs 0.6-3.7 s to compile on a cold cache, so the problems
reuse the timed regimes' (D, O) -- their kernel configurations -- and add only what the
regimes lack: odd N (masked row tiles), 1-sized dims, D and O off every block, no bias,
fp16 and fp64 inputs, N·D > 2^31, bitwise determinism over three runs, every branch of
the SGD update, fit with momentum, inference on 3-D input. The timed regimes are checked
by their runners (bench/harness.py) before they are timed.

Importing this needs torch only (linreg_fused is imported inside the checks), so the
compile report can read parity_shapes().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from regimes import BF16, FP32

FP16, FP64 = torch.float16, torch.float64


def dn(dtype: torch.dtype) -> str:
    return {FP32: "fp32", BF16: "bf16", FP16: "fp16", FP64: "fp64"}[dtype]


# Tolerances on norm-relative error against float64. Bugs show up as O(1) errors or NaN;
# these leave room for honest rounding: fp32 sums over millions of rows, TF32 products
# (10-bit mantissa), and gradients returned in a half input's dtype.
# "auto" is "ieee" for fp32 (PyTorch's default matmul precision) and "tf32x3" for 16-bit inputs;
# tf32x3 measured 1.3e-7 to 3.8e-7 on an H200 (bench/results/H200-2026-11-26-sweep.json).
TOL = {"auto": 2e-5, "ieee": 2e-5, "tf32x3": 2e-5, "tf32": 1e-2, "fp64": 1e-10}  # honest fp32 errors: ~1e-7
HALF_OUT_TOL = {BF16: 2e-2, FP16: 3e-3}  # dX / dT come back rounded to x's dtype


@dataclass(frozen=True)
class Shape:
    """One parity problem: N×D→O, X's dtype, the product precision, and what it exercises."""

    n: int
    d: int
    o: int
    dtype: torch.dtype = FP32
    precision: str = "auto"
    bias: bool = True
    input_grads: bool = False  # dX and dT too (the kernel keeps the residual)

    @property
    def name(self) -> str:
        extra = ("" if self.bias else " no-bias") + (" +dX/dT" if self.input_grads else "")
        return f"{self.n}x{self.d}->{self.o} {dn(self.dtype)}-in {self.precision}{extra}"


def parity_shapes(smoke: bool) -> dict[str, list[Shape]]:
    """The parity problems, at the GPU regimes' (D, O) (smoke: the CPU regimes')."""
    if smoke:
        tall, wide, deep, many = (16, 4), (24, 5), (16, 4), (16, 100)
        n, odd, big = 70, Shape(70, 70, 33, bias=False), Shape(300, 16, 4)
    else:
        tall, wide, deep, many = (64, 4), (256, 16), (1024, 8), (64, 200)
        n, odd = 4099, Shape(517, 300, 33, bias=False)  # D and O off every block; O > 16: tl.dot
        big = Shape(4_194_311, 520, 2)  # N·D = 2.18e9 > 2^31: 64-bit offsets
    return {
        "linear_mse": [Shape(1, 1, 1), Shape(n, *tall, input_grads=True), Shape(n, *wide),
                       Shape(n, *wide, precision="tf32"), Shape(n, *wide, precision="tf32x3"),
                       Shape(n // 4, *deep), Shape(n // 4, *deep, precision="tf32x3"), odd,
                       Shape(n, *tall, dtype=BF16, input_grads=True), Shape(n, *wide, dtype=BF16),
                       Shape(7, 3, 2, dtype=FP16, input_grads=True), Shape(513, 20, 5, dtype=FP64), big],
        # Several row tiles per program on a GPU (the smoke run keeps the interpreter's share small).
        "determinism": [Shape(n * (4 if smoke else 16) + 3, *tall), Shape(n, *wide, dtype=BF16)],
        "train_step": [Shape(n, *wide)],
        "inference": [Shape(1, 1, 1), Shape(n, *many), Shape(n, *many, precision="tf32x3"),
                      Shape(n, *wide, precision="tf32"), Shape(n, *tall, dtype=BF16),
                      Shape(n, *deep), big],
    }


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-relative error against a float64 reference (NaN anywhere gives NaN, which fails)."""
    a, ref = a.detach().double(), ref.detach().double()
    den = float(ref.norm())
    num = float((a - ref).norm())
    return num / den if den > 0 else num


def poison_allocator(device: torch.device) -> None:
    """Fill the caching allocator's free blocks with NaN, so an output a kernel forgets to
    write reads as NaN instead of a stale value that might happen to be right."""
    if device.type != "cuda":
        return
    big = torch.full(((256 << 20) // 4,), float("nan"), device=device)
    small = [torch.full(((256 << 10) // 4,), float("nan"), device=device) for _ in range(32)]
    del big, small


def init_params(o: int, d: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's init range, from a seeded generator (fp32)."""
    bound = 1 / math.sqrt(d)
    w = (torch.rand((o, d), generator=gen, device=device) * 2 - 1) * bound
    b = (torch.rand((o,), generator=gen, device=device) * 2 - 1) * bound
    return w, b


def make_xt(s: Shape, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random X and targets from a linear map plus noise, in s.dtype (never zeros)."""
    x = torch.randn((s.n, s.d), generator=gen, device=device)
    w_true = torch.randn((s.o, s.d), generator=gen, device=device) / math.sqrt(s.d)
    t = torch.addmm(torch.randn((s.o,), generator=gen, device=device), x, w_true.t())
    t += 0.1 * torch.randn((s.n, s.o), generator=gen, device=device)
    return x.to(s.dtype), t.to(s.dtype)


def ref_loss_grads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor,
                   input_grads: bool, chunk: int = 1 << 18) -> dict[str, torch.Tensor]:
    """Float64 loss and gradients of mean((x·wᵀ + b − t)²), over row chunks (x may be 9 GB)."""
    w64 = w.detach().double()
    b64 = None if b is None else b.detach().double()
    sq, dw, db, dx, dt = 0.0, torch.zeros_like(w64), torch.zeros(w.shape[0], dtype=FP64, device=w.device), [], []
    scale = 2.0 / t.numel()
    for s in range(0, x.shape[0], chunk):
        x64, t64 = x[s : s + chunk].detach().double(), t[s : s + chunk].detach().double()
        r = x64 @ w64.t() - t64 + (0 if b64 is None else b64)
        sq += float((r * r).sum())
        dw += (r * scale).t() @ x64
        db += (r * scale).sum(0)
        if input_grads:
            dx.append((r * scale) @ w64)
            dt.append(-r * scale)
    out = {"loss": torch.tensor(sq / t.numel(), dtype=FP64), "dW": dw}
    if b is not None:
        out["db"] = db
    if input_grads:
        out.update(dX=torch.cat(dx), dT=torch.cat(dt))
    return out


def check_linear_mse(s: Shape, seed: int, device: torch.device) -> dict[str, Any]:
    """linear_mse's loss and gradients (autograd Function, Triton backend) against float64."""
    from linreg_fused import linear_mse

    gen = generator(device, seed)
    x, t = make_xt(s, gen, device)
    w_dtype = FP64 if s.dtype == FP64 else FP32
    w, b = (p.to(w_dtype) for p in init_params(s.o, s.d, gen, device))
    b = b if s.bias else None
    ref = ref_loss_grads(x, w, b, t, s.input_grads)
    for v in (w, b, *((x, t) if s.input_grads else ())):
        if v is not None:
            v.requires_grad_()
    poison_allocator(device)
    loss = linear_mse(x, w, b, t, backend="triton", input_precision=s.precision)
    loss.backward()
    base = TOL["fp64"] if s.dtype == FP64 else TOL[s.precision]
    errors = {"loss": (rel_err(loss, ref["loss"]), base), "dW": (rel_err(w.grad, ref["dW"]), base)}
    if b is not None:
        errors["db"] = (rel_err(b.grad, ref["db"]), base)
    if s.input_grads:
        half = max(base, HALF_OUT_TOL.get(s.dtype, 0.0))
        errors.update(dX=(rel_err(x.grad, ref["dX"]), half), dT=(rel_err(t.grad, ref["dT"]), half))
    expect = torch.promote_types(s.dtype, w_dtype)
    fail = loss.dtype != expect or (s.input_grads and x.grad.dtype != s.dtype)
    return {"errors": errors, "fail": fail, "loss_dtype": str(loss.dtype),
            "note": f"loss dtype {loss.dtype} (expected {expect})" if fail else ""}


def check_determinism(s: Shape, seed: int, device: torch.device) -> dict[str, Any]:
    """Same inputs three times: loss, gradients and three fused SGD steps with momentum are bitwise equal."""
    from linreg_fused import FusedLinearRegressor, FusedSGD, linear_mse

    gen = generator(device, seed)
    x, t = make_xt(s, gen, device)
    w0, b0 = init_params(s.o, s.d, gen, device)
    outs = []
    for _ in range(3):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        poison_allocator(device)
        loss = linear_mse(x, w, b, t, backend="triton")
        loss.backward()
        model = FusedLinearRegressor(s.d, s.o, device=device, backend="triton")
        with torch.no_grad():
            model.weight.copy_(w0)
            model.bias.copy_(b0)
        opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            model.train_step(x, t, opt)
        outs.append([loss.detach(), w.grad, b.grad, model.weight.detach().clone(), model.bias.detach().clone()])
    equal = all(torch.equal(a, b) for other in outs[1:] for a, b in zip(outs[0], other))
    return {"errors": {"bitwise_mismatch": (0.0 if equal else 1.0, 0.0)}}


# Two variants reach every branch of the update kernel (momentum, Nesterov, dampening,
# weight decay, maximize), each branch set being one specialization of it; plain SGD is
# what the timed regimes' fused peers run, checked there.
SGD_VARIANTS: dict[str, dict[str, Any]] = {
    "momentum+dampening": dict(lr=0.05, momentum=0.9, dampening=0.1),
    "nesterov+wd+maximize": dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True),
}


def check_sgd_step_api(variant: str, seed: int, device: torch.device, d: int) -> dict[str, Any]:
    """FusedSGD.step() on given .grad tensors vs torch.optim.SGD.step(), 5 steps, buffers too."""
    from linreg_fused import FusedSGD

    gen = generator(device, seed)
    shapes = [(16, d), (16,)]
    ps = [torch.randn(s, generator=gen, device=device) for s in shapes]
    grads = [[torch.randn(s, generator=gen, device=device) for s in shapes] for _ in range(5)]
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


def check_sgd_train_step(variant: str, s: Shape, seed: int, device: torch.device) -> dict[str, Any]:
    """FusedLinearRegressor.train_step (fused backward + update) vs nn.Linear + mse + SGD in float64,
    5 steps; and loss(optimizer=).backward() against train_step (documented as the same kernels)."""
    import torch.nn.functional as F
    from torch import nn

    from linreg_fused import FusedLinearRegressor, FusedSGD

    gen = generator(device, seed)
    x, t = make_xt(s, gen, device)
    w0, b0 = init_params(s.o, s.d, gen, device)
    lin = nn.Linear(s.d, s.o, device=device, dtype=FP64)
    models = [FusedLinearRegressor(s.d, s.o, device=device, backend="triton") for _ in range(2)]
    for m in (lin, *models):
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)
    opt_t = torch.optim.SGD(lin.parameters(), **SGD_VARIANTS[variant])
    opts = [FusedSGD(m.parameters(), backend="triton", **SGD_VARIANTS[variant]) for m in models]
    losses = []
    for _ in range(5):
        opt_t.zero_grad()
        loss_t = F.mse_loss(lin(x.double()), t.double())
        loss_t.backward()
        opt_t.step()
        loss_m = models[0].train_step(x, t, opts[0])
        models[1].loss(x, t, optimizer=opts[1]).backward()
        losses.append((float(loss_m), float(loss_t.detach())))
    tol = 1e-4
    errors = {"W": (rel_err(models[0].weight, lin.weight), tol), "b": (rel_err(models[0].bias, lin.bias), tol),
              "loss": (max(abs(a - b) / abs(b) for a, b in losses), tol)}
    bitwise = torch.equal(models[1].weight, models[0].weight) and torch.equal(models[1].bias, models[0].bias)
    errors["autograd_path_vs_train_step_bitwise"] = (0.0 if bitwise else 1.0, 0.0)
    return {"errors": errors}


def check_fit_momentum(kind: str, seed: int, device: torch.device, smoke: bool) -> dict[str, Any]:
    """fit with momentum 0.9, rows in order, against a float64 eager loop over the same batches
    (the timed regimes check fit without momentum, shuffled). "tutorial": the persistent kernel;
    "per-batch": one fused step per batch, rows gathered in the kernel, CUDA-graph replay from 3 epochs."""
    import torch.nn.functional as F
    from torch import nn

    from linreg_fused import FusedLinearRegressor, FusedSGD
    from linreg_fused.backend import select_ops
    from linreg_fused.data import crop_yields

    gen = generator(device, seed)
    if kind == "tutorial":
        x, t = crop_yields(device=device)
        lr, bs, epochs = 1e-5, 5, 10
    else:
        x, t = make_xt(Shape(*((192, 24, 5) if smoke else (4096, 256, 16))), gen, device)
        lr, bs, epochs = 0.05, 64 if smoke else 1024, 3
    w0, b0 = init_params(t.shape[1], x.shape[1], gen, device)
    persistent = select_ops("triton", device).fit_small_supported(bs, x.shape[1], t.shape[1])
    model = FusedLinearRegressor(x.shape[1], t.shape[1], device=device, backend="triton")
    lin = nn.Linear(x.shape[1], t.shape[1], device=device, dtype=FP64)
    for m in (model, lin):
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)
    opt = FusedSGD(model.parameters(), lr=lr, momentum=0.9, backend="triton")
    hist = model.fit(x, t, epochs=epochs, batch_size=bs, optimizer=opt, shuffle=False, progress=False)
    opt_ref = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9)
    ref_hist = []
    for _ in range(epochs):
        losses = []
        for s in range(0, x.shape[0], bs):
            opt_ref.zero_grad()
            loss = F.mse_loss(lin(x[s : s + bs].double()), t[s : s + bs].double())
            loss.backward()
            opt_ref.step()
            losses.append(float(loss.detach()))
        ref_hist.append(sum(losses) / len(losses))
    tol = 1e-4
    hist_err = max(abs(a - b) / abs(b) for a, b in zip(hist, ref_hist))
    buf_err = rel_err(opt.state[model.weight]["momentum_buffer"], opt_ref.state[lin.weight]["momentum_buffer"])
    wrong_path = persistent != (kind == "tutorial")  # the case must exercise the path it names
    return {"errors": {"history": (hist_err, tol), "W": (rel_err(model.weight, lin.weight), tol),
                       "b": (rel_err(model.bias, lin.bias), tol), "W_momentum_buffer": (buf_err, tol)},
            "fail": wrong_path, "persistent_kernel": persistent, "note": f"persistent={persistent}"}


def check_inference(s: Shape, seed: int, device: torch.device, lead: tuple[int, ...] = ()) -> dict[str, Any]:
    """model(x) against float64 (over row chunks) and, for fp32 inputs, nn.Linear."""
    from torch import nn

    from linreg_fused import FusedLinearRegressor

    gen = generator(device, seed)
    x, _ = make_xt(s, gen, device)
    model = FusedLinearRegressor(s.d, s.o, device=device, backend="triton", input_precision=s.precision)
    w0, b0 = init_params(s.o, s.d, gen, device)
    with torch.no_grad():
        model.weight.copy_(w0)
        model.bias.copy_(b0)
        poison_allocator(device)
        x_in = x.reshape(*lead, -1, s.d)
        y_in = model(x_in)
        y = y_in.reshape(-1, s.o)
        # The last rows hold the largest offsets (past 2^31 elements for the big shape).
        rows = torch.cat([torch.arange(min(4096, s.n), device=device), torch.arange(max(0, s.n - 4096), s.n, device=device)])
        ref = torch.addmm(b0.double(), x[rows].double(), w0.double().t())
        errors = {"vs_float64": (rel_err(y[rows], ref), TOL[s.precision])}
        if s.dtype == FP32 and s.precision in ("auto", "ieee"):
            lin = nn.Linear(s.d, s.o, device=device)
            lin.load_state_dict(model.state_dict())
            errors["vs_nn.Linear"] = (rel_err(y[rows], lin(x[rows])), TOL[s.precision])
    fail = y_in.shape != (*x_in.shape[:-1], s.o) or y.dtype != FP32
    return {"errors": errors, "fail": fail, "out_dtype": str(y.dtype)}


@dataclass(frozen=True)
class Check:
    """One parity check: fn() returns {"errors": {quantity: (error, tolerance)}, ...}."""

    name: str
    fn: Callable[[], dict[str, Any]]
    need_s: float = 2.0  # what it needs of the budget to start
    group: str = ""  # "grad" | "train" | "infer": the GPU check runs each group as a section of its own


def parity_checks(smoke: bool, device: torch.device, group: str | None = None) -> list[Check]:
    """Every parity check (or those of one group), in a fixed order."""
    shapes = parity_shapes(smoke)
    checks: list[Check] = []
    seeds = iter(range(101, 1000))

    def need(s: Shape) -> float:
        return 10.0 if s.n > 1_000_000 else 2.0

    for s in shapes["linear_mse"]:
        checks.append(Check(f"linear_mse {s.name}", partial(check_linear_mse, s, next(seeds), device), need(s), "grad"))
    for s in shapes["determinism"]:
        checks.append(Check(f"determinism x3 {s.name}", partial(check_determinism, s, next(seeds), device), group="grad"))
    d = shapes["train_step"][0].d
    for variant in SGD_VARIANTS:
        checks.append(Check(f"FusedSGD.step() {variant}", partial(check_sgd_step_api, variant, next(seeds), device, d),
                            group="train"))
        for s in shapes["train_step"]:
            checks.append(Check(f"train_step vs float64 SGD {variant} {s.name}",
                                partial(check_sgd_train_step, variant, s, next(seeds), device), group="train"))
    for kind in ("tutorial", "per-batch"):
        checks.append(Check(f"fit momentum {kind}", partial(check_fit_momentum, kind, next(seeds), device, smoke), 5.0,
                            "train"))
    for s in shapes["inference"]:
        checks.append(Check(f"inference {s.name}", partial(check_inference, s, next(seeds), device), need(s), "infer"))
    s = shapes["inference"][1]
    checks.append(Check(f"inference 3-D input {s.name}", partial(check_inference, s, next(seeds), device, (1,)),
                        group="infer"))
    return [c for c in checks if group is None or c.group == group]
