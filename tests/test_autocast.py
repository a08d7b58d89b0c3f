"""FusedLinearRegressor under torch.autocast, as nn.Linear + F.mse_loss: the forward returns
autocast's dtype (nn.Linear's output), the fused loss keeps its float32 products and sums on
both backends, eager and compiled alike."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn

from linreg_fused import FusedLinearRegressor

LOW = torch.bfloat16
# bfloat16 forward: a few ulps of 2**-8 relative; float32 loss and gradients against float64.
TOL_LOW, TOL_FP32 = 2e-2, 1e-5


def _pair(backend, d=5, o=3):
    ref = nn.Linear(d, o, device=DEVICE)
    return FusedLinearRegressor.from_linear(ref, backend=backend), ref


def test_forward_returns_autocasts_dtype_like_nn_linear(backend):
    ours, ref = _pair(backend)
    x = torch.randn(2, 7, 5, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=LOW):
        y, expected = ours(x), ref(x)
        y_no_grad = ours(x.detach())
    assert y.dtype == y_no_grad.dtype == expected.dtype == LOW
    exact = F.linear(x.detach().double(), ref.weight.double(), ref.bias.double())
    for out in (y, y_no_grad):
        assert torch.allclose(out.double(), exact, rtol=TOL_LOW, atol=TOL_LOW)
    y.float().sum().backward()  # the parameters' gradients stay float32, as nn.Linear's do
    assert ours.weight.grad.dtype == torch.float32 and x.grad.shape == x.shape


def test_loss_under_autocast_keeps_float32_products(backend):
    ours, _ = _pair(backend)
    x, t = torch.randn(9, 5, device=DEVICE), torch.randn(9, 3, device=DEVICE)
    x.requires_grad_()
    with torch.autocast(DEVICE.type, dtype=LOW):
        loss = ours.loss(x, t)
    loss.backward()
    xd, t64 = x.detach().double().requires_grad_(), t.double()
    w = ours.weight.detach().double().requires_grad_()
    b = ours.bias.detach().double().requires_grad_()
    expected = F.mse_loss(F.linear(xd, w, b), t64)
    expected.backward()
    assert loss.dtype == torch.float32
    for got, want in ((loss, expected), (ours.weight.grad, w.grad), (ours.bias.grad, b.grad), (x.grad, xd.grad)):
        assert torch.allclose(got.double(), want, rtol=TOL_FP32, atol=TOL_FP32), (got.double() - want).abs().max()


def test_compiled_forward_under_autocast_matches_eager():
    """The op's fake and its implementation agree on the dtype under autocast (the reference
    backend's F.linear used to drop to bfloat16 in eager only)."""
    ours, _ = _pair("torch")
    x = torch.randn(4, 5, device=DEVICE)
    compiled = torch.compile(lambda v: ours(v), fullgraph=True)
    with torch.autocast(DEVICE.type, dtype=LOW):
        eager, traced = ours(x), compiled(x)
    assert eager.dtype == traced.dtype == LOW
    assert torch.equal(eager, traced)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_train_step_under_autocast_steps_in_float32(backend, reduction):
    """train_step's partial sums (linear_mse_partials) run in float32 under autocast too."""
    from linreg_fused import FusedSGD

    ours, _ = _pair(backend)
    start = {k: v.detach().double().clone() for k, v in ours.named_parameters()}
    x, t = torch.randn(6, 5, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=LOW):
        ours.train_step(x, t, FusedSGD(ours.parameters(), lr=0.1), reduction)
    w, b = (start[k].requires_grad_() for k in ("weight", "bias"))
    F.mse_loss(F.linear(x.double(), w, b), t.double(), reduction=reduction).backward()
    assert torch.allclose(ours.weight.double(), w.detach() - 0.1 * w.grad, rtol=TOL_FP32, atol=TOL_FP32)
    assert torch.allclose(ours.bias.double(), b.detach() - 0.1 * b.grad, rtol=TOL_FP32, atol=TOL_FP32)
