"""What the interpreter cannot show, checked by compiling for an H100/H200 (sm_90) on the CPU.

bench/compile_report.py plans every launch of the benchmark regimes with the
launch helpers' own plan_* functions (so exactly the blocks, warps and stages
a GPU would get), compiles each with Triton for sm_90 and reads the cubin.
It runs once per session, in a subprocess without TRITON_INTERPRET (the
compiler needs Triton's GPU frontend, which the interpreter replaces). These
tests then fail when a hot launch (fp32/bf16) exceeds shared memory, spills,
runs an "ieee" product on tf32 tensor cores, runs a tf32/tf32x3 product
without them, or keeps too few bytes in flight for a memory-bound regime,
and when a float argument would reach the GPU as fp32.

Cost, measured with a cold cache: 35 specializations, ~55 s of CPU in all
(two compile processes, so about half that in wall time on two idle cores;
184 s on two cores shared at load average ~9). Triton's cache makes a rerun
take seconds.
Skipped, with the reason, where Triton's NVIDIA compiler tools are absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "compile_report.py"
# The hot launches, less tf32x3 where O < 16. (bf16's default precision is tf32x3: its deep launch
# spills 32 B/thread with Triton 3.9, not 3.6; kernels/measured.py, docs/kernels.md. The mma
# formulation, tests/test_compile_formulations.py, is what would replace it.)
SELECTION = r"^(?!(tall|deep|minibatch|inference-tall|inference-deep) \S+ \S+ tf32x3)"


def _tools_missing() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return "Triton is not installed"
    bin_dir = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin"
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (bin_dir / tool).exists()]
    return f"Triton's NVIDIA compiler tools are absent ({', '.join(missing)} not in {bin_dir})" if missing else None


pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The default kernels (the rows and chunks formulations: tests/test_compile_formulations.py).
    cmd = [sys.executable, str(REPORT), "--arch", "90", "--hot", "--default-only", "--only", SELECTION, "--jobs", "2",
           "--warm-cache", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if not out.exists():
        pytest.fail(f"compile report failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    rows = json.loads(out.read_text())["rows"]
    assert rows, "the report compiled nothing"
    return rows


def _where(row: dict) -> str:
    return f"{row['regime']} {row['kernel']} {row['dtype']} {row['precision']} ({row['blocks']})"


def test_every_regime_and_kernel_is_compiled(rows):
    kernels = {(r["regime"], r["kernel"]) for r in rows}
    for regime in ("minibatch", "tall", "wide", "deep"):
        assert {(regime, "grad"), (regime, "update")} <= kernels, regime
    for regime in ("inference-tall", "inference-wide", "inference-deep"):
        assert (regime, "forward") in kernels
    assert ("tutorial", "fit") in kernels
    assert {r["precision"] for r in rows if r["kernel"] == "grad"} == {"ieee", "tf32", "tf32x3"}
    assert {r["dtype"] for r in rows if r["kernel"] == "grad"} == {"fp32", "bf16"}


def test_launches_fit_shared_memory(rows):
    over = [f"{_where(r)}: {r['shared']} B > {r['shared_limit']} B" for r in rows if r["shared"] > r["shared_limit"]]
    assert not over, "launches that raise OutOfResources on an H100/H200:\n" + "\n".join(over)
    assert all(r["fit_per_sm"] >= 1 for r in rows)


def test_hot_launches_do_not_spill(rows):
    spills = [f"{_where(r)}: {r['spill']} B/thread, {r['regs']} registers" for r in rows if r["hot"] and r["spill"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_ieee_launches_have_no_tf32_mma(rows):
    tf32 = [_where(r) for r in rows if r["precision"] == "ieee" and r["mma_tf32"]]
    assert not tf32, "IEEE launches that run tf32 tensor cores:\n" + "\n".join(tf32)


def test_tensor_core_launches_use_tf32_mma(rows):
    tensor = [r for r in rows if r["tensor_core"]]
    assert tensor, "no tf32/tf32x3 launch was compiled"
    without = [_where(r) for r in tensor if not r["mma_tf32"]]
    assert not without, "tf32/tf32x3 launches without tf32 MMA:\n" + "\n".join(without)


def test_fma_probe_stays_fma(rows):
    """All three block dims >= 16: the broadcast product must not become a dot."""
    probe = [r for r in rows if r["regime"].startswith("probe")]
    assert probe and all(r["mma"] == 0 and r["fma"] > 0 for r in probe), probe


def test_memory_bound_launches_keep_bytes_in_flight(rows):
    short = [f"{_where(r)}: {r['inflight_per_sm']} B" for r in rows
             if r["hot"] and r["memory_bound"] and r["inflight_per_sm"] < 25 * 1024]
    assert not short, "memory-bound launches with < 25 KB in flight per SM:\n" + "\n".join(short)
    pipelined = [r for r in rows if r["kernel"] == "grad" and r["memory_bound"]]
    assert all(r["cp_async"] > 0 for r in pipelined), "the row-tile loop is not pipelined (no cp.async)"


def test_float_arguments_reach_the_gpu_as_fp64(rows):
    """Python floats default to fp32 kernel arguments; the hyper-parameters and
    loss scales are declared tl.float64, which the PTX signature must show."""
    checked = {name: ptx for r in rows for name, ptx in r["fp64_params"].items()}
    assert {"scale", "a_lr", "a_momentum", "a_weight_decay", "loss_scale", "w_lr", "b_lr"} <= set(checked)
    wrong = {name: ptx for name, ptx in checked.items() if ".f64" not in ptx}
    assert not wrong, f"not fp64 in the PTX: {wrong}"


def test_report_has_no_problems(rows):
    problems = [f"{_where(r)}: {'; '.join(r['problems'])}" for r in rows if r["problems"]]
    assert not problems, "\n".join(problems)
