"""bench/gpu_grouped.py, the GPU check's grouped section, run in smoke mode on the CPU with a
stand-in for the GPU check's ctx: it must finish in seconds, record its rows, and its parity
rows must pass."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_grouped  # noqa: E402


class StandInCtx:
    """The section contract's ctx (bench/gpu_*.py): device, smoke, left_s, copy_gbps, parity, time, steady,
    record, skip; rows collected in a list."""

    def __init__(self):
        self.device, self.smoke, self.copy_gbps, self.rows = torch.device("cpu"), True, None, []

    def left_s(self):
        return 600.0

    def parity(self, name, got, ref, tol, **info):
        err = ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()
        self.rows.append(dict(kind="parity", name=name, err=err, ok=err <= tol, **info))
        return err <= tol

    def time(self, name, fn, *, bytes=None, flops=None, **info):
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        self.rows.append(dict(kind="time", name=name, ms=ms, bytes=bytes, **info))
        return ms

    def steady(self, name, step, *, n=100, bytes=None, **info):
        return self.time(name, lambda: [step() for _ in range(n)], bytes=bytes, **info)

    def record(self, name, **fields):
        self.rows.append(dict(kind="record", name=name, **fields))

    def skip(self, name, reason):
        self.rows.append(dict(kind="skip", name=name, reason=reason))


def test_the_section_runs_in_smoke_mode_and_its_parity_passes():
    ctx = StandInCtx()
    started = time.perf_counter()
    gpu_grouped.run(ctx)
    assert time.perf_counter() - started < 60
    assert gpu_grouped.SECTION == "grouped" and gpu_grouped.ORDER > 50
    parity = [r for r in ctx.rows if r["kind"] == "parity"]
    assert len(parity) == gpu_grouped.SAMPLE + 1 and all(r["ok"] for r in parity), parity
    timed = {r["name"] for r in ctx.rows if r["kind"] == "time"}
    assert timed == {"grouped pass", "grouped solve", "grouped pass [torch]"}
