"""bench/gpu_solver.py, the GPU check's solver section, in smoke mode on a stand-in context: it
must run in seconds through Triton's interpreter and its parity rows must pass."""

import sys
import time
from pathlib import Path

import pytest
from conftest import DEVICE

from linreg_fused.backend import select_ops

BENCH = Path(__file__).resolve().parents[1] / "bench"


class StandIn:
    """The section contract's ctx, recording rows in a list (bench/gpu_check.py builds the real one)."""

    def __init__(self, device):
        self.device, self.smoke, self.copy_gbps, self.rows = device, True, None, []

    def left_s(self):
        return 1e9

    def parity(self, name, got, ref, tol, **info):
        got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
        err = float((got - ref).norm() / ref.norm()) if float(ref.norm()) > 0 else float((got - ref).norm())
        ok = err <= tol  # NaN fails
        self.rows.append(dict(kind="parity", name=name, err=err, tol=tol, ok=ok, **info))
        return ok

    def time(self, name, fn, *, bytes=None, flops=None, **info):
        fn()
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        self.rows.append(dict(kind="time", name=name, ms=ms, bytes=bytes, **info))
        return ms

    def steady(self, name, step, *, n=100, bytes=None, **info):
        return self.time(name, step, bytes=bytes, **info)

    def record(self, name, **fields):
        self.rows.append(dict(kind="record", name=name, **fields))

    def skip(self, name, reason):
        self.rows.append(dict(kind="skip", name=name, reason=reason))


@pytest.mark.skipif(select_ops("auto", DEVICE).name != "triton", reason="needs the Triton backend")
def test_solver_section_smoke():
    sys.path.insert(0, str(BENCH))
    import gpu_solver

    assert gpu_solver.SECTION == "solver" and gpu_solver.ORDER > 50
    ctx = StandIn(DEVICE)
    start = time.perf_counter()
    gpu_solver.run(ctx)
    seconds = time.perf_counter() - start
    parity = [r for r in ctx.rows if r["kind"] == "parity"]
    failed = [r for r in parity if not r["ok"]]
    assert not failed, failed
    names = {r["name"] for r in ctx.rows}
    for shape in ("tall", "wide", "deep"):
        assert any(n.startswith(f"factor {shape} fp32") for n in names)
        assert any(n.startswith(f"factor pass {shape}") for n in names)
    assert sum(r["name"].startswith("nist ") for r in parity) == 22
    assert all(r["same_bits"] for r in ctx.rows if r["name"].endswith("bitwise rerun"))
    lre = [r for r in ctx.rows if r["name"].endswith(" LRE")]
    assert len(lre) == 22 and all(r["ok"] for r in lre), [r for r in lre if not r["ok"]]
    skipped = [r["name"] for r in ctx.rows if r["kind"] == "skip"]
    assert skipped == ["moments pass deep 128x300->4"], skipped  # the interpreter's moments kernel: minutes
    assert any(r["name"] == "solve 300 features from the statistics" for r in ctx.rows)
    assert seconds < 60, seconds
