"""bench/gpu_step.py (the GPU check's "step" section) in its smoke mode, with a stand-in for the
GPU check's ctx: it runs, and its parity rows pass (bitwise where it promises bitwise)."""

import sys
from pathlib import Path

import torch
from conftest import DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_step  # noqa: E402


class StandInCtx:
    """The ctx interface of the GPU check's sections (see bench/gpu_check.py), recording rows."""

    def __init__(self):
        self.device, self.smoke, self.copy_gbps = DEVICE, not torch.cuda.is_available(), None
        self.rows = []

    def left_s(self):
        return 600.0

    def parity(self, name, got, ref, tol, **info):
        got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
        err = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        self.rows.append(dict(name=name, kind="parity", err=err, tol=tol, ok=err <= tol, **info))
        return err <= tol

    def time(self, name, fn, *, bytes=None, flops=None, **info):
        fn()
        self.rows.append(dict(name=name, kind="time", **info))
        return 0.0

    def steady(self, name, step, *, n=100, bytes=None, **info):
        for _ in range(2):
            step()
        self.rows.append(dict(name=name, kind="steady", **info))
        return 0.0

    def record(self, name, **fields):
        self.rows.append(dict(name=name, kind="record", **fields))

    def skip(self, name, reason):
        self.rows.append(dict(name=name, kind="skip", reason=reason))


def test_step_section_smoke():
    ctx = StandInCtx()
    assert gpu_step.SECTION == "step" and gpu_step.ORDER > 50
    gpu_step.run(ctx)
    parity = [r for r in ctx.rows if r["kind"] == "parity"]
    assert len(parity) >= 8
    bad = [r for r in parity if not r["ok"]]
    assert not bad, bad
