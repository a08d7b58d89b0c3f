"""bench/gpu_solver.py, the GPU check's solver section, in smoke mode through the check's own ctx: it
must run within its time limit through Triton's interpreter and its parity rows must pass."""

import pytest
from conftest import DEVICE
from section_ctx import of, run_section

from linreg_fused.backend import select_ops

import gpu_solver  # bench/ is on sys.path through section_ctx


@pytest.mark.skipif(select_ops("auto", DEVICE).name != "triton", reason="needs the Triton backend")
def test_solver_section_smoke():
    assert gpu_solver.SECTION == "solver" and gpu_solver.ORDER > 50
    rows = run_section(gpu_solver, device=DEVICE, limit_s=60)  # smoke mode; no error or fail row
    parity = of(rows, measure="parity")
    # both the max and the norm of the error relative to the float64 reference within the tolerance
    bad = [r for r in parity
           if not (r["status"] == "pass" and r["error"] <= r["tol"] and r["norm_rel_error"] <= r["tol"])]
    assert not bad, bad
    names = {r["name"] for r in parity}
    timed = {r["name"] for r in of(rows, measure="time", status="ok")}
    for shape in ("tall", "wide", "deep"):
        assert any(n.startswith(f"factor {shape} fp32") for n in names)
        assert any(n.startswith(f"factor pass {shape}") for n in timed)
        rerun = of(rows, name=f"factor {shape} bitwise rerun")
        assert len(rerun) == 1 and rerun[0]["same_bits"] is True, rerun
    lre = [r for r in rows if r["name"].endswith(" LRE")]  # 11 datasets × fp64/fp32 data
    assert len(lre) == 22 and all(r["ok"] is True and r["lre"] >= r["goal_lre"] for r in lre), \
        [r for r in lre if not r["ok"]]
    # a parity row where digits can be asked for; where none can (Filip's and Wampler5's data rounded
    # to fp32 keep under one digit even for a float64 QR), the solver's warning instead
    hopeless = [r for r in lre if r["goal_lre"] <= 0]
    assert sorted(r["name"] for r in hopeless) == ["nist Filip fp32 data LRE", "nist Wampler5 fp32 data LRE"]
    assert all(r["warned"] is True and r["status"] == "pass" for r in hopeless), hopeless
    assert sorted(n for n in names if n.startswith("nist ")) == \
        sorted(r["name"][: -len(" LRE")] for r in lre if r["goal_lre"] > 0)
    skipped = [r["name"] for r in of(rows, status="skip")]
    assert skipped == ["moments pass deep 128x300->4"], skipped  # the interpreter's moments kernel: minutes
    assert "solve 300 features" in names and "solve 300 features from the statistics" in timed
