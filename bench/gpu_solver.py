"""GPU check section "solver": the one-pass R factor (LinearStats on the Triton backend) and
the exact solve from it.

- parity: the factor pass against float64 Householder QR of the same shifted rows, on tall
  (P = 33), wide (P = 64, the kernel's widest) and deep (D = 1024: the torch path on the
  device) fp32 data; a rerun must give the same bits.
- NIST StRD on the card: each dataset's certified estimates in float64 and float32 data, as
  ratios to the certified values (parity against 1 at the goal's tolerance), and the LRE.
- timing: the factor pass against the co-moments pass (fit's statistics path) on the same
  data, GB/s and % of copy (goal: >= 60% of copy for D <= 64); the solve of a 1,024-feature
  problem from its statistics (goal: <= 10 ms).

A section of bench/gpu_check.py (see its contract): ``run(ctx)``; ``ctx.smoke`` runs tiny
shapes through Triton's interpreter in a few seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SECTION = "solver"
ORDER = 55  # parity rows first, then timings: after the parity sections (< 50)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # nist_strd: the data and the goals


def _shapes(smoke: bool) -> dict[str, tuple[int, int, int]]:
    if smoke:
        return {"tall": (3000, 30, 2), "wide": (400, 61, 2), "deep": (400, 300, 4)}
    return {"tall": (4_194_304, 30, 2), "wide": (1_048_576, 61, 2), "deep": (262_144, 1024, 8)}


def _data(n: int, d: int, o: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device) + 3.0
    t = x[:, :1] * 0.5 - 1.0 + torch.randn(n, o, generator=g, device=device)
    return x, t


def run(ctx) -> None:
    from linreg_fused import LinearStats
    from linreg_fused.backend import select_ops
    from linreg_fused.factor import torch_factor

    device, smoke = ctx.device, ctx.smoke
    ops = select_ops("triton", device)
    passes = {}
    for name, (n, d, o) in _shapes(smoke).items():
        if ctx.left_s() < 60 and not smoke:
            ctx.skip(f"factor {name}", f"{ctx.left_s():.0f} s of the budget left")
            continue
        x, t = _data(n, d, o, device)
        stats = LinearStats.from_tensors(x, t, backend="triton")
        ref = torch_factor(x.double(), t.double(), stats.shift)  # float64 Householder of the same rows
        ctx.parity(f"factor {name} fp32 {n}x{d}->{o}", stats.factor, ref, 1e-11, n=n, d=d, o=o,
                   path="triton" if 1 + d + o <= 64 else "torch on the device")
        again = LinearStats.from_tensors(x, t, backend="triton")
        ctx.record(f"factor {name} bitwise rerun", same_bits=bool(torch.equal(again.factor, stats.factor)))
        passes[name] = (x, t)
        del ref, again, stats

    _nist(ctx)
    _solve_1024(ctx)

    for name, (x, t) in passes.items():  # timings last: parity first, in case the budget runs out
        if smoke:  # the interpreter's moments kernel takes minutes on these shapes: time a slice
            x, t = x[:128], t[:128]
        n, d, o = x.shape[0], x.shape[1], t.shape[1]
        data_bytes = n * (d + o) * x.element_size()
        ctx.time(f"factor pass {name} {n}x{d}->{o}", lambda: LinearStats.from_tensors(x, t, backend="triton"),
                 bytes=data_bytes, n=n, d=d, o=o, goal="60% of copy for D <= 64")
        if smoke and d > 64:
            ctx.skip(f"moments pass {name} {n}x{d}->{o}", "the interpreter's moments kernel takes minutes at D > 64")
            continue
        ctx.time(f"moments pass {name} {n}x{d}->{o}", lambda: ops.linear_moments(x, t, fp64=False),
                 bytes=data_bytes, n=n, d=d, o=o)


def _nist(ctx) -> None:
    import warnings

    import numpy as np
    from nist_strd import NAMES, floor, load, lre

    from linreg_fused import LinearStats

    for name in NAMES:
        data = load(name)
        for float32 in (False, True):
            dtype = torch.float32 if float32 else torch.float64
            x = torch.from_numpy(data.x).to(dtype).to(ctx.device)
            y = torch.from_numpy(data.y)[:, None].to(dtype).to(ctx.device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                weight, bias = LinearStats.from_tensors(x, y, backend="triton").solve(fit_intercept=data.intercept)
            coef = weight[0].cpu().numpy()
            if data.intercept:
                coef = np.concatenate([bias.cpu().numpy(), coef])
            goal = floor(data, float32)
            digits = lre(coef, data.coef)
            label = f"nist {name} {'fp32' if float32 else 'fp64'} data"
            warned = any("condition number" in str(w.message) for w in caught)
            if goal > 0:
                ratio = torch.from_numpy(coef / data.coef)
                ctx.parity(label, ratio, torch.ones_like(ratio), 10.0 ** -goal, lre=round(digits, 2),
                           goal_lre=round(goal, 2))
            # Fewer than 4 correct digits (always so where the data's rounding leaves none: Filip's
            # fp32 data) must come with the solver's one-line warning.
            ctx.record(f"{label} LRE", status="pass" if digits >= 4 or warned else "fail", lre=round(digits, 2),
                       goal_lre=round(goal, 2), ok=digits >= goal, warned=warned)


def _solve_1024(ctx) -> None:
    import warnings

    from linreg_fused import LinearStats

    n, d, o = (400, 300, 2) if ctx.smoke else (16_384, 1024, 8)
    if not ctx.smoke and ctx.left_s() < 60:
        ctx.skip("solve 1024 features", f"{ctx.left_s():.0f} s of the budget left")
        return
    x, t = _data(n, d, o, ctx.device, seed=1)
    stats = LinearStats.from_tensors(x, t, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight, bias = stats.solve()
    z = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64, device=ctx.device)], 1)
    ref = torch.linalg.lstsq(z.cpu(), t.double().cpu()).solution.t()
    ctx.parity(f"solve {d} features", torch.cat([weight, bias[:, None]], 1).cpu(), ref, 1e-8, n=n, d=d, o=o)
    def solve():
        with warnings.catch_warnings():  # noise features: their digits at fp32 data's resolution are not the point
            warnings.simplefilter("ignore")
            return stats.solve()

    ctx.time(f"solve {d} features from the statistics", solve, n=n, d=d, o=o, goal_ms=10.0)
