"""bench/gpu_fit.py (the GPU check's "fit" section) runs on the CPU in smoke mode through a stand-in
for the GPU check's ctx, and its float64 parity holds there (Triton's interpreter)."""

import sys
import time
from pathlib import Path

import torch
from oracle import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_fit  # noqa: E402


class StandInCtx:
    """The ctx interface of the GPU check's sections (see bench/gpu_fit.py), recording rows in a list."""

    def __init__(self):
        self.device, self.smoke, self.copy_gbps, self.rows = torch.device("cpu"), True, None, []

    def left_s(self):
        return 600.0

    def parity(self, name, got, ref, tol, **info):
        err = rel_err(got, ref)
        self.rows.append(dict(kind="parity", name=name, err=err, ok=err <= tol, **info))
        return err <= tol

    def time(self, name, fn, *, bytes=None, flops=None, **info):
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        self.rows.append(dict(kind="time", name=name, ms=ms, **info))
        return ms

    def steady(self, name, step, *, n=100, bytes=None, **info):
        return self.time(name, lambda: [step() for _ in range(n)], **info) / n

    def record(self, name, **fields):
        self.rows.append(dict(kind="record", name=name, **fields))

    def skip(self, name, reason):
        self.rows.append(dict(kind="skip", name=name, reason=reason))


def test_fit_section_smoke():
    ctx = StandInCtx()
    gpu_fit.run(ctx)
    assert gpu_fit.SECTION == "fit" and isinstance(gpu_fit.ORDER, int)
    parity = [r for r in ctx.rows if r["kind"] == "parity"]
    assert len(parity) == 2 and all(r["ok"] for r in parity), parity
    records = {r["name"]: r for r in ctx.rows if r["kind"] == "record"}
    for label in ("DataLoader order", "device shuffle"):
        assert records[f"tutorial fit per step, {label}"]["us_per_step"] > 0
        assert records[f"tutorial fit host per call, {label}"]["host_ms"] > 0
        for call in ("first", "repeat"):
            assert records[f"mini-batch fit per step, {call} call, {label}"]["us_per_step"] > 0
        assert records[f"mini-batch fit host per call, {label}"]["host_share_of_repeat_call"] > 0
    assert not [r for r in ctx.rows if r["kind"] == "skip"]
