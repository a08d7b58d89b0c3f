"""bench/gpu_step.py (the GPU check's "step" section) through the check's own ctx: smoke mode on the
CPU (the full section on a GPU), within its time limit, and its parity rows pass (bitwise where it
promises bitwise)."""

from conftest import DEVICE
from section_ctx import of, run_section

import gpu_step  # bench/ is on sys.path through section_ctx


def test_step_section_smoke():
    assert gpu_step.SECTION == "step" and gpu_step.ORDER > 50
    smoke = DEVICE.type != "cuda"
    rows = run_section(gpu_step, device=DEVICE, smoke=smoke, limit_s=60 if smoke else 300)
    parity = of(rows, measure="parity")
    assert len(parity) >= 8 and all(r["status"] == "pass" and r["error"] <= r["tol"] for r in parity), parity
    bitwise = [r for r in parity if r["name"].endswith("(bitwise)")]
    assert len(bitwise) >= 6 and all(r["tol"] == 0.0 and r["error"] == 0.0 for r in bitwise), bitwise
    for shape in (gpu_step.SMOKE_SHAPES if smoke else gpu_step.SHAPES):
        assert of(rows, name=f"{shape}: one launch vs float64 SGD", status="pass")
    if smoke:
        assert of(rows, name="host µs per call and steady-state steps", status="skip")
