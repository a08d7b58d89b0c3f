"""bench/gpu_kernels.py (the GPU check's "kernels" section) run on the CPU in smoke mode through the
check's own ctx (bench/check_ctx.py). Its parity must pass here and every timed row must be there."""

from __future__ import annotations

import pytest
import torch
from section_ctx import of, run_section

from linreg_fused.kernels.probe import interpreter_runs_runtime_loops

import gpu_kernels  # bench/ is on sys.path through section_ctx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not interpreter_runs_runtime_loops(),
                                reason="this Triton's interpreter cannot run loops with runtime bounds")

TALL = "tall fp32 70x16->4"


def test_kernels_section_smoke():
    assert gpu_kernels.SECTION == "kernels" and gpu_kernels.ORDER > 50
    rows = run_section(gpu_kernels)  # no error or fail row, within the time limit
    parity = of(rows, measure="parity")
    # tall: 3 against float64 + 2 against the default; inference: 3; wide bf16: 4 + 3 (tf32x3 and mma too).
    assert len(parity) == 15 and all(r["status"] == "pass" and r["error"] <= 2e-5 for r in parity), parity
    passed = {r["name"] for r in parity if r["status"] == "pass"}
    timed = {r["name"] for r in of(rows, measure="time", status="ok")}
    steady = {r["name"] for r in of(rows, measure="steady", status="ok")}
    for name in ("rows", "chunks", "default"):  # every formulation checked and timed on tall fp32
        assert f"grad {TALL} {name} vs float64" in passed
        assert f"grad {TALL} {name}" in timed and f"grad {TALL} {name} steady" in steady
        assert f"step {TALL} {name}" in timed and f"step {TALL} {name} steady" in steady
        assert f"forward inference-{TALL} {name} vs float64" in passed
        assert f"forward inference-{TALL} {name}" in timed and f"forward inference-{TALL} {name} steady" in steady
        bitwise = of(rows, name=f"grad {TALL} {name} bitwise run to run")
        assert len(bitwise) == 1 and bitwise[0]["status"] == "pass" and bitwise[0]["equal"] is True, bitwise
    assert f"grad {TALL} chunks vs default" in passed and f"grad {TALL} rows vs default" in passed
    assert "grad wide bf16 40x72->16 chunks vs float64" in passed
    assert of(rows, name="grad wide bf16 40x72->16 rows", status="skip")
    assert "step wide bf16 40x72->16 default tf32x3" in timed
    # bf16's tensor-core formulation (its interpreter twin here): checked against float64 and the default, timed.
    for check in ("vs float64", "vs default"):
        assert f"grad wide bf16 40x72->16 mma tf32x3 {check}" in passed
    assert "step wide bf16 40x72->16 mma tf32x3" in timed and "grad wide bf16 40x72->16 mma tf32x3 steady" in steady
    (exact,) = of(rows, name="grad mma exact splits 64x64->16 (X = I)")
    assert exact["status"] == "pass" and exact["residual_equal"] is True and exact["dw_equal"] is True, exact
    assert all(r.get("bytes", 0) > 0 for r in of(rows, measure="time") + of(rows, measure="steady"))


def test_kernels_section_stops_when_its_budget_is_spent(monkeypatch):
    monkeypatch.setattr(gpu_kernels, "GPU_REGIMES", (("tall", 70, 16, 4),))
    # smoke=False: the GPU plan's budget check, with no budget left, so none of it runs
    rows = run_section(gpu_kernels, smoke=False, budget_s=0.0)
    assert rows and all(r["status"] == "skip" for r in rows), rows
