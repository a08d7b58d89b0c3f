"""Run one of the GPU check's sections (bench/gpu_<topic>.py) in a test through the check's own ctx
(bench/check_ctx.py's Ctx and Recorder), so that a test reads the rows the check writes:

    rows = run_section(gpu_fit)                     # a smoke-mode Ctx on the CPU
    parity = of(rows, measure="parity")

run_section fails the test on any "error" row (an exception that ctx.guard caught, or a row a section
recorded as an error), on any "fail" row, and on a section that outlives its time limit; the
caller checks which rows are there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from check_ctx import Ctx, Recorder  # noqa: E402

CPU = torch.device("cpu")
SMOKE_LIMIT_S = 60.0  # a smoke section takes a few seconds on the interpreter; this is the alarm, not the aim


def section_ctx(section: str, *, device: torch.device = CPU, smoke: bool = True, budget_s: float = SMOKE_LIMIT_S) -> Ctx:
    """The ctx bench/gpu_check.py gives a section, with budget_s seconds of budget from now; its rows
    are in ctx.recorder.rows (nothing printed)."""
    now = time.monotonic()
    return Ctx(Recorder(now, echo=False), section, device=device, smoke=smoke, deadline=now + budget_s)


def run_section(module: ModuleType, *, device: torch.device = CPU, smoke: bool = True,
                limit_s: float = SMOKE_LIMIT_S, budget_s: float | None = None) -> list[dict[str, Any]]:
    """module.run(ctx) on a fresh section_ctx whose budget is budget_s (limit_s unless given: ctx.time
    and ctx.steady record skips once it is spent); the rows. Fails on an "error" or "fail" row and
    when the section ran longer than limit_s."""
    ctx = section_ctx(module.SECTION, device=device, smoke=smoke, budget_s=limit_s if budget_s is None else budget_s)
    start = time.monotonic()
    module.run(ctx)
    seconds = time.monotonic() - start
    rows = ctx.recorder.rows
    errors = of(rows, status="error")
    assert not errors, "error rows:\n" + "\n".join(f"{r['name']}: {r.get('traceback') or r.get('error')}" for r in errors)
    failed = of(rows, status="fail")
    assert not failed, "failed rows:\n" + "\n".join(f"{r['name']}: {r}" for r in failed)
    assert seconds < limit_s, f"section {module.SECTION!r} took {seconds:.1f} s (limit {limit_s:g} s)"
    assert rows and all(r["section"] == module.SECTION for r in rows), rows
    return rows


def of(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """The rows whose fields equal every value given, e.g. of(rows, measure="parity")."""
    return [r for r in rows if all(k in r and r[k] == v for k, v in match.items())]
