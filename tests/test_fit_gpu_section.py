"""bench/gpu_fit.py (the GPU check's "fit" section) runs on the CPU in smoke mode through the check's
own ctx, within its time limit, and its float64 parity holds there (Triton's interpreter)."""

from section_ctx import of, run_section

import gpu_fit  # bench/ is on sys.path through section_ctx


def test_fit_section_smoke():
    assert gpu_fit.SECTION == "fit" and isinstance(gpu_fit.ORDER, int)
    rows = run_section(gpu_fit)  # no error or fail row, within the time limit
    parity = of(rows, measure="parity")
    assert len(parity) == 2, parity
    # both the max and the norm of the error relative to the float64 loop within the tolerance
    assert all(r["status"] == "pass" and r["error"] <= r["tol"] and r["norm_rel_error"] <= r["tol"] for r in parity), parity
    records = {r["name"]: r for r in of(rows, measure="record", status="info")}
    for label in ("DataLoader order", "device shuffle"):
        assert records[f"tutorial fit per step, {label}"]["us_per_step"] > 0
        assert records[f"tutorial fit host per call, {label}"]["host_ms"] > 0
        for call in ("first", "repeat"):
            assert records[f"mini-batch fit per step, {call} call, {label}"]["us_per_step"] > 0
        assert records[f"mini-batch fit host per call, {label}"]["host_share_of_repeat_call"] > 0
    assert not of(rows, status="skip")
