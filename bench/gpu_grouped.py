"""GPU check section: grouped statistics (kernels/grouped_stats.py) at the issue's size.

10⁷ rows × 8 features → 1 target, fp32, 10⁵ groups with ids in random order (smoke: 4,096 rows,
64 groups, Triton's interpreter). Rows:

- parity "grouped coef g<i>": [W_g b_g] of a sample of groups against float64 lstsq on that
  group's centred rows (rcond 1e-7: what fp64 statistics can resolve), tol 1e-8 relative;
- parity "grouped triton vs torch": the Triton pass's moments against PyTorch's (the two
  backends), tol 1e-10;
- time "grouped pass": GroupedLinearStats' pass alone (sort, item sums, group sums; no range
  check), bytes = x, t and the ids read once: GB/s and % of copy (goal >= 50%);
- time "grouped solve": every group's solve from the statistics (goal <= 2 ms), its two host
  syncs included;
- time "grouped pass [torch]": the PyTorch backend's pass, for comparison.
"""

from __future__ import annotations

import numpy as np
import torch

from linreg_fused.backend import select_ops
from linreg_fused.grouped_ops import grouped_moments
from linreg_fused.grouped_stats import GroupedLinearStats

SECTION = "grouped"
ORDER = 60
SAMPLE = 8  # groups checked against lstsq


def _data(ctx, n, d, n_groups):
    gen = torch.Generator(device=ctx.device).manual_seed(26)
    g = torch.randint(0, n_groups, (n,), generator=gen, device=ctx.device)
    x = torch.randn((n, d), generator=gen, device=ctx.device) + 3.0
    w = torch.randn((n_groups, d), generator=gen, device=ctx.device)
    t = (x * w[g]).sum(1, keepdim=True) + 0.1 * torch.randn((n, 1), generator=gen, device=ctx.device)
    return x, t, g


def run(ctx) -> None:
    try:
        select_ops("triton", ctx.device)
    except RuntimeError as err:
        ctx.skip("grouped", str(err))
        return
    n, d, n_groups = (4096, 8, 64) if ctx.smoke else (10_000_000, 8, 100_000)
    if not ctx.smoke and ctx.left_s() < 120:
        ctx.skip("grouped", f"{ctx.left_s():.0f} s left of the run's budget; the section needs ~60 s")
        return
    x, t, g = _data(ctx, n, d, n_groups)
    stats = GroupedLinearStats.from_tensors(x, t, g, n_groups, backend="triton")
    solution = stats.solve()
    for i in np.linspace(0, n_groups - 1, SAMPLE).astype(int).tolist():
        rows = g == i
        xs, ts = x[rows].double().cpu(), t[rows].double().cpu()
        xc, tc = xs - xs.mean(0), ts - ts.mean(0)
        w = torch.linalg.lstsq(xc, tc, rcond=1e-7, driver="gelsd").solution.t()
        ref = torch.cat([w[0], ts.mean(0) - w @ xs.mean(0)])
        got = torch.cat([solution.weight[i, 0], solution.bias[i]]).cpu()
        ctx.parity(f"grouped coef g{i}", got, ref, 1e-8, rows=int(rows.sum()))
    torch_moments = grouped_moments(x, t, g, n_groups, "torch")
    ctx.parity("grouped triton vs torch", torch.cat([v.reshape(-1).double() for v in stats._moments[1:]]),
               torch.cat([v.reshape(-1).double() for v in torch_moments[1:]]), 1e-10)
    data_bytes = n * (d + 1) * x.element_size() + n * g.element_size()
    info = dict(n_rows=n, in_features=d, out_features=1, n_groups=n_groups)
    ctx.time("grouped pass", lambda: grouped_moments(x, t, g, n_groups, "triton"), bytes=data_bytes,
             goal_frac_copy=0.5, **info)
    ctx.time("grouped solve", stats.solve, goal_ms=2.0, **info)
    ctx.time("grouped pass [torch]", lambda: grouped_moments(x, t, g, n_groups, "torch"), bytes=data_bytes, **info)
