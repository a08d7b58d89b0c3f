"""A pytest launcher for run.py: imports torch, Triton and pytest once, then
forks one child per request, so no run pays their import again (about 3 of
the 8 CPU-seconds a typical mutant costs).

Requests arrive on stdin as JSON lines {"cwd", "args", "timeout", "out"}: the
child changes into cwd (a scratch copy), puts it first on sys.path (and on
PYTHONPATH, for the interpreters a test starts), runs
pytest.main(args) with its output in the file ``out``, and exits with
pytest's code. The reply is a JSON line {"rc": exit code, negative for a
signal, or null when the timeout killed it}. Nothing from the repository is
imported here, so every child imports the scratch copy's code afresh.
"""

import json
import os
import signal
import sys
import time
import traceback

if __name__ == "__main__":
    # This folder: the children must find nothing here. Only when run as the launcher: a process
    # a test spawns (multiprocessing's spawn) re-imports this file as __mp_main__, with sys.path[0]
    # then the scratch copy it needs.
    sys.path.pop(0)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton's first import, as tests/conftest.py needs it

import numpy  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402,F401
import triton  # noqa: E402,F401
import triton.language  # noqa: E402,F401


def _child(request: dict, out: int) -> None:
    try:
        os.setsid()  # its own process group, so a timeout kills whatever it started too
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.chdir(request["cwd"])
        sys.path.insert(0, request["cwd"])
        os.environ["PYTHONPATH"] = request["cwd"]  # for the Pythons the tests start themselves
        code = pytest.main(request["args"])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(99)


_running: list[int] = []  # the child now running, if any


def _stop(signum, frame) -> None:
    """Killed (or orphaned): take the running child's process group along."""
    for pid in _running:
        os.killpg(pid, signal.SIGKILL)
    os._exit(1)


def run(request: dict) -> dict:
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pid = os.fork()
    if pid == 0:
        _child(request, out)
    _running.append(pid)
    os.close(out)
    deadline = time.monotonic() + request["timeout"]
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return {"rc": os.waitstatus_to_exitcode(status)}
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"rc": None}
            if os.getppid() != PARENT:
                _stop(None, None)
            time.sleep(0.05)
    finally:
        _running.remove(pid)


if __name__ == "__main__":
    PARENT = os.getppid()
    signal.signal(signal.SIGTERM, _stop)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)
