"""FusedSGD and the backward + SGD-update op: trajectories against
nn.Linear + F.mse_loss + torch.optim.SGD, state_dict interop, resume."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from linreg_fused import FusedLinearRegressor, FusedSGD
from linreg_fused.backend import select_ops
from torch.utils.data import DataLoader, TensorDataset

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
    back = FusedSGD(FusedLinearRegressor(4, 3).to(DEVICE).parameters(), **options)  # buffers follow their params
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


# ---------------------------------------------------------------- parameters outside the optimizer, frozen ones
def _eager_selected(linear, batches, trained, options, lr):
    """float64 nn.Linear + torch.optim.SGD over the parameters named in ``trained`` only
    (the others still require grad, so their .grad accumulates: zero_grad does not reach them)."""
    ref = copy.deepcopy(linear).double()
    opt = torch.optim.SGD([getattr(ref, name) for name in trained], lr=lr, **options)
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(ref(x.double()), y.double()).backward()
        opt.step()
    return ref


@pytest.mark.parametrize("trained", ["weight", "bias"])
def test_parameter_outside_the_optimizer_like_torch(trained, backend):
    """FusedSGD([model.weight]) does what torch.optim.SGD([linear.weight]) does:
    the weight steps and the bias keeps its value. Through loss(optimizer=).backward()
    the bias gets its .grad (accumulating, as zero_grad does not reach it);
    train_step makes no .grad at all."""
    other = "bias" if trained == "weight" else "weight"
    batches = _batches(5, 9, 4, 2, seed=7)
    linear = nn.Linear(4, 2).to(DEVICE)
    options = dict(momentum=0.9, weight_decay=0.01)
    ref = _eager_selected(linear, batches, [trained], options, 0.05)

    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = FusedSGD([getattr(model, trained)], lr=0.05, backend=backend, **options)
    for x, y in batches:
        model.loss(x, y, optimizer=opt).backward()
    assert_close(getattr(model, trained), getattr(ref, trained), TRAJECTORY_TOL, trained)
    assert torch.equal(getattr(model, other), getattr(linear, other))
    assert getattr(model, trained).grad is None
    assert_close(getattr(model, other).grad, getattr(ref, other).grad, TRAJECTORY_TOL, f"{other}.grad")

    stepped = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = FusedSGD([getattr(stepped, trained)], lr=0.05, backend=backend, **options)
    for x, y in batches:
        stepped.train_step(x, y, opt)
    assert_close(getattr(stepped, trained), getattr(ref, trained), TRAJECTORY_TOL, trained)
    assert torch.equal(getattr(stepped, other), getattr(linear, other))
    assert stepped.weight.grad is None and stepped.bias.grad is None


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_parameter_stays_bitwise(frozen, backend):
    """A parameter with requires_grad=False in FusedSGD(model.parameters()) gets
    no gradient, so no step moves it, through backward or train_step."""
    batches = _batches(4, 9, 4, 2, seed=8)
    linear = nn.Linear(4, 2).to(DEVICE)
    trained = "bias" if frozen == "weight" else "weight"
    ref = _eager_selected(linear, batches, [trained], dict(momentum=0.9), 0.05)
    for use_train_step in (False, True):
        model = FusedLinearRegressor.from_linear(linear, backend=backend)
        getattr(model, frozen).requires_grad_(False)
        opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
        for x, y in batches:
            model.train_step(x, y, opt) if use_train_step else model.loss(x, y, optimizer=opt).backward()
        assert torch.equal(getattr(model, frozen), getattr(linear, frozen))
        assert getattr(model, frozen) not in opt.state
        assert_close(getattr(model, trained), getattr(ref, trained), TRAJECTORY_TOL, trained)


def _fit_eager(linear, x, y, perms, batch_size, trained, options):
    ref = copy.deepcopy(linear).double()
    opt = torch.optim.SGD([getattr(ref, name) for name in trained], **options)
    for perm in perms:
        for s in range(0, x.shape[0], batch_size):
            rows = perm[s : s + batch_size]
            opt.zero_grad()
            F.mse_loss(ref(x[rows].double()), y[rows].double()).backward()
            opt.step()
    return ref


@pytest.mark.parametrize("path", ["persistent", "per-step"])
@pytest.mark.parametrize("how", ["outside", "frozen"], ids=["outside-the-optimizer", "frozen"])
@pytest.mark.parametrize("still", ["weight", "bias"])
def test_fit_trains_only_what_torch_would(still, how, path, backend, monkeypatch):
    """fit with a parameter outside FusedSGD or frozen: that parameter stays
    bitwise where it was, the other trains as torch.optim.SGD trains it, on
    both of fit's fused paths."""
    if path == "per-step":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    trained = ["bias" if still == "weight" else "weight"]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(23, 4, generator=g).to(DEVICE)
    y = torch.randn(23, 2, generator=g).to(DEVICE)
    linear = nn.Linear(4, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    options = dict(lr=0.05, momentum=0.9)
    if how == "outside":
        opt = FusedSGD([getattr(model, trained[0])], backend=backend, **options)
    else:
        getattr(model, still).requires_grad_(False)
        opt = FusedSGD(model.parameters(), backend=backend, **options)
    epochs, batch_size = 3, 8
    model.fit(x, y, epochs=epochs, batch_size=batch_size, optimizer=opt, seed=4, progress=False)
    loader = DataLoader(TensorDataset(torch.arange(23)), batch_size=23, shuffle=True,
                        generator=torch.Generator().manual_seed(4))
    perms = torch.stack([torch.cat([rows for (rows,) in loader]) for _ in range(epochs)]).to(DEVICE)
    ref = _fit_eager(linear, x, y, perms, batch_size, trained, options)
    assert torch.equal(getattr(model, still), getattr(linear, still)), f"{still} moved"
    assert_close(getattr(model, trained[0]), getattr(ref, trained[0]), TRAJECTORY_TOL, trained[0])


# ---------------------------------------------------------------- LR schedulers and step hooks
def _one_fused_step(how, model, opt, x, y):
    if how == "backward":
        model.loss(x, y, optimizer=opt).backward()
    elif how == "train_step":
        model.train_step(x, y, opt)
    else:
        model.fit(x, y, epochs=2, batch_size=4, optimizer=opt, seed=0, progress=False)


STEP_PATHS = ["backward", "train_step", "fit-per-step", "fit-persistent"]


@pytest.mark.parametrize("how", STEP_PATHS)
def test_lr_scheduler_sees_fused_steps(how, backend, monkeypatch):
    """A scheduler stepped after a fused step does not warn that it ran before optimizer.step()."""
    if how == "fit-per-step":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 3, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_fused_step(how, model, opt, x, y)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("how", STEP_PATHS)
def test_step_hooks_fire_around_fused_steps(how, backend, monkeypatch):
    """Step pre- and post-hooks (the optimizer's and the global ones) fire around
    each step taken inside the fused backward, train_step and fit, as they
    would around optimizer.step(): once per batch, the pre-hook before the
    update, the post-hook after it."""
    if how == "fit-per-step":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1, backend=backend)
    assert not opt.has_step_hooks()
    calls = []

    def hook(kind):
        def record(optimizer, args, kwargs):
            assert optimizer is opt and args == (opt,) and kwargs == {}
            calls.append((kind, model.weight.detach().clone()))
        return record

    handles = [opt.register_step_pre_hook(hook("pre")), opt.register_step_post_hook(hook("post")),
               register_optimizer_step_post_hook(hook("global post"))]
    try:
        assert opt.has_step_hooks()
        x, y = torch.randn(8, 3, device=DEVICE), torch.randn(8, 2, device=DEVICE)
        _one_fused_step(how, model, opt, x, y)
    finally:
        for handle in handles:
            handle.remove()
    steps = 1 if how in ("backward", "train_step") else 2 * 2  # fit: 2 epochs of 2 batches
    assert [kind for kind, _ in calls] == ["pre", "post", "global post"] * steps
    for i in range(steps):
        pre, post = calls[3 * i][1], calls[3 * i + 1][1]
        assert not torch.equal(pre, post)  # the update happened between them


def test_step_pre_hook_cannot_change_a_fused_step(backend):
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1, backend=backend)
    opt.register_step_pre_hook(lambda optimizer, args, kwargs: (args, {"closure": None}))
    before = model.weight.detach().clone()
    with pytest.raises(RuntimeError, match="pre-hook returned new arguments"):
        model.train_step(torch.randn(4, 3, device=DEVICE), torch.randn(4, 2, device=DEVICE), opt)
    assert torch.equal(model.weight, before)
