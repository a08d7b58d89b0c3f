"""The repeat-call path of loss(x, t, optimizer=opt).backward() (linreg_fused/loss_cache.py): the
full path's numbers bitwise, with one or two launches, and the full path's behaviour where the
optimizer changes between a loss and its backward."""

import copy

import pytest
import torch
from conftest import DEVICE
from oracle import random_problem

from linreg_fused import FusedLinearRegressor, FusedSGD, backend, loss_cache


def _pair(**sgd):
    torch.manual_seed(0)
    a = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    b = copy.deepcopy(a)
    return (a, FusedSGD(a.parameters(), lr=0.05, **sgd)), (b, FusedSGD(b.parameters(), lr=0.05, **sgd))


@pytest.fixture
def switch(monkeypatch):
    """Which model may take the repeat path: the reference never does."""
    real, state = loss_cache.try_loss, {"off": False, "hits": 0}

    def maybe(*args):
        out = None if state["off"] else real(*args)
        state["hits"] += out is not None
        return out

    monkeypatch.setattr(loss_cache, "try_loss", maybe)
    return state


def _both(models, switch, x, t, scale=1.0):
    losses = []
    for (model, opt), off in zip(models, (False, True)):
        switch["off"] = off
        loss = model.loss(x, t, optimizer=opt)
        (loss * scale).backward()
        losses.append(loss.detach())
    (a, opt_a), (b, opt_b) = models
    assert torch.equal(*losses)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p].get("momentum_buffer"), opt_b.state[q].get("momentum_buffer")
        assert (sa is None) == (sb is None) and (sa is None or torch.equal(sa, sb))


@pytest.mark.parametrize("launches", ["auto", 2])
@pytest.mark.parametrize("sgd", [dict(), dict(momentum=0.9, nesterov=True, weight_decay=0.01)],
                         ids=["plain", "nesterov-wd"])
def test_repeat_loss_is_the_full_path_bitwise(sgd, launches, switch, monkeypatch):
    monkeypatch.setattr(backend, "STEP_LAUNCHES", launches)
    models = _pair(**sgd)
    for i in range(5):
        x, _, _, t = random_problem(11, 4, 3, device=DEVICE)
        _both(models, switch, x, t, scale=0.5 if i == 3 else 1.0)  # grad_output 0.5 once
    assert switch["hits"] >= 2


@pytest.mark.parametrize("launches", [1, 2])
def test_repeat_loss_with_several_programs(launches, switch, monkeypatch):
    """64 rows, four programs: the one-launch forward's last program sums the others' rows into the loss."""
    monkeypatch.setattr(backend, "STEP_LAUNCHES", launches)
    models = _pair(momentum=0.9)
    for _ in range(4):
        x, _, _, t = random_problem(64, 4, 3, device=DEVICE)
        _both(models, switch, x, t)
    assert switch["hits"] >= 2
    (model, opt), _ = models
    assert opt._linreg_repeat_losses[0].partials_like.shape[0] > 1


def test_two_losses_then_their_backwards(switch):
    """Each loss keeps its own partial sums until its backward; a backward after another loss's step
    changed the weight raises on both paths (autograd's version check), none steps from stale sums."""
    models = _pair()
    x, _, _, t = random_problem(11, 4, 3, device=DEVICE)
    _both(models, switch, x, t), _both(models, switch, x, t)  # planned
    batches = [random_problem(11, 4, 3, device=DEVICE)[::3] for _ in range(2)]
    for (model, opt), off in zip(models, (False, True)):
        switch["off"] = off
        first, second = (model.loss(xb, tb, optimizer=opt) for xb, tb in batches)
        second.backward()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            first.backward()
    (a, _), (b, _) = models
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert switch["hits"] >= 3


def test_settings_changed_before_the_backward_are_used(switch):
    models = _pair(momentum=0.9)
    x, _, _, t = random_problem(11, 4, 3, device=DEVICE)
    for _ in range(3):
        _both(models, switch, x, t)
    for (model, opt), off in zip(models, (False, True)):
        switch["off"] = off
        loss = model.loss(x, t, optimizer=opt)
        opt.param_groups[0]["lr"] = 0.2
        opt.param_groups[0]["momentum"] = 0.5
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new groups and buffers
        loss.backward()
    (a, _), (b, _) = models
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_create_graph_is_refused_and_inputs_that_need_grad_take_the_full_path(switch):
    (model, opt), _ = _pair()
    x, _, _, t = random_problem(11, 4, 3, device=DEVICE)
    for _ in range(3):
        model.loss(x, t, optimizer=opt).backward()
    with pytest.raises(RuntimeError, match="no second derivative"):
        model.loss(x, t, optimizer=opt).backward(create_graph=True)
    hits = switch["hits"]
    xg = x.clone().requires_grad_()
    model.loss(xg, t, optimizer=opt).backward()
    assert switch["hits"] == hits and xg.grad is not None


def test_a_state_dict_loaded_between_the_loss_and_its_backward_is_the_one_stepped(switch):
    """loss.backward(); opt.step() steps with the optimizer of that moment: a state_dict loaded in
    between (new group dicts, a new lr and buffers) is what the fused backward uses, on both paths
    (the full path used the group dicts of the loss before), as torch.optim.SGD does (float64)."""
    torch.manual_seed(0)
    models = [FusedLinearRegressor(4, 3, backend="triton", dtype=torch.float64).to(DEVICE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ref = torch.nn.Linear(4, 3, dtype=torch.float64, device=DEVICE)
    ref.load_state_dict(models[0].state_dict())
    opts = [FusedSGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        x = torch.randn(11, 4, generator=g, dtype=torch.float64).to(DEVICE)
        t = torch.randn(11, 3, generator=g, dtype=torch.float64).to(DEVICE)
        for (model, opt), off in zip(zip(models, opts), (False, True)):
            switch["off"] = off
            loss = model.loss(x, t, optimizer=opt)
            if step == 3:
                state = copy.deepcopy(opt.state_dict())
                state["param_groups"][0]["lr"] = 0.2
                opt.load_state_dict(state)
            loss.backward()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), t).backward()
        if step == 3:
            state = copy.deepcopy(ref_opt.state_dict())
            state["param_groups"][0]["lr"] = 0.2
            ref_opt.load_state_dict(state)
        ref_opt.step()
    assert switch["hits"] >= 2
    for p, q, r in zip(models[0].parameters(), models[1].parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert torch.allclose(p, r, rtol=1e-12, atol=1e-12)
