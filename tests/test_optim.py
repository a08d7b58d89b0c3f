"""FusedSGD and the backward + SGD-update op: trajectories against
nn.Linear + F.mse_loss + torch.optim.SGD, state_dict interop, resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD

OPTIONS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True),
    dict(weight_decay=0.05),
    dict(momentum=0.5, weight_decay=0.05, nesterov=True),
    dict(maximize=True),
    dict(momentum=0.8, weight_decay=0.01, dampening=0.1, maximize=True),
]
OPTION_IDS = ["plain", "momentum", "dampening", "nesterov", "wd", "nesterov-wd", "maximize", "all"]
# fp32 trajectories of STEPS steps vs the same trajectory in float64: rounding
# accumulates a little per step, so the bound is a few ulps per step.
STEPS = 24
TRAJECTORY_TOL = 2e-5


def _batches(n_steps, n, d, o, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(o, d, generator=g)
    out = []
    for _ in range(n_steps):
        x = torch.randn(n, d, generator=g)
        out.append((x.to(DEVICE), (x @ w_true.t() + 0.1 * torch.randn(n, o, generator=g)).to(DEVICE)))
    return out


def _eager_trajectory(linear, batches, options, lr, dtype=torch.float64):
    """The code a user writes: nn.Linear + F.mse_loss + optim.SGD (in float64 by default)."""
    ref = copy.deepcopy(linear).to(dtype)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, **options)
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(ref(x.to(dtype)), y.to(dtype)).backward()
        opt.step()
    return ref, opt


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_fused_backward_update_trajectory(options, backend):
    """loss(x, y, optimizer=opt).backward() runs the SGD step inside the backward."""
    batches = _batches(STEPS, 13, 5, 3)
    linear = nn.Linear(5, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = FusedSGD(model.parameters(), lr=0.02, backend=backend, **options)
    for x, y in batches:
        loss = model.loss(x, y, optimizer=opt)
        loss.backward()
    assert model.weight.grad is None  # the update consumed the gradient in place
    ref, ref_opt = _eager_trajectory(linear, batches, options, 0.02)
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")
    if options.get("momentum"):
        assert_close(opt.state[model.weight]["momentum_buffer"], ref_opt.state[ref.weight]["momentum_buffer"],
                     TRAJECTORY_TOL, "momentum buffer")


@pytest.mark.parametrize("options", OPTIONS[:4], ids=OPTION_IDS[:4])
def test_step_on_grad_is_sgd(options, backend):
    """Used as an ordinary optimizer (backward, then step), FusedSGD is optim.SGD."""
    batches = _batches(STEPS, 9, 4, 2, seed=1)
    linear = nn.Linear(4, 2).to(DEVICE)
    model = copy.deepcopy(linear)
    opt = FusedSGD(model.parameters(), lr=0.03, backend=backend, **options)
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    ref, _ = _eager_trajectory(linear, batches, options, 0.03)
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")


@pytest.mark.parametrize("options", [dict(), dict(momentum=0.9, nesterov=True)], ids=["plain", "nesterov"])
def test_train_step_equals_loss_backward(options, backend):
    batches = _batches(6, 21, 70, 4, seed=2)  # D over one interpreter block
    a = FusedLinearRegressor(70, 4, backend=backend).to(DEVICE)
    b = copy.deepcopy(a)
    opt_a = FusedSGD(a.parameters(), lr=0.01, backend=backend, **options)
    opt_b = FusedSGD(b.parameters(), lr=0.01, backend=backend, **options)
    for x, y in batches:
        loss_a = a.train_step(x, y, opt_a)
        loss_b = b.loss(x, y, optimizer=opt_b)
        loss_b.backward()
        assert not loss_a.requires_grad and torch.equal(loss_a, loss_b.detach())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_train_step_with_any_torch_optimizer(backend):
    batches = _batches(5, 10, 3, 2, seed=3)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches:
        model.train_step(x, y, opt)
    ref, _ = _eager_trajectory(linear, batches, dict(momentum=0.9), 0.05)
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")


@pytest.mark.filterwarnings("error")  # e.g. "lr_scheduler.step() before optimizer.step()": a missed step
def test_param_groups_and_lr_scheduler(backend):
    """Per-group hyper-parameters, and lr changing every step (no recompilation per value)."""
    batches = _batches(STEPS, 8, 3, 2, seed=4)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    ref = copy.deepcopy(linear).double()

    def groups(m):
        return [{"params": [m.weight], "weight_decay": 0.1}, {"params": [m.bias], "lr": 0.05}]

    opt = FusedSGD(groups(model), lr=0.02, momentum=0.9, backend=backend)
    ref_opt = torch.optim.SGD(groups(ref), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref_opt, gamma=0.9)
    for x, y in batches:
        model.train_step(x, y, opt)
        sched.step()
        ref_opt.zero_grad()
        F.mse_loss(ref(x.double()), y.double()).backward()
        ref_opt.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")


def test_constructor_checks_like_sgd():
    params = [nn.Parameter(torch.randn(2))]
    bad = [dict(lr=-1.0), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1.0),
           dict(lr=0.1, nesterov=True), dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            torch.optim.SGD(params, **kwargs)
        with pytest.raises(ValueError):
            FusedSGD(params, **kwargs)
    with pytest.raises(ValueError, match="backend"):
        FusedSGD(params, lr=0.1, backend="cuda")
    assert isinstance(FusedSGD(params, lr=0.1), torch.optim.Optimizer)


def test_state_dict_interop_and_resume(backend):
    """FusedSGD's state_dict loads into optim.SGD and back; stopping and resuming
    from state_dicts gives exactly the straight-through run."""
    batches = _batches(20, 11, 4, 3, seed=5)
    options = dict(lr=0.02, momentum=0.9, weight_decay=0.01)
    straight = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    first = copy.deepcopy(straight)
    opt = FusedSGD(straight.parameters(), backend=backend, **options)
    for x, y in batches:
        straight.train_step(x, y, opt)

    opt1 = FusedSGD(first.parameters(), backend=backend, **options)
    for x, y in batches[:10]:
        first.train_step(x, y, opt1)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    assert "momentum_buffer" in saved_opt["state"][0]

    resumed = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    resumed.load_state_dict(saved_model)
    opt2 = FusedSGD(resumed.parameters(), backend=backend, **options)
    opt2.load_state_dict(copy.deepcopy(saved_opt))  # load_state_dict may alias the buffers
    for x, y in batches[10:]:
        resumed.train_step(x, y, opt2)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)

    # Into torch.optim.SGD and nn.Linear, then on with eager PyTorch.
    linear = nn.Linear(4, 3).to(DEVICE)
    linear.load_state_dict(saved_model)
    torch_opt = torch.optim.SGD(linear.parameters(), **options)
    torch_opt.load_state_dict(copy.deepcopy(saved_opt))
    for x, y in batches[10:]:
        torch_opt.zero_grad()
        F.mse_loss(linear(x), y).backward()
        torch_opt.step()
    assert_close(linear.weight, straight.weight, TRAJECTORY_TOL, "SGD resumed from FusedSGD state")
    back = FusedSGD(FusedLinearRegressor(4, 3).parameters(), **options)
    back.load_state_dict(torch_opt.state_dict())
    assert torch.equal(back.state_dict()["state"][0]["momentum_buffer"],
                       torch_opt.state_dict()["state"][0]["momentum_buffer"])


def test_optimizer_misuse_is_a_clear_error():
    model = FusedLinearRegressor(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(TypeError, match="FusedSGD"):
        model.loss(x, y, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    other = FusedSGD(FusedLinearRegressor(3, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not in the optimizer"):
        model.loss(x, y, optimizer=other)


def test_update_bumps_the_version_counter(backend):
    """A graph that saved the weight before an in-place fused step must not run
    its backward on the new values silently."""
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1, backend=backend)
    x = torch.randn(6, 3, device=DEVICE, requires_grad=True)
    y = torch.randn(6, 2, device=DEVICE)
    other = (x @ model.weight.t()).sum()  # saves weight for its backward
    model.train_step(x.detach(), y, opt)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


def test_fp64_parameters(backend):
    batches = [(x.double(), y.double()) for x, y in _batches(8, 7, 3, 2, seed=6)]
    linear = nn.Linear(3, 2).double().to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    for x, y in batches:
        model.train_step(x, y, opt)
    ref, _ = _eager_trajectory(linear, batches, dict(momentum=0.9), 0.05)
    assert_close(model.weight, ref.weight, TOLERANCE[torch.float64] * 100, "fp64 weight")
