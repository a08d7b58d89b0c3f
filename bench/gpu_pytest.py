"""GPU check section, last and only as far as the budget allows: the project's GPU tests under
pytest on the card (tests/test_*gpu*.py, the CUDA-graph tests of tests/test_torch_compile.py,
and tests/test_distributed.py, whose Triton scenario is skipped where the interpreter cannot
run the kernels), in one child pytest process stopped at the section's deadline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from check_ctx import Ctx

SECTION = "pytest"
ORDER = 95
BUDGET_S = 90.0
LEFTOVER = True  # gets what the other sections left, not a share of their budgets
ROOT = Path(__file__).resolve().parent.parent
NEED_S = 20.0  # pytest and torch start in ~5-10 s on the GPU machine's host


def gpu_test_files() -> list[str]:
    """The GPU test files, the CUDA-graph test of test_torch_compile.py (the rest of that file is
    CPU work), and test_distributed.py last (its Triton scenario)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*gpu*.py"))
    graph = "tests/test_torch_compile.py::test_train_step_captures_in_a_cuda_graph_and_replays_bitwise"
    if (ROOT / "tests/test_torch_compile.py").is_file() and graph.split("::")[1] in (
            ROOT / "tests/test_torch_compile.py").read_text():
        files.append(graph)
    return files + [f for f in ("tests/test_distributed.py",) if (ROOT / f).is_file()]


def counts(text: str) -> dict[str, int]:
    """pytest's closing line ("3 passed, 1 skipped in 2.0s") as numbers."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", text)}


def run(ctx: Ctx) -> None:
    if ctx.smoke:
        ctx.skip("pytest of the GPU tests", "the CPU test suite (CI) runs these files; on the CPU they skip")
        return
    if ctx.left_s() < NEED_S:
        ctx.skip("pytest of the GPU tests", f"time budget ({ctx.left_s():.0f} s left, needs ~{NEED_S:.0f} s)")
        return
    torch.cuda.empty_cache()  # the tests' process needs the card's memory
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: its workers stop with it
    try:
        out, _ = proc.communicate(timeout=max(1.0, ctx.left_s()))
        stopped = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this section started
        out, _ = proc.communicate()
        stopped = True
    tally = counts(out.strip().splitlines()[-1] if out.strip() else "")
    ok = proc.returncode == 0 and not stopped
    ctx.record("pytest of the GPU tests", status="pass" if ok else "fail", files=files, exit_code=proc.returncode,
               stopped_at_budget=stopped, **tally, output_tail=out[-3000:],
               **({"error": "stopped at the section's time budget" if stopped else f"pytest exit code {proc.returncode}"}
                  if not ok else {}))
