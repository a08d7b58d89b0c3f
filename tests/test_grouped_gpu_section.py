"""bench/gpu_grouped.py, the GPU check's grouped section, run in smoke mode on the CPU through the
check's own ctx: it must finish within its time limit, record its timed rows, and its parity rows
must pass."""

from section_ctx import of, run_section

import gpu_grouped  # bench/ is on sys.path through section_ctx


def test_the_section_runs_in_smoke_mode_and_its_parity_passes():
    assert gpu_grouped.SECTION == "grouped" and gpu_grouped.ORDER > 50
    rows = run_section(gpu_grouped, limit_s=60)  # no error or fail row
    parity = of(rows, measure="parity")
    assert len(parity) == gpu_grouped.SAMPLE + 1, parity
    assert all(r["status"] == "pass" and r["error"] <= r["tol"] for r in parity), parity
    timed = {r["name"] for r in of(rows, measure="time", status="ok")}
    assert timed == {"grouped pass", "grouped solve", "grouped pass [torch]"}
    assert not of(rows, status="skip")
