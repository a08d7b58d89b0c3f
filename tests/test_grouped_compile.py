"""The grouped statistics kernels compiled for sm_90 on the CPU (bench/compile_grouped.py, in a
subprocess without TRITON_INTERPRET): no spills and shared memory within the limit, at the
issue's shape (BLOCK_K = 16) and the widest the kernels take (BLOCK_K = 64), fp32 and fp64.
About 10 s with a cold cache. Skipped where Triton's NVIDIA tools are absent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_compile import _tools_missing

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


def test_grouped_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_grouped.py"), "--check"], cwd=ROOT / "bench",
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if "regs" in line]
    assert len(lines) == 6 and all(line.endswith("ok") for line in lines), done.stdout
