"""pytest-benchmark group "host": the Python cost of a fused step, on any machine.

The cases (bench/host_cases.py) run in a worker process of their own, where
Triton launches through a stand-in driver (bench/host_stub.py) instead of the
interpreter this suite otherwise uses: the project's host code and Triton's
whole launch path run, the GPU work does not. One benchmark call asks the
worker for ``steps_per_call`` calls of the case (the pipe's round trip is
spread over them); extra_info carries the worker's own figures: µs of CPU
time per call (minimum over repeats, the eager step timed beside it in the
same run),
launches, Python calls, aten ops and allocating ops per call.

The counts are exact, so they are asserted; the times move with the
machine and its load, so they are recorded (docs/host-path.md has figures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import host_stub

HERE = Path(__file__).resolve().parent
CALLS = 500  # calls of the case per benchmark call

# Upper bounds on the per-call counts of the fused cases, from the repeat-call path's design (see
# docs/host-path.md): a change that puts work back on every call fails here, whatever the machine.
LIMITS = {
    "train_step (FusedSGD)": {"launches": 2, "python_calls": 15, "allocations": 1},
    "train_step (FusedSGD, momentum 0.9)": {"launches": 2, "python_calls": 17, "allocations": 1},
    "train_step (FusedSGD, one-launch kernel, opt-in)": {"launches": 1, "python_calls": 13, "allocations": 1},
    "loss(optimizer=).backward()": {"launches": 3, "python_calls": 45, "allocations": 3},
    "FusedSGD.step()": {"launches": 2, "python_calls": 35, "allocations": 0},
    "launch: FastLaunch (kernels/launch.py)": {"launches": 1, "python_calls": 4, "allocations": 0},
}


class Worker:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "host_cases.py"), "--serve"], cwd=HERE, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"the host worker exited:\n{self.log.read()[-4000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"host worker: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def worker():
    reason = host_stub.unavailable_reason()
    if reason:
        pytest.skip(f"host group: {reason}")
    w = Worker()
    yield w
    w.close()


def _cases() -> list[str]:
    # The names without importing host_cases here (it installs the stand-in driver on import).
    return ["eager step (nn.Linear+F.mse_loss+backward+SGD, CPU 5x3->2)", "train_step (FusedSGD)",
            "train_step (FusedSGD, momentum 0.9)", "loss(optimizer=).backward()",
            "autograd floor: empty Function.apply + backward()", "FusedSGD.step()",
            "torch.optim.SGD(foreach=True).step() (CPU)", "train_step (FusedSGD, 1024x256->16 plan)",
            "launch: JITFunction.run (kernel[grid](...))", "launch: FastLaunch (kernels/launch.py)"]


@pytest.mark.parametrize("case", _cases())
def test_bench_host(benchmark, worker, case: str, bench_env) -> None:
    figures = worker.ask(setup=case, calls=CALLS, repeats=3)
    benchmark.group = "host"
    benchmark.extra_info.update(
        bench_env.labels(), peer=case, baseline=figures["baseline"], steps_per_call=CALLS,
        launches_stubbed="stand-in libcuda (bench/fake_libcuda.c), kernels compiled for sm_90",
        **{k: figures[k] for k in ("us_per_call", "eager_us_per_call", "launches", "python_calls", "aten_ops",
                                   "allocations")},
        vs_eager=figures["us_per_call"] / figures["eager_us_per_call"])
    benchmark.pedantic(worker.ask, kwargs={"run": case, "calls": CALLS}, rounds=3, iterations=1)
    for key, limit in LIMITS.get(case, {}).items():
        assert figures[key] <= limit, f"{case}: {key} {figures[key]} per call, more than {limit}"
