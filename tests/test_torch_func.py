"""torch.func over FusedLinearRegressor, as over nn.Linear: grad, vmap (per-sample gradients), jvp,
jacrev and hessian through torch.func.functional_call, of the forward and of the loss.

Under a transform the module computes with PyTorch's own ops (linreg_fused.functional:
F.linear, F.mse_loss), which every transform batches and differentiates; the answers are
compared with nn.Linear's in float64, where both must agree to rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from linreg_fused import FusedLinearRegressor, FusedSGD

TOL = 1e-12


def _models(backend, d=4, o=3):
    torch.manual_seed(0)
    ref = nn.Linear(d, o, dtype=torch.float64, device=DEVICE)
    ours = FusedLinearRegressor.from_linear(ref, backend=backend)
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    return ours, ref, params


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
        return
    if isinstance(a, tuple):
        for u, v in zip(a, b):
            _close(u, v)
        return
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=TOL, atol=TOL), (a - b).abs().max()


def _fused_loss(model, params, x, t):
    """model.loss(x, t) with the parameters given, through functional_call of the module's loss method."""
    class Loss(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            return self.inner.loss(x, t)

    return functional_call(Loss(model), {f"inner.{k}": v for k, v in params.items()}, (x, t))


def test_grad_of_the_loss_and_of_the_forward(backend):
    ours, ref, params = _models(backend)
    x, t = torch.randn(7, 4, dtype=torch.float64, device=DEVICE), torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    expected = grad(lambda p: F.mse_loss(functional_call(ref, p, (x,)), t))(params)
    _close(grad(lambda p: _fused_loss(ours, p, x, t))(params), expected)
    _close(grad(lambda p: functional_call(ours, p, (x,)).square().sum())(params),
           grad(lambda p: functional_call(ref, p, (x,)).square().sum())(params))


def test_per_sample_gradients_with_vmap(backend):
    ours, ref, params = _models(backend)
    x, t = torch.randn(6, 4, dtype=torch.float64, device=DEVICE), torch.randn(6, 3, dtype=torch.float64, device=DEVICE)

    def per_sample(loss):
        return vmap(grad(lambda p, xi, ti: loss(p, xi[None], ti[None])), in_dims=(None, 0, 0))(params, x, t)

    expected = per_sample(lambda p, xb, tb: F.mse_loss(functional_call(ref, p, (xb,)), tb))
    _close(per_sample(lambda p, xb, tb: _fused_loss(ours, p, xb, tb)), expected)
    _close(vmap(lambda xi: functional_call(ours, params, (xi,)))(x), vmap(lambda xi: ref(xi))(x))


def test_jvp_jacrev_and_hessian(backend):
    ours, ref, params = _models(backend)
    x, t = torch.randn(5, 4, dtype=torch.float64, device=DEVICE), torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    ref_loss = lambda p: F.mse_loss(functional_call(ref, p, (x,)), t)  # noqa: E731
    our_loss = lambda p: _fused_loss(ours, p, x, t)  # noqa: E731
    _close(jvp(our_loss, (params,), (tangents,)), jvp(ref_loss, (params,), (tangents,)))
    _close(jacrev(lambda p: functional_call(ours, p, (x,)))(params), jacrev(lambda p: functional_call(ref, p, (x,)))(params))
    _close(hessian(our_loss)(params), hessian(ref_loss)(params))
    _close(jvp(lambda xx: ours(xx), (x,), (torch.ones_like(x),)), jvp(lambda xx: ref(xx), (x,), (torch.ones_like(x),)))


def test_a_fused_step_under_a_transform_is_refused(backend):
    ours, _, params = _models(backend)
    opt = FusedSGD(ours.parameters(), lr=0.1)
    x, t = torch.randn(5, 4, dtype=torch.float64, device=DEVICE), torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="torch.func transform"):
        vmap(lambda xi, ti: ours.loss(xi[None], ti[None], optimizer=opt))(x, t)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_a_train_step_under_a_transform_is_refused(backend, transform):
    """train_step updates the parameters in place: under vmap it failed inside the op ("Batching rule
    not implemented for linreg_fused::reduce_update_"), under grad it stepped and returned a gradient."""
    ours, _, _ = _models(backend)
    opt = FusedSGD(ours.parameters(), lr=0.1)
    x, t = torch.randn(5, 4, dtype=torch.float64, device=DEVICE), torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    for _ in range(2):  # the repeat path planned too: it must not take a transform's tensors either
        ours.train_step(x, t, opt)
    before = [p.detach().clone() for p in ours.parameters()]
    with pytest.raises(ValueError, match="torch.func transform"):
        if transform == "vmap":
            vmap(lambda xi: ours.train_step(xi, t, opt))(x[None].expand(2, 5, 4))
        else:
            grad(lambda xx: ours.train_step(xx, t, opt))(x)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), before))
