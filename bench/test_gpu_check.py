"""Tests of the GPU check's machinery on the CPU: the ctx that sections get (parity verdicts, the
steady loop's one synchronize per round, timing rows), the targets, the discovery of sections,
a run of stub sections (a failing and an overrunning one isolated, child processes, the commit
printed first), and the whole CPU smoke run of every real section (bench/gpu_check.py
--cpu-smoke), which CI runs here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from check_ctx import Ctx, Recorder
from check_sections import discover, share_s
from targets import annotate

BENCH = Path(__file__).resolve().parent
CPU = torch.device("cpu")


def make_ctx(deadline_s: float = 60.0, **kwargs) -> Ctx:
    return Ctx(Recorder(time.monotonic(), echo=False), "test", device=CPU, smoke=False,
               deadline=time.monotonic() + deadline_s, **kwargs)


# ------------------------------------------------------------------ ctx
def test_parity_passes_within_tolerance_and_fails_beyond_it():
    ctx = make_ctx()
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert ctx.parity("close", torch.tensor([1.0, -2.0, 4.0 + 4e-6]), ref, 1e-5)
    assert not ctx.parity("off", torch.tensor([1.0, -2.0, 4.4]), ref, 1e-5)
    assert not ctx.parity("nan", torch.tensor([1.0, float("nan"), 4.0]), ref, 1.0)
    assert not ctx.parity("shape", torch.ones(2), ref, 1.0)
    close, off, nan, shape = ctx.recorder.rows
    assert [r["status"] for r in ctx.recorder.rows] == ["pass", "fail", "fail", "fail"]
    assert off["error"] == pytest.approx(0.4 / 4.0)  # max |got - ref| over max |ref|
    assert off["norm_rel_error"] == pytest.approx(0.4 / math.sqrt(21.0))
    assert close["error"] == pytest.approx((float(torch.tensor(4.0 + 4e-6)) - 4.0) / 4.0)  # got is fp32
    assert math.isnan(nan["error"]) and "shape_mismatch" in shape


def test_steady_loop_synchronizes_once_per_round_after_n_back_to_back_calls():
    events: list[str] = []
    ctx = make_ctx(sync=lambda: events.append("sync"))
    ms = ctx.steady("loop", lambda: events.append("step"), n=7, rounds=2, warmup=1, steps=4, bytes=8e6)
    assert events == ["step", "sync"] + (["step"] * 7 + ["sync"]) * 2
    row = ctx.recorder.rows[-1]
    assert row["measure"] == "steady" and row["view"] == "steady" and row["n"] == 7 and row["rounds"] == 2
    assert row["ms"] == ms and row["ms_per_step"] == pytest.approx(ms / 4) and len(row["ms_rounds"]) == 2
    assert row["gbps"] == pytest.approx(8e6 / (ms * 1e-3) / 1e9)


def test_time_records_bandwidth_against_the_copy_ceiling_and_flops():
    calls = []

    def bench(fn, device, rep_ms):
        calls.append(rep_ms)
        fn()
        return 2.0

    ctx = make_ctx(bench=bench, ceilings={"copy_gbps": 4000.0})
    assert ctx.time("t", lambda: None, bytes=4e9, flops=1e12, steps=4, rep_ms=300, regime="r") == 2.0
    row = ctx.recorder.rows[-1]
    assert calls == [300] and row["status"] == "ok" and row["view"] == "cold" and row["regime"] == "r"
    assert row["gbps"] == pytest.approx(2000.0) and row["frac_copy"] == pytest.approx(0.5)
    assert row["ms_per_step"] == pytest.approx(0.5) and row["tflops"] == pytest.approx(500.0)


def test_smoke_ctx_has_no_copy_ceiling_and_a_spent_budget_skips():
    ctx = Ctx(Recorder(time.monotonic(), echo=False), "s", device=CPU, smoke=True, deadline=time.monotonic() - 1,
              ceilings={"copy_gbps": 5.0})
    assert ctx.copy_gbps is None and ctx.left_s() < 0
    assert math.isnan(ctx.time("late", lambda: pytest.fail("ran past the budget")))
    assert math.isnan(ctx.steady("late too", lambda: pytest.fail("ran past the budget")))
    assert [r["status"] for r in ctx.recorder.rows] == ["skip", "skip"]


def test_guard_turns_an_exception_into_an_error_row_and_flags_a_broken_cuda_context():
    ctx = make_ctx()
    with ctx.guard("raises", regime="r"):
        raise ValueError("boom")
    with ctx.guard("cuda"):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    first, second = ctx.recorder.rows
    assert first["status"] == "error" and "boom" in first["error"] and first["regime"] == "r"
    assert second["status"] == "error" and ctx.recorder.cuda_broken.startswith("RuntimeError: CUDA error")


def test_budget_share_is_proportional_only_when_the_budgets_exceed_the_time_left():
    assert share_s(30, 100, 200) == 30
    assert share_s(30, 120, 60) == pytest.approx(15)
    assert share_s(30, 120, -5) == 0


# ------------------------------------------------------------------ targets
def _timed(**fields):
    return {"measure": "time", "view": "cold", "status": "ok", **fields}


def test_targets_use_the_roof_measured_in_the_run():
    step = dict(section="regimes", regime_kind="step", batch=None, family="fused", precision="auto")
    wide = _timed(**step, regime="wide", peer="fused", dtype="fp32", resolved_precision="ieee",
                  bytes_per_step=1.14e9, flops_per_step=1.72e10, ms_per_step=1.0)
    tall = _timed(**step, regime="tall", peer="fused", dtype="fp32", resolved_precision="ieee",
                  bytes_per_step=1.14e9, flops_per_step=4.3e9, ms_per_step=0.3)
    bf16 = _timed(**step, regime="tall bf16", peer="fused", dtype="bf16", resolved_precision="tf32x3",
                  bytes_per_step=0.57e9, flops_per_step=4.3e9, ms_per_step=0.3)
    rows = [wide, tall, bf16]
    out = annotate(rows, {"copy_gbps": 4000.0, "sgemm_tflops": 50.0})
    assert len(out) == 3
    # wide IEEE fp32: the FMA floor (1.72e10 / 50e12 = 0.344 ms) is above the copy floor (0.285 ms)
    assert wide["target"]["roof_ms"] == pytest.approx(0.344) and wide["target"]["pass"] is False
    assert tall["target"]["value"] == pytest.approx(0.285 / 0.3) and tall["target"]["pass"] is True
    assert bf16["target"]["roof_ms"] == pytest.approx(0.1425) and bf16["target"]["pass"] is False
    smoke = annotate([dict(tall)], {"copy_gbps": 4000.0, "sgemm_tflops": 50.0}, claims=False)
    assert smoke[0]["pass"] is None and smoke[0]["value"] == pytest.approx(0.285 / 0.3)
    no_sgemm = annotate([dict(tall)], {"copy_gbps": 4000.0})  # IEEE fp32 needs the SGEMM rate of the run
    assert no_sgemm[0]["pass"] is None and no_sgemm[0]["value"] is None


def test_targets_against_peers_in_the_same_run_and_view():
    inf = dict(section="inference", regime="w")
    lin = [_timed(**inf, peer="nn.Linear", family="nn.Linear", ms_per_step=0.50),
           _timed(**inf, peer="nn.Linear (again)", family="nn.Linear", ms_per_step=0.52)]
    gemm = _timed(**inf, peer="fused-forward", family="fused-forward", route="GEMM", ms_per_step=0.51)
    kernel = _timed(**inf, peer="fused-forward", family="fused-forward", route="kernel", ms_per_step=0.4,
                    frac_copy=0.6, view="steady")
    lin_steady = [dict(r, view="steady") for r in lin]
    mb = dict(section="regimes", regime="minibatch-fit", regime_name="minibatch-fit")
    graphed = _timed(**mb, peer="eager-cudagraph", family="graph", ms_per_step=0.040)
    fit = _timed(**mb, peer="fused-fit", family="fused-fit", ms_per_step=0.008)
    st = dict(section="statistics", regime="s")
    one_pass = _timed(**st, peer="one fused pass (train_step)", ms_per_step=1.0)
    epochs = _timed(**st, peer="fit(statistics=True) 100 epochs", ms_per_step=1.4)
    stream = _timed(**st, peer="stream from pinned host tensors", gbps=40.0)
    host = [{"section": "host", "measure": "record", "regime": "t", "peer": "eager step", "host_us": 100.0},
            {"section": "host", "measure": "record", "regime": "t", "peer": "train_step", "fused": True, "host_us": 20.0}]
    rows = [*lin, gemm, *lin_steady, kernel, graphed, fit, one_pass, epochs, stream, *host]
    annotate(rows, {"copy_gbps": 4000.0, "h2d_gbps": 55.0})
    assert gemm["target"]["pass"] is True  # 0.51 ms is within nn.Linear's two times (0.50, 0.52)
    assert kernel["target"]["value"] == pytest.approx(1.3) and kernel["target"]["pass"] is False  # 60 % of copy
    assert fit["target"]["value"] == pytest.approx(8.0) and fit["target"]["vs_graphed"] == pytest.approx(5.0)
    assert fit["target"]["pass"] is True
    assert epochs["target"]["value"] == pytest.approx(1.4) and epochs["target"]["pass"] is True
    assert stream["target"]["value"] == pytest.approx(40 / 55) and stream["target"]["pass"] is False
    assert host[1]["target"]["value"] == pytest.approx(0.2) and host[1]["target"]["pass"] is False
    assert "target" not in host[0] and "target" not in one_pass


# ------------------------------------------------------------------ discovery and the runner, with stubs
STUBS = {
    "gpu_zeta.py": '''
        SECTION, ORDER = "zeta", 70
        def run(ctx):
            ctx.record("zeta ran", value=1)
    ''',
    "gpu_alpha.py": '''
        SECTION, ORDER = "alpha", 60
        def run(ctx):
            ctx.record("alpha before the error")
            raise RuntimeError("alpha fails")
    ''',
    "gpu_slow.py": '''
        import time
        SECTION, ORDER, BUDGET_S = "slow", 65, 0.5
        def run(ctx):
            ctx.record("slow started")
            while True:  # ignores ctx.left_s(): the runner must stop it
                time.sleep(0.05)
    ''',
    "gpu_check_a.py": '''
        import torch
        SECTION, ORDER, SHARDS = "checks", 10, 2
        def run(ctx):
            i, k = ctx.shard
            ctx.parity(f"shard {i} of {k}", torch.ones(3), torch.ones(3, dtype=torch.float64), 1e-6)
    ''',
    "gpu_cuda.py": '''
        SECTION, ORDER = "cuda", 62
        def run(ctx):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")  # breaks the context
    ''',
    "gpu_broken.py": '''
        SECTION, ORDER = "broken", 20
        def run(ctx):
            raise RuntimeError("the parallel phase isolates this too")
    ''',
    "gpu_helpers.py": '''
        VALUE = 3  # not a section: no SECTION, ORDER or run
    ''',
    "gpu_bad_import.py": '''
        import a_module_that_does_not_exist
    ''',
    "gpu_check.py": '''
        raise SystemExit("the runner is never imported as a section")
    ''',
}


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    folder = tmp_path / "sections"
    folder.mkdir()
    for name, text in STUBS.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_discover_finds_sections_in_order_and_reports_the_rest(stubs: Path):
    sections, problems = discover(stubs)
    assert [s.name for s in sections] == ["checks", "broken", "alpha", "cuda", "slow", "zeta"]
    assert [s.phase for s in sections] == ["parallel", "parallel", "timing", "timing", "timing", "timing"]
    assert sections[0].shards == 2 and sections[4].budget_s == 0.5
    assert sorted(p["module"] for p in problems) == ["gpu_bad_import", "gpu_helpers"]
    assert "ModuleNotFoundError" in next(p["error"] for p in problems if p["module"] == "gpu_bad_import")


def test_runner_isolates_failing_overrunning_and_context_breaking_sections(stubs: Path, tmp_path: Path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), str(out), "--cpu-smoke", "--jobs", "2",
                           "--sections-dir", str(stubs), "--commit", "0123abc", "--grace-s", "0.5"],
                          capture_output=True, text=True, timeout=240)
    assert done.stdout.splitlines()[0].startswith("gpu_check: commit "), done.stdout[:500]
    assert "given 0123abc" in done.stdout.splitlines()[0]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # errors were recorded
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["finished"] and doc["meta"]["commit_given"] == "0123abc"
    status = {s["module"]: s["status"] for s in doc["sections"]}
    assert status == {"gpu_check_a:run:0/2": "ok", "gpu_check_a:run:1/2": "ok", "gpu_broken:run": "error",
                      "gpu_alpha": "error", "gpu_cuda": "error", "gpu_slow": "timeout", "gpu_zeta": "ok"}
    # after the broken context, the run went on in a fresh process, keeping what came before
    assert doc["meta"]["restarts"] == 1 and done.stdout.count("gpu_check: commit ") == 2
    assert "resumed in a fresh process" in (out / "gpu_check.log").read_text()
    names = [(r["section"], r["name"], r["status"]) for r in doc["rows"]]
    assert ("checks", "shard 0 of 2", "pass") in names and ("checks", "shard 1 of 2", "pass") in names
    assert ("alpha", "alpha before the error", "info") in names and ("alpha", "(section)", "error") in names
    assert ("slow", "slow started", "info") in names and ("zeta", "zeta ran", "info") in names
    assert ("gpu_bad_import", "(import)", "error") in names
    assert [n for n in names if n[0] == "broken"][-1][2] == "error"
    assert doc["meta"]["ceilings"]["copy_gbps"] > 0  # measured in the same run
    assert "=== summary" in done.stdout and done.stdout.index("=== summary") > done.stdout.index("zeta ran")


# ------------------------------------------------------------------ the whole CPU smoke run
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("smoke")
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), str(out), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=600)
    return done, json.loads((out / "gpu_check.json").read_text())


def test_cpu_smoke_run_passes_every_section(smoke_run):
    done, doc = smoke_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.startswith("gpu_check: commit ")
    modules = {s["module"].split(":")[0] for s in doc["sections"]}
    assert {"gpu_parity", "gpu_torch", "gpu_regimes", "gpu_inference", "gpu_host", "gpu_statistics",
            "gpu_recheck", "gpu_pytest"} <= modules
    assert all(s["status"] == "ok" for s in doc["sections"]), doc["sections"]
    from parity import parity_checks

    parity = [r for r in doc["rows"] if r["section"] == "parity"]
    assert len(parity) == len(parity_checks(True, CPU)) and all(r["status"] == "pass" for r in parity)


def test_cpu_smoke_run_times_every_peer_in_both_views(smoke_run):
    _, doc = smoke_run
    timed = [r for r in doc["rows"] if r["section"] in ("regimes", "inference") and r["measure"] in ("time", "steady")]
    views: dict[tuple, set] = {}
    for r in timed:
        views.setdefault((r["regime"], r["peer"]), set()).add(r["view"])
    assert len(views) >= 20 and all(v == {"cold", "steady"} for v in views.values()), views
    host = [r for r in doc["rows"] if r["section"] == "host" and r.get("fused")]
    assert host and all(r["launches_per_call"] >= 1 for r in host)  # Triton launches counted
    assert any(t["section"] == "statistics" for t in doc["targets"])
    assert all(t["pass"] is None for t in doc["targets"])  # no claims from the CPU


def test_report_reads_both_views_and_the_targets(smoke_run, tmp_path: Path):
    import report

    _, doc = smoke_run
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(doc))
    rows, machine = report.load_rows(path)
    assert machine["cpu"] and {r.view for r in rows} == {"cold", "steady"}
    for r in rows:  # speedups compare like views (the statistics rows have no baseline)
        base = next((b for b in rows if b.group == r.group and b.view == r.view and b.baseline), None)
        assert r.speedup == (None if base is None else pytest.approx(base.time_per_step / r.time_per_step))
    assert sum(r.speedup is not None for r in rows) >= 40
    text = report.markdown(rows, machine, path)
    assert "| steady |" in text and "n/a: " in text  # targets shown, not judged on the CPU
