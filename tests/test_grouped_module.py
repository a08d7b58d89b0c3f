"""GroupedLinearRegressor: forward, solve and fit against G separate models on their own rows,
save/load, and its errors. Tolerances: float32 parameters (2e-6 relative, a few roundings of
the fp64 statistics' steps stored in float32), float64 results of solve (1e-10)."""

import pytest
import torch
from test_grouped_stats import ragged

from linreg_fused import FusedLinearRegressor, FusedSGD, GroupedLinearRegressor
from linreg_fused.serialization import ModelFileError


def test_forward_runs_each_row_through_its_groups_model():
    model = GroupedLinearRegressor(4, 3, 2, dtype=torch.float64)
    x, g = torch.randn(2, 5, 3, dtype=torch.float64), torch.randint(0, 4, (2, 5))
    y = model(x, g)
    assert y.shape == (2, 5, 2)
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(5)):
        i, j = idx.tolist()
        expected = torch.nn.functional.linear(x[i, j], model.weight[g[i, j]], model.bias[g[i, j]])
        torch.testing.assert_close(y[i, j], expected, rtol=1e-14, atol=1e-14)
    y.sum().backward()  # differentiable like nn.Linear
    assert model.weight.grad.shape == (4, 2, 3)
    no_bias = GroupedLinearRegressor(4, 3, 2, bias=False)
    assert no_bias.bias is None and no_bias(x.float(), g).shape == (2, 5, 2)
    with pytest.raises(ValueError, match=r"got ids from -1"):
        model(x, torch.full((2, 5), -1))  # a negative id must not wrap around to the last group
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        model(torch.randn(5, 4), torch.zeros(5, dtype=torch.int64))


def test_initialisation_follows_nn_linear_per_group():
    model = GroupedLinearRegressor(64, 16, 3)
    bound = 1 / 16 ** 0.5
    for p in (model.weight, model.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert model.weight.shape == (64, 3, 16) and model.bias.shape == (64, 3)


def test_solve_sets_each_groups_least_squares_and_returns_its_mse(backend):
    sizes = [12, 0, 30, 7]
    x, t, g = ragged(sizes, 3, 2, offset=1.0, dtype=torch.float64, seed=20)
    model = GroupedLinearRegressor(4, 3, 2, dtype=torch.float64, backend=backend)
    before = model.weight[1].clone(), model.bias[1].clone()
    with pytest.warns(RuntimeWarning, match=r"no rows \(\[1\]\)"):
        mse = model.solve(x, t, g)
    assert mse.shape == (4,) and torch.isnan(mse[1])
    assert torch.equal(model.weight[1], before[0]) and torch.equal(model.bias[1], before[1])
    for i in (0, 2, 3):
        ref = torch.linalg.lstsq(torch.cat([x[g == i], torch.ones(sizes[i], 1, dtype=torch.float64)], 1),
                                 t[g == i]).solution
        torch.testing.assert_close(model.weight[i], ref[:3].t(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model.bias[i], ref[3], rtol=1e-10, atol=1e-10)
        residual = torch.nn.functional.mse_loss(model(x[g == i], g[g == i]), t[g == i])
        torch.testing.assert_close(mse[i], residual.detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("hyper", [dict(), dict(momentum=0.9), dict(momentum=0.5, nesterov=True, weight_decay=0.01),
                                   dict(momentum=0.9, dampening=0.3, maximize=False)],
                         ids=["plain", "momentum", "nesterov-decay", "dampening"])
def test_fit_equals_separate_models_trained_on_their_own_rows(hyper):
    sizes = [9, 1, 25, 4]
    x, t, g = ragged(sizes, 3, 2, offset=0.5, seed=21)
    torch.manual_seed(0)
    model = GroupedLinearRegressor(4, 3, 2, backend="torch")
    separate = []
    for i in range(4):
        single = FusedLinearRegressor(3, 2, backend="torch")
        with torch.no_grad():
            single.weight.copy_(model.weight[i])
            single.bias.copy_(model.bias[i])
        opt = FusedSGD(single.parameters(), lr=0.05, backend="torch", **hyper)
        separate.append((single, single.fit(x[g == i], t[g == i], epochs=6, optimizer=opt, progress=False)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **hyper)
    history = model.fit(x, t, g, epochs=6, optimizer=opt)
    assert history.shape == (6, 4)
    for i, (single, losses) in enumerate(separate):
        torch.testing.assert_close(model.weight[i], single.weight, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(model.bias[i], single.bias, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(history[:, i], torch.tensor(losses, dtype=torch.float64), rtol=2e-6, atol=1e-8)
    if hyper.get("momentum"):
        assert opt.state[model.weight]["momentum_buffer"].shape == (4, 2, 3)


def test_fit_continues_with_the_optimizers_momentum_and_lr_is_plain_sgd():
    x, t, g = ragged([20, 15], 2, 1, seed=22)
    torch.manual_seed(1)
    a = GroupedLinearRegressor(2, 2, 1, dtype=torch.float64)
    b = GroupedLinearRegressor(2, 2, 1, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8) for m in (a, b))
    a.fit(x, t, g, epochs=6, optimizer=opt_a)
    b.fit(x, t, g, epochs=3, optimizer=opt_b)
    b.fit(x, t, g, epochs=3, optimizer=opt_b)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-13, atol=1e-15)
    c = GroupedLinearRegressor(2, 2, 1, dtype=torch.float64)
    d = GroupedLinearRegressor(2, 2, 1, dtype=torch.float64)
    d.load_state_dict(c.state_dict())
    c.fit(x, t, g, epochs=4, lr=0.1)
    d.fit(x, t, g, epochs=4, optimizer=torch.optim.SGD(d.parameters(), lr=0.1))
    assert torch.equal(c.weight, d.weight) and torch.equal(c.bias, d.bias)


def test_a_diverging_group_stops_at_its_last_finite_epoch_and_the_others_train_on():
    x, t, g = ragged([10, 10], 2, 1, dtype=torch.float64, seed=23)
    x[g == 1] *= 1e60  # its gradient overflows after a few steps at this lr
    model = GroupedLinearRegressor(2, 2, 1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"1 group\(s\) stopped being finite \(\[1\]"):
        history = model.fit(x, t, g, epochs=20, lr=0.1)
    assert torch.isfinite(history[:, 0]).all() and not torch.isfinite(history[-1, 1])
    assert torch.isfinite(model.weight).all()
    assert history[-1, 0] < history[0, 0]


def test_save_and_load_round_trip(tmp_path):
    model = GroupedLinearRegressor(5, 3, 2, dtype=torch.float64)
    model.save(tmp_path / "m.safetensors")
    back = GroupedLinearRegressor.load(tmp_path / "m.safetensors")
    assert (back.n_groups, back.in_features, back.out_features) == (5, 3, 2) and back.weight.dtype == torch.float64
    assert torch.equal(back.weight, model.weight) and torch.equal(back.bias, model.bias)
    no_bias = GroupedLinearRegressor(2, 1, 1, bias=False)
    no_bias.save(tmp_path / "nb.safetensors")
    assert GroupedLinearRegressor.load(tmp_path / "nb.safetensors").bias is None
    FusedLinearRegressor(3, 2).save(tmp_path / "single.safetensors")
    with pytest.raises(ModelFileError, match="not a linreg-fused-grouped model"):
        GroupedLinearRegressor.load(tmp_path / "single.safetensors")
    for path, says in ((tmp_path, "a directory, not a model file"), (tmp_path / "none.safetensors", "no such file")):
        with pytest.raises(ModelFileError, match=says):
            GroupedLinearRegressor.load(path)


def test_fit_and_solve_refuse_bad_arguments():
    model = GroupedLinearRegressor(2, 2, 1)
    x, t, g = torch.randn(4, 2), torch.randn(4, 1), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="either lr= .* or optimizer="):
        model.fit(x, t, g, epochs=2)
    with pytest.raises(ValueError, match="either lr="):
        model.fit(x, t, g, epochs=2, lr=0.1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="SGD"):
        model.fit(x, t, g, epochs=2, optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="epochs"):
        model.fit(x, t, g, epochs=0, lr=0.1)
    for call in (GroupedLinearRegressor(3, 2, 1).solve, lambda s: GroupedLinearRegressor(3, 2, 1).fit(s, lr=0.1)):
        with pytest.raises(ValueError, match="the model is"):
            call(model.statistics(x, t, g))  # fit said "weight must have shape" of a weight not passed
    with pytest.raises(ValueError, match="n_groups"):
        GroupedLinearRegressor(0, 2, 1)
    for call in (lambda: model.fit(x, epochs=1, lr=0.1), lambda: model.solve(x, t)):
        with pytest.raises(TypeError, match="give t and groups"):
            call()  # not an AttributeError of None.to from deep inside


def test_forward_of_an_empty_batch_is_empty_like_nn_linear():
    model = GroupedLinearRegressor(3, 4, 2, dtype=torch.float64)
    for shape in ((0,), (2, 0)):
        x = torch.randn(*shape, 4, dtype=torch.float64, requires_grad=True)
        y = model(x, torch.zeros(shape, dtype=torch.int64))
        assert y.shape == (*shape, 2) and y.dtype == torch.float64
        y.sum().backward()  # as nn.Linear: zero gradients, not an error
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_a_momentum_buffer_of_another_shape_raises_before_any_update():
    """A state from another model (one group's (O, D) buffer beside a (G, O, D) weight) would broadcast:
    every group would step with the one buffer. It raises as torch.optim.SGD does, parameters unchanged."""
    x, t, g = ragged([9, 6, 4], 3, 2, dtype=torch.float64, seed=24)
    model = GroupedLinearRegressor(3, 3, 2, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.fit(x, t, g, epochs=2, optimizer=opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.state[model.weight]["momentum_buffer"] = torch.randn(2, 3, dtype=torch.float64)  # broadcastable
    with pytest.raises(RuntimeError, match=r"momentum_buffer .* has shape \(2, 3\)"):
        model.fit(x, t, g, epochs=1, optimizer=opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
