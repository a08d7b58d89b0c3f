"""Awkward shapes compiled for an H100/H200 (sm_90) and an A100 (sm_80) profile on the CPU.

tests/test_compile.py compiles the benchmark regimes; this compiles what the launch helpers
choose for bench/compile_report.py's SHAPES: D in {1, 3, 300, 700, 1000, 1500, 4100} (one
block, D chunks, beyond CHUNK_D), O in {1, 2, 33, 70, 200, 257} (several forward O blocks, a
gradient BLOCK_O of 512), with and without bias, fp32/bf16/fp64, ieee/tf32/tf32x3, and N = D =
O = batch = 1 (Triton turns an integer argument equal to 1 into a constant, which the
interpreter never does). 25 launches per profile, 50 specializations: each config rule
(one block vs chunks, the W_ELEMENTS limit, the tf32x3 rules, the fp64 broadcast blocks, the
A100's smaller shared memory) is met by at least one shape; the other combinations
differ from these only in values that do not change the specialization.

Cost: ~65 s of CPU cold (two processes); Triton's cache makes a rerun take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_compile import REPORT, ROOT, _tools_missing, _where

pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "shapes.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPORT), "--shapes", "--arch", "90", "80", "--jobs", "2", "--warm-cache",
           "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if not out.exists():
        pytest.fail(f"compile report failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())["rows"]


def test_every_kernel_and_profile_is_compiled(rows):
    kinds = {(r["arch"], r["kernel"]) for r in rows}
    for arch in (90, 80):
        assert {(arch, k) for k in ("grad", "forward", "update", "fit", "stats-epochs")} <= kinds
    assert {r["dtype"] for r in rows} == {"fp32", "bf16", "fp64"}
    assert {r["precision"] for r in rows} == {"ieee", "tf32", "tf32x3"}
    # Chunked D in both kernels, and a forward with several O blocks.
    assert any(r["kernel"] == "grad" and r["blocks"].split("×")[1] == "16" and r["regime"].startswith("517x4100x257")
               for r in rows)


def test_awkward_shapes_fit_shared_memory(rows):
    over = [f"sm_{r['arch']} {_where(r)}: {r['shared']} B > {r['shared_limit']} B" for r in rows
            if r["shared"] > r["shared_limit"]]
    assert not over, "launches that raise OutOfResources:\n" + "\n".join(over)
    assert all(r["fit_per_sm"] >= 1 for r in rows)


def test_one_sized_and_forward_launches_do_not_spill(rows):
    """The 1-sized launches, and every fp32/bf16 forward (O is tiled by the grid, so its blocks
    are bounded whatever the shape). A gradient whose O·D exceeds W_ELEMENTS holds dW in
    registers and spills (bench/NOTES.md)."""
    checked = [r for r in rows if r["regime"] == "1x1x1" or (r["kernel"] == "forward" and r["dtype"] != "fp64")]
    spills = [f"sm_{r['arch']} {_where(r)}: {r['spill']} B/thread" for r in checked if r["spill"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_precisions_keep_their_units(rows):
    wrong = [_where(r) for r in rows if (r["precision"] == "ieee" and r["mma_tf32"])
             or (r["tensor_core"] and not r["mma_tf32"])]
    assert not wrong, wrong
