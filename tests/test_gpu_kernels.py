"""bench/gpu_kernels.py (the GPU check's "kernels" section) run on the CPU in smoke mode, through a
stand-in for the check's ctx (only the interface the section contract gives: device, smoke,
left_s, copy_gbps, parity, time, steady, record, skip). Its parity must pass here."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch

from linreg_fused.kernels.probe import interpreter_runs_runtime_loops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not interpreter_runs_runtime_loops(),
                                reason="this Triton's interpreter cannot run loops with runtime bounds")


class StandInCtx:
    def __init__(self, device: torch.device, budget_s: float = 600.0) -> None:
        self.device, self.smoke, self.copy_gbps = device, True, None
        self.deadline = time.monotonic() + budget_s
        self.rows: list[dict] = []

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def parity(self, name, got, ref, tol, **info) -> bool:
        got, ref = torch.as_tensor(got).double().cpu(), torch.as_tensor(ref).double().cpu()
        err = float((got - ref).abs().max() / ref.abs().max()) if got.shape == ref.shape else math.nan
        self.rows.append(dict(name=name, measure="parity", status="pass" if err <= tol else "fail", error=err, **info))
        return err <= tol

    def time(self, name, fn, *, bytes=None, flops=None, **info) -> float:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        self.rows.append(dict(name=name, measure="time", status="ok", ms=ms, bytes=bytes, **info))
        return ms

    def steady(self, name, step, *, n=100, bytes=None, **info) -> float:
        t0 = time.perf_counter()
        for _ in range(min(n, 2)):
            step()
        ms = (time.perf_counter() - t0) * 1e3 / min(n, 2)
        self.rows.append(dict(name=name, measure="steady", status="ok", ms=ms, bytes=bytes, **info))
        return ms

    def record(self, name, **fields) -> dict:
        row = dict(name=name, measure="record", status=fields.pop("status", "info"), **fields)
        self.rows.append(row)
        return row

    def skip(self, name, reason) -> None:
        self.rows.append(dict(name=name, measure="skip", status="skip", reason=reason))


def test_kernels_section_smoke():
    ctx = StandInCtx(torch.device("cpu"))
    gpu_kernels.run(ctx)
    assert gpu_kernels.SECTION == "kernels" and gpu_kernels.ORDER > 50
    parity = [r for r in ctx.rows if r["measure"] == "parity"]
    failed = [r for r in ctx.rows if r["status"] in ("fail", "error")]
    assert not failed, failed
    named = {r["name"] for r in ctx.rows}
    for name in ("rows", "chunks", "default"):  # every formulation checked and timed on tall fp32
        assert f"grad tall fp32 70x16->4 {name} vs float64" in named
        assert f"grad tall fp32 70x16->4 {name}" in named and f"step tall fp32 70x16->4 {name} steady" in named
    assert "grad tall fp32 70x16->4 chunks vs default" in named
    assert "grad wide bf16 40x72->16 chunks vs float64" in named
    assert any(r["name"] == "grad wide bf16 40x72->16 rows" and r["status"] == "skip" for r in ctx.rows)
    assert "forward inference-tall fp32 70x16->4 rows vs float64" in named
    # tall: 3 against float64 + 2 against the default; inference: 3; wide bf16: 3 + 2 (tf32x3 too).
    assert all(r["error"] <= 2e-5 for r in parity) and len(parity) == 13
    assert "step wide bf16 40x72->16 default tf32x3" in named
    assert all(r["bytes"] > 0 for r in ctx.rows if r["measure"] in ("time", "steady"))


def test_kernels_section_stops_when_its_budget_is_spent():
    ctx = StandInCtx(torch.device("cpu"), budget_s=0.0)
    ctx.smoke = False  # the GPU plan's budget check, without running any of it
    gpu_kernels.GPU_REGIMES, saved = (), gpu_kernels.GPU_REGIMES
    try:
        gpu_kernels.GPU_REGIMES = (("tall", 70, 16, 4),)
        gpu_kernels.run(ctx)
    finally:
        gpu_kernels.GPU_REGIMES = saved
    assert ctx.rows and all(r["status"] == "skip" for r in ctx.rows)
