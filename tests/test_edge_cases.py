"""Edge cases that once gave silently wrong answers: frozen parameters in fit,
second derivatives, row indices, empty and featureless inputs. Each is
checked on both backends against float64 nn.Linear + F.mse_loss + SGD."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close, random_problem
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from linreg_fused import FusedLinearRegressor, FusedSGD, fused_sgd_step, linear, linear_mse
from linreg_fused.backend import select_ops

FP32 = TOLERANCE[torch.float32]


def _problem(n=23, d=3, o=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x.to(DEVICE), (x @ torch.randn(o, d, generator=g).t() + torch.randn(n, o, generator=g)).to(DEVICE)


def _one_launch_or_per_batch(path, backend, monkeypatch):
    if path == "per-batch":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)


# ------------------------------------------------------------ frozen parameters
@pytest.mark.parametrize("path", ["one-launch", "per-batch"])
@pytest.mark.parametrize("frozen", ["bias", "weight"])
def test_fit_leaves_a_frozen_parameter_bitwise_unchanged(frozen, path, backend, monkeypatch):
    _one_launch_or_per_batch(path, backend, monkeypatch)
    x, y = _problem()
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    getattr(model, frozen).requires_grad_(False)
    before = getattr(model, frozen).detach().clone()
    model.fit(x, y, epochs=4, batch_size=5, optimizer=FusedSGD(model.parameters(), lr=0.05, momentum=0.5,
                                                                backend=backend), seed=0)
    assert torch.equal(getattr(model, frozen), before)

    # The trained one follows torch: the same loop with the same parameter frozen.
    ref = copy.deepcopy(linear).double()
    getattr(ref, frozen).requires_grad_(False)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05, momentum=0.5)
    loader = DataLoader(TensorDataset(x.cpu().double(), y.cpu().double()), batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        for xb, yb in loader:
            opt.zero_grad()
            F.mse_loss(ref(xb.to(DEVICE)), yb.to(DEVICE)).backward()
            opt.step()
    trained = "weight" if frozen == "bias" else "bias"
    assert_close(getattr(model, trained), getattr(ref, trained), 5e-6, trained)


@pytest.mark.parametrize("path", ["one-launch", "per-batch", "train_step", "in-backward"])
def test_a_parameter_outside_the_optimizer_is_left_alone(path, backend, monkeypatch):
    """FusedSGD([model.weight]) updates the weight and leaves the bias, as torch.optim.SGD does."""
    _one_launch_or_per_batch(path, backend, monkeypatch)
    x, y = _problem(seed=1)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    bias, weight = model.bias.detach().clone(), model.weight.detach().clone()
    opt = FusedSGD([model.weight], lr=0.05, backend=backend)
    if path == "train_step":
        model.train_step(x, y, opt)
    elif path == "in-backward":
        model.loss(x, y, optimizer=opt).backward()
    else:
        model.fit(x, y, epochs=2, batch_size=5, optimizer=opt, seed=0)
    assert torch.equal(model.bias, bias)
    assert not torch.equal(model.weight, weight)


# ------------------------------------------------------------ second order
def _gradient_penalty(model_or_linear, x):
    """A gradient penalty: ‖d(Σ model(x))/dx‖², differentiated again."""
    out = model_or_linear(x)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (out ** 2).mean() + (gx ** 2).sum()


def test_double_backward_through_the_forward_matches_nn_linear(backend):
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    x = torch.randn(7, 3, device=DEVICE)
    _gradient_penalty(model, x.clone().requires_grad_()).backward()
    ref = copy.deepcopy(linear).double()
    _gradient_penalty(ref, x.double().requires_grad_()).backward()
    assert_close(model.weight.grad, ref.weight.grad, FP32, "weight.grad")
    assert_close(model.bias.grad, ref.bias.grad, FP32, "bias.grad")


def test_second_derivative_of_the_loss_matches_torch(backend):
    x, w, b, t = random_problem(9, 4, 3, device=DEVICE)
    w.requires_grad_()
    (dw,) = torch.autograd.grad(linear_mse(x, w, b, t, backend=backend), w, create_graph=True)
    assert dw.requires_grad
    (dw ** 2).sum().backward()  # d/dW ‖dL/dW‖²

    w64 = w.detach().double().requires_grad_()
    (dw64,) = torch.autograd.grad(F.mse_loss(F.linear(x.double(), w64, b.double()), t.double()), w64,
                                  create_graph=True)
    (dw64 ** 2).sum().backward()
    assert_close(dw, dw64, FP32, "dW")
    assert_close(w.grad, w64.grad, FP32, "d/dW ‖dW‖²")


def test_double_backward_of_a_loss_with_an_optimizer_is_refused(backend):
    x, y = _problem(seed=2)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    loss = model.loss(x, y, optimizer=FusedSGD(model.parameters(), lr=0.1, backend=backend))
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, model.weight, create_graph=True)


# ------------------------------------------------------------ row_index
def _step_loss(backend, x, y, rows, **kwargs):
    # Initialised on the CPU from the seed, as the reference nn.Linear is, then moved:
    # the CPU and CUDA generators draw different numbers from one seed.
    model = FusedLinearRegressor(3, 2, backend=backend)
    torch.manual_seed(0)
    model.reset_parameters()
    model.to(DEVICE)
    return fused_sgd_step(x, model.weight, model.bias, y, FusedSGD(model.parameters(), lr=0.0, backend=backend),
                          row_index=rows, backend=backend, **kwargs)


def test_row_index_strides_are_honoured(backend):
    x, y = _problem(seed=3)
    strided = torch.arange(0, 22, 2, device=DEVICE)[::2]  # non-contiguous: rows 0, 4, 8, ...
    assert not strided.is_contiguous()
    loss = _step_loss(backend, x, y, strided)
    torch.manual_seed(0)
    ref = nn.Linear(3, 2).to(DEVICE).double()
    rows = strided.cpu()
    expected = F.mse_loss(ref(x.cpu().double()[rows].to(DEVICE)), y.cpu().double()[rows].to(DEVICE))
    assert_close(loss, expected, FP32, "loss of the gathered rows")


@pytest.mark.parametrize("rows, error, match", [
    (torch.tensor([0, 23]), IndexError, "outside the 23 rows"),
    (torch.tensor([-1, 2]), IndexError, "outside the 23 rows"),
    (torch.tensor([0.0, 1.0]), TypeError, "int64 or int32"),
    (torch.tensor([[0, 1]]), ValueError, "1-D"),
    (torch.tensor([], dtype=torch.int64), ValueError, "non-empty"),
])
def test_bad_row_index_is_refused(rows, error, match, backend):
    x, y = _problem(seed=4)
    with pytest.raises(error, match=match):
        _step_loss(backend, x, y, rows.to(DEVICE))


def test_fused_sgd_step_checks_its_inputs(backend):
    x, y = _problem(seed=5)
    with pytest.raises(TypeError, match="floating-point"):
        _step_loss(backend, x.long(), y, None)
    with pytest.raises(ValueError, match="target has shape"):
        _step_loss(backend, x, y[:, :1], None)
    with pytest.raises(ValueError, match="reduction"):
        _step_loss(backend, x, y, None, reduction="max")


# ------------------------------------------------------------ empty shapes
def test_linear_without_input_features_returns_the_bias(backend):
    weight = torch.empty(4, 0, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, device=DEVICE, requires_grad=True)
    y = linear(torch.empty(6, 0, device=DEVICE), weight, bias, backend=backend)
    assert torch.equal(y, F.linear(torch.empty(6, 0, device=DEVICE), weight, bias))
    y.sum().backward()
    assert torch.equal(bias.grad, torch.full((4,), 6.0, device=DEVICE))


def test_linear_on_no_rows_has_zero_gradients(backend):
    weight = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, device=DEVICE, requires_grad=True)
    y = linear(torch.empty(0, 3, device=DEVICE), weight, bias, backend=backend)
    assert y.shape == (0, 4) and y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))
