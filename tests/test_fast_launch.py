"""kernels/launch.py's cheap launches against Triton's own launch path, on every kernel they relaunch
(the gradient pass, reduce_update_, the one-launch step; with a learning rate read from a tensor),
with aligned pointers and with pointers that break 16-byte alignment (Triton specialises on it).

Without a GPU this runs Triton's real launch code against a stand-in driver (bench/host_stub.py,
tests/launch_worker.py: kernels compiled for sm_90; the arguments the driver's launch function
receives are recorded, nothing runs). What that cannot show is the GPU's side: that the launched
kernel computes the right numbers (tests/test_step_cache.py, under the interpreter) and what a real
driver adds (bench/gpu_step.py on a GPU compares the cheap and normal paths' results).
Needs a C compiler and Triton's NVIDIA backend; ~20 s with a cold Triton cache, then seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import host_stub  # noqa: E402

from linreg_fused.kernels import launch  # noqa: E402


@pytest.fixture(scope="module")
def results():
    reason = host_stub.unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "launch_worker.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"launch worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


KERNELS = ["grad", "reduce", "reduce, tensor lr", "step", "step, tensor lr"]


@pytest.mark.parametrize("case", [f"{k} offset={o}" for o in (0, 1) for k in KERNELS] +
                         [f"{k} aligned again" for k in KERNELS])
def test_cheap_launch_hands_the_driver_what_triton_does(results, case):
    r = results[case]
    assert r["first_matches"] and r["repeat_matches"], f"{case}: the launch differs from Triton's"
    assert not r["repeat_through_triton"], f"{case}: the repeat went through JITFunction.run"


def test_new_alignment_goes_through_triton_once(results):
    for kernel in KERNELS:
        assert results[f"{kernel} offset=1"]["first_through_triton"], kernel


def test_launch_hooks_send_the_launch_through_triton(results):
    assert results["hooked"] == {"through_triton": True, "hook_calls": 2}  # the call and .launch: each hooked


class _Launcher:  # stands in for Triton's CudaLauncher
    def __init__(self, scratch):
        self.calls = []
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.arg_annotations, self.kernel_signature = [], b""
        self.launch_cooperative_grid, self.launch_pdl = False, False
        self.launch = lambda *args: self.calls.append(("c", args))

    def __call__(self, *args):
        self.calls.append(("launcher", args))


_Launcher.__name__ = "CudaLauncher"


class _Compiled:
    def __init__(self, scratch):
        self.run, self.function, self.packed_metadata = _Launcher(scratch), 7, (4, 1, 0)


@pytest.mark.parametrize("scratch", [0, 256])
def test_a_kernel_with_scratch_memory_launches_through_its_launcher(scratch):
    """Triton's launcher allocates a kernel's global scratch; only a kernel without any skips it."""
    compiled = _Compiled(scratch)
    launch._launcher(compiled, (2, 1, 1))(0, ("x",))
    assert compiled.run.calls[0][0] == ("launcher" if scratch else "c")
