"""Every path that runs the gradient pass or inference runs it in the formulation
kernels/config.choose_formulation decides: train_step (its first call and the planned repeat
calls), loss(optimizer=).backward() (both), loss().backward() + step(), and the forward. So a
formulation listed in config.GPU_CHECKED after its card check is what users then run.

On the CPU "auto" is always the default kernel; here the decision is forced to a formulation
(where it serves the problem) and each path is checked against float64 torch.optim.SGD, with the
launches planned in each formulation counted. Fresh random inputs; tolerances: fp32 products 2e-5
after a few steps, bf16 inputs (exact in fp32; fp32 master weights) the same.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import DEVICE
from oracle import random_problem

from linreg_fused import FusedLinearRegressor, FusedSGD
from linreg_fused.kernels import config, formulations, grad_chunks, grad_mma, grad_rows, linear_mse_grad
from linreg_fused.kernels import sgd_step  # noqa: F401  (the one-launch step binds the default kernel's planner
#   at its import, for its own kernel: imported here, before the fixture wraps the planners, it is not counted)
from linreg_fused.kernels.probe import interpreter_runs_runtime_loops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not interpreter_runs_runtime_loops(),
                                reason="this Triton's interpreter cannot run loops with runtime bounds")

# (formulation, N, D, O, input dtype): rows and chunks serve IEEE fp32, mma bf16 inputs (tf32x3, bf16's "auto").
CASES = [("rows", 37, 12, 3, torch.float32), ("chunks", 45, 40, 5, torch.float32),
         ("mma", 33, 24, 4, torch.bfloat16)]
TOL = 2e-5


@pytest.fixture
def decide(monkeypatch):
    """Force "auto" to ``decide["name"]`` where it serves; ``decide["planned"]`` counts the decisions."""
    real = formulations.choose_formulation
    state = {"name": None, "planned": collections.Counter()}

    def choose(d, o, profile, acc, precision, dtype, requested="auto", kind="grad"):
        if requested != "auto":  # a formulation named by the caller (the launch helpers, once decided)
            return real(d, o, profile, acc, precision, dtype, requested, kind)
        name = state["name"]
        serves = name and config.formulation_serves(name, d, o, acc, precision, dtype, kind) is None
        chosen = real(d, o, profile, acc, precision, dtype, name if serves else "auto", kind)
        state["planned"][(kind, chosen)] += 1
        return chosen

    monkeypatch.setattr(formulations, "choose_formulation", choose)
    # The launches planned in each formulation (formulations.py imports these at call time).
    state["plans"] = collections.Counter()
    for name, module, attr in (("default", linear_mse_grad, "plan_linear_mse_partials"),
                               ("rows", grad_rows, "plan_rows_partials"),
                               ("chunks", grad_chunks, "plan_chunks_partials"), ("mma", grad_mma, "plan_mma_partials")):
        def counted(*args, _real=getattr(module, attr), _name=name, **kwargs):
            state["plans"][_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)
    return state


def _models(d, o):
    torch.manual_seed(0)
    model = FusedLinearRegressor(d, o, backend="triton").to(DEVICE)
    reference = torch.nn.Linear(d, o).to(DEVICE).double()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return model, reference


def _batches(n, d, o, dtype, steps=4):
    """Fresh batches of one shape; the float64 reference sees the same rounded inputs."""
    return [tuple(a.to(dtype) for a in random_problem(n, d, o, device=DEVICE)[::3]) for _ in range(steps)]


def _reference_step(reference, opt, x, t):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(reference(x.double()), t.double())
    loss.backward()
    opt.step()
    return loss.detach()


def _close(model, reference):
    for p, q in zip(model.parameters(), reference.parameters()):
        err = ((p.double() - q).abs().max() / q.abs().max()).item()
        assert err <= TOL, err


@pytest.mark.parametrize("name,n,d,o,dtype", CASES)
@pytest.mark.parametrize("path", ["train_step", "loss_optimizer", "loss_backward_step"])
def test_training_paths_run_the_decided_formulation(decide, path, name, n, d, o, dtype):
    decide["name"] = name
    model, reference = _models(d, o)
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.9), \
        torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for x, t in _batches(n, d, o, dtype):  # the first call plans; the later ones take the repeat path
        if path == "train_step":
            loss = model.train_step(x, t, opt)
        elif path == "loss_optimizer":
            loss = model.loss(x, t, optimizer=opt)
            loss.backward()
        else:
            opt.zero_grad()
            loss = model.loss(x, t)
            loss.backward()
            opt.step()
        ref_loss = _reference_step(reference, ref_opt, x, t)
        assert abs(loss.double() - ref_loss).item() <= TOL * ref_loss.item()
    _close(model, reference)
    assert decide["planned"][("grad", name)] >= 1 and decide["planned"][("grad", "default")] == 0, decide["planned"]
    # Planned in the formulation, never in the default kernel: by the full path on each call that takes it,
    # and by the repeat path (train_step, loss(optimizer=)) once, when it plans the shape's launches.
    plans = decide["plans"]
    assert plans[name] >= (1 if path == "loss_backward_step" else 2) and plans["default"] == 0, plans


def test_the_forward_runs_the_decided_formulation(decide):
    decide["name"] = "chunks"
    model, reference = _models(40, 5)
    x = torch.randn(29, 40, device=DEVICE)
    y = model(x)
    err = ((y.double() - reference(x.double())).abs().max() / reference(x.double()).abs().max()).item()
    assert err <= 2e-6 and decide["planned"][("forward", "chunks")] == 1, (err, decide["planned"])
    decide["name"] = "mma"  # a gradient formulation only: the forward keeps the default kernel
    model(x.to(torch.bfloat16))
    assert decide["planned"][("forward", "default")] == 1 and decide["planned"][("forward", "mma")] == 0

