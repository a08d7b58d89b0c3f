"""Run by tests/test_fast_launch.py in a process of its own: kernels/launch.py's cheap launches
against Triton's own launch path, through bench/host_stub.py's stand-in driver (kernels
compiled for sm_90, launches recorded where Triton's C launcher is called, nothing run).

Prints one JSON object: per kernel and case, whether the cheap launch handed the driver's
launch function exactly what Triton's normal path hands it, and whether it skipped
JITFunction.run (a repeat) or went through it (a fallback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import host_stub  # noqa: E402

host_stub.install()

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from linreg_fused.kernels import linear_mse_grad, reduce_update, sgd_step  # noqa: E402
from linreg_fused.kernels.launch import FastLaunch  # noqa: E402
from linreg_fused.kernels.specs import ColumnTarget, SGDHyper  # noqa: E402

RECORDS: list[tuple] = []
RUNS = [0]


def _value(a):
    """What the C launcher extracts: a tensor's address, or an address, int or float as it is
    (the cheap launch passes tensors as their addresses)."""
    return a.data_ptr() if isinstance(a, torch.Tensor) else a


def _install_recorders() -> None:
    utils = triton.runtime.driver.active.utils
    real_launch = utils.launch

    def launch(*args):  # the C launch function's arguments, as each launcher hands them over
        gx, gy, gz, stream, function, coop, pdl, metadata, _md, _enter, _exit, gscratch, pscratch, _ann, sig, kargs = args
        RECORDS.append((gx, gy, gz, stream, function, coop, pdl, repr(metadata), gscratch, pscratch, bytes(sig),
                        tuple(_value(a) for a in kargs)))
        return real_launch(*args)

    utils.launch = launch  # before any kernel is loaded: every launcher binds this one
    real_run = JITFunction.run

    def run(self, *args, **kwargs):
        RUNS[0] += 1
        return real_run(self, *args, **kwargs)

    JITFunction.run = run


def _problem(offset: int):
    """x, w, b, t, buffers and a loss, with x, t and the parameters ``offset`` floats into their storage
    (offset 1: pointers that break 16-byte alignment)."""
    g = torch.Generator().manual_seed(0)

    def make(*shape):
        flat = torch.randn(offset + torch.Size(shape).numel(), generator=g)
        return flat[offset:].view(*shape)

    return make(7, 3), make(2, 3), make(2), make(7, 2), make(2, 3), make(2), make(1)


def _cases(offset: int):
    """(kernel name, its plan, the varying values in order) for each kernel FastLaunch relaunches."""
    x, w, b, t, wbuf, bbuf, lr = _problem(offset)
    hyper = SGDHyper(lr=0.1, momentum=0.9, weight_decay=0.01)
    tensor_lr = SGDHyper(lr=0.0, momentum=0.9, lr_tensor=lr)
    grad, sums = linear_mse_grad.plan_linear_mse_partials(x, w, b, t)
    buffer = sums.buffer
    names = ["x_ptr", "w_ptr", "b_ptr", "t_ptr", "row_index_ptr"]
    yield "grad", grad, (x, w, b, t, buffer), names
    loss = torch.empty(())
    for name, h in (("reduce", hyper), ("reduce, tensor lr", tensor_lr)):
        targets = [ColumnTarget(0, w, h, wbuf), ColumnTarget(6, b, h, bbuf)]
        plan = reduce_update.plan_reduce_update(buffer, targets, scale=0.1, loss_out=loss, loss_column=8,
                                                loss_scale=0.05)
        names = plan.kernel.arg_names[:21]  # the pointers and floats
        yield name, plan, tuple(plan.args[n] for n in names), names
    for name, h in (("step", hyper), ("step, tensor lr", tensor_lr)):
        targets = [ColumnTarget(0, w, h, wbuf), ColumnTarget(6, b, h, bbuf)]
        plan, _, _ = sgd_step.plan_linear_mse_step(x, w, b, t, targets, scale=0.1, loss_out=loss, loss_scale=0.05)
        names = plan.kernel.arg_names[:24]  # the pointers and floats
        yield name, plan, tuple(plan.args[n] for n in names), names


def _normal(fast: FastLaunch, values) -> tuple:
    """Triton's own launch (JITFunction.run) of the same kernel with the same arguments."""
    start = len(RECORDS)
    args = fast._arguments(*values)  # every parameter's value (tensors as tensors)
    fast.kernel[fast.grid](*args, **fast.options)
    return RECORDS[start]


def _cheap(fast: FastLaunch, values, direct: bool = False) -> tuple[tuple, bool]:
    """The launch through FastLaunch's general call, or (direct) through its generated launch function."""
    start, runs = len(RECORDS), RUNS[0]
    (fast.launch if direct else fast)(*values)
    return RECORDS[start], RUNS[0] > runs


def main() -> None:
    _install_recorders()
    results = {}
    fasts = {}
    for offset in (0, 1):  # aligned, then the same kernels with pointers off 16-byte alignment
        for name, plan, values, varying in _cases(offset):
            # The misaligned values go through the aligned plan's launcher: its fixed arguments stay.
            fast = fasts.setdefault(name, FastLaunch(plan, varying))
            expected = _normal(fast, values)
            first, first_ran = _cheap(fast, values)
            again, again_ran = _cheap(fast, values)
            direct, direct_ran = _cheap(fast, values, direct=True)
            results[f"{name} offset={offset}"] = dict(
                first_matches=first == expected, repeat_matches=again == expected and direct == expected,
                first_through_triton=first_ran, repeat_through_triton=again_ran or direct_ran)
    # Aligned pointers again, after the misaligned ones were compiled: each keeps its own kernel.
    for name, plan, values, varying in _cases(0):
        expected = _normal(fasts[name], values)
        again, ran = _cheap(fasts[name], values)
        direct, direct_ran = _cheap(fasts[name], values, direct=True)
        results[f"{name} aligned again"] = dict(first_matches=True, repeat_matches=again == expected == direct,
                                                first_through_triton=True, repeat_through_triton=ran or direct_ran)
    # A profiler's launch hook: the cheap path must hand the launch back to Triton, which calls it.
    name, plan, values, varying = next(_cases(0))
    calls = []
    hook = calls.append
    knobs.runtime.launch_enter_hook.add(hook) if hasattr(knobs.runtime.launch_enter_hook, "add") else \
        setattr(knobs.runtime, "launch_enter_hook", hook)
    _, ran = _cheap(fasts[name], values)
    _, direct_ran = _cheap(fasts[name], values, direct=True)
    results["hooked"] = dict(through_triton=ran and direct_ran, hook_calls=len(calls))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
