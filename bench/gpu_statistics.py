"""GPU check section: the statistics path (linreg_fused.stats), never timed on a card before.

Per statistics regime of bench/regimes.py (tall / wide / deep, fp32 and bf16), checked first:
the least-squares solution from the statistics against float64 normal equations, and
fit(statistics=True) against a pass per epoch from the same start. Then, both views:

  the LinearStats pass (GB/s, % of copy), solve from the statistics, model.solve(x, t);
  one fused pass (a full-batch train_step) and fit(statistics=True) over 100 epochs: the
  target is 100 epochs <= 1.5x one pass (bench/targets.py); fit(statistics=False) for scale.

Out of core (GPU; fp32 tall and wide): LinearStats.from_arrays on NumPy arrays in ordinary host
memory, and from_batches on pinned host tensors, against the pinned host-to-device bandwidth
measured in the same run (target >= 80 %); each streamed result checked against the in-memory one.
"""

from __future__ import annotations

from typing import Any

import torch

from check_ctx import Ctx
from harness import make_data
from regimes import BF16, STATS_REGIMES, Regime

SECTION = "statistics"
ORDER = 75
BUDGET_S = 35.0
STREAM_CHUNK_ROWS = 1 << 20
REGIME_NEED_S = 4.0


def least_squares64(x: torch.Tensor, t: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """[W b] (O, D + 1) from float64 normal equations over row chunks (well-conditioned random data)."""
    d = x.shape[1]
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=x.device)
    cross = torch.zeros(d + 1, t.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        z = torch.cat([x[s:s + chunk].double(), torch.ones(min(chunk, x.shape[0] - s), 1, dtype=torch.float64,
                                                           device=x.device)], 1)
        gram += z.t() @ z
        cross += z.t() @ t[s:s + chunk].double()
    return torch.linalg.solve(gram, cross).t()


def regime_fields(regime: Regime) -> dict[str, Any]:
    return dict(regime=regime.group, regime_name=regime.name, regime_kind="statistics", dtype=regime.dtype_name,
                shape=regime.shape, bytes_per_step=regime.bytes_per_step)


def one_regime(ctx: Ctx, regime: Regime) -> None:
    from linreg_fused import FusedLinearRegressor, FusedSGD, LinearStats

    data = make_data(regime, ctx.device, n_sets=1)
    x, t, w0, b0 = data.x, data.t, data.w0, data.b0
    fields = regime_fields(regime)
    group, n_bytes, epochs = regime.group, regime.bytes_per_step, regime.epochs
    tol = 1e-3 if regime.dtype == BF16 else 1e-4  # as bench/test_bench_stats.py

    stats = LinearStats.from_tensors(x, t)
    w, b = stats.solve()
    ctx.parity(f"{group} :: solve vs float64 least squares", torch.cat([w, b[:, None]], 1), least_squares64(x, t), 1e-4,
               **fields)
    models = [FusedLinearRegressor(regime.in_features, regime.out_features, device=ctx.device) for _ in range(4)]
    opts = [FusedSGD(m.parameters(), lr=regime.lr) for m in models]

    def reset(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)

    for m in models[:2]:
        reset(m)
    kwargs = dict(epochs=epochs, progress=False, check_finite=False)
    models[0].fit(x, t, optimizer=opts[0], statistics=True, **kwargs)
    models[1].fit(x, t, optimizer=opts[1], statistics=False, **kwargs)
    ctx.parity(f"{group} :: fit(statistics=True) vs a pass per epoch, weights after {epochs} epochs",
               models[0].weight, models[1].weight.double(), tol, **fields)

    def timed(peer: str, fn, n: int, with_bytes: bool = True) -> None:
        info = {**fields, "peer": peer}
        ctx.time(f"{group} :: {peer} [cold]", fn, bytes=n_bytes if with_bytes else None, **info)
        ctx.steady(f"{group} :: {peer} [steady]", fn, n=n, bytes=n_bytes if with_bytes else None, **info)

    timed("LinearStats pass", lambda: LinearStats.from_tensors(x, t), 20)
    timed("solve (from the statistics)", stats.solve, 20, with_bytes=False)
    timed("model.solve(x, t)", lambda: models[2].solve(x, t), 10)
    timed("one fused pass (train_step)", lambda: models[3].train_step(x, t, opts[3]), 20)
    timed(f"fit(statistics=True) {epochs} epochs",
          lambda: models[0].fit(x, t, optimizer=opts[0], statistics=True, **kwargs), 1, with_bytes=False)
    if ctx.left_s() > 10:
        ctx.time(f"{group} :: fit(statistics=False) {epochs} epochs [cold]",
                 lambda: models[1].fit(x, t, optimizer=opts[1], statistics=False, **kwargs),
                 peer=f"fit(statistics=False) {epochs} epochs", **fields)


def stream(ctx: Ctx, regime: Regime) -> None:
    """Statistics of host data streamed to the device, against the pinned host-to-device link."""
    from linreg_fused import LinearStats

    data = make_data(regime, ctx.device, n_sets=1)
    fields = regime_fields(regime)
    whole = LinearStats.from_tensors(data.x, data.t)
    x_np, t_np = data.x.cpu().numpy(), data.t.cpu().numpy()
    x_pin, t_pin = data.x.cpu().pin_memory(), data.t.cpu().pin_memory()
    del data
    sources = {
        "stream from NumPy arrays (pageable)": lambda: LinearStats.from_arrays(
            x_np, t_np, chunk_rows=STREAM_CHUNK_ROWS, device=ctx.device),
        "stream from pinned host tensors": lambda: LinearStats.from_batches(
            zip(x_pin.split(STREAM_CHUNK_ROWS), t_pin.split(STREAM_CHUNK_ROWS)), device=ctx.device),
    }
    for peer, fn in sources.items():
        with ctx.guard(f"{regime.group} :: {peer}"):
            ctx.parity(f"{regime.group} :: {peer}: M_xx vs in memory", fn().m_xx, whole.m_xx, 1e-5, peer=peer, **fields)
            ctx.steady(f"{regime.group} :: {peer} [steady]", fn, n=1, bytes=regime.bytes_per_step, peer=peer, **fields)


def run(ctx: Ctx) -> None:
    on_gpu = ctx.device.type == "cuda"
    regimes = [r for r in STATS_REGIMES if r.gpu == on_gpu]
    for regime in regimes:
        if ctx.left_s() < REGIME_NEED_S:
            ctx.skip(regime.group, f"time budget ({ctx.left_s():.0f} s left)")
            continue
        with ctx.guard(regime.group, **regime_fields(regime)):
            one_regime(ctx, regime)
        if on_gpu:
            torch.cuda.empty_cache()
    for regime in [r for r in regimes if r.dtype != BF16 and r.name in ("stats-tall", "stats-wide")]:
        if ctx.left_s() < REGIME_NEED_S:
            ctx.skip(f"{regime.group} :: stream", f"time budget ({ctx.left_s():.0f} s left)")
            continue
        with ctx.guard(f"{regime.group} :: stream", **regime_fields(regime)):
            stream(ctx, regime)
    if not on_gpu:
        ctx.skip("stream from host memory", "timed against the pinned host-to-device link: needs CUDA")
