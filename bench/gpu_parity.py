"""GPU check section: the parity checks of bench/parity.py (linreg-fused's kernels against
float64 on fresh random inputs, freed GPU memory NaN-filled before each check), in SHARDS child
processes of the parallel phase (each its own CUDA context, each compiling its share), before
any timing."""

from __future__ import annotations

from check_ctx import Ctx, run_checks
from parity import parity_checks, poison_allocator

SECTION = "parity"
ORDER = 10
BUDGET_S = 60.0  # cold: ~45 Triton specializations at 0.6-3.7 s each, spread over the shards
SHARDS = 3


def run(ctx: Ctx) -> None:
    i, k = ctx.shard
    checks = parity_checks(ctx.smoke, ctx.device)
    run_checks(ctx, checks[i::k], before=lambda: poison_allocator(ctx.device))
