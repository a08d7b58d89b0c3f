"""Non-contiguous tensors where the kernels take flat or strided memory:
FusedSGD.step() on transposed and sliced parameters, a training step on
transposed batches, fit on a column-major weight; against torch.optim.SGD
in float64."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import assert_close, assert_state_close, eager_fit, loader_orders
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD

STEP_TOL = 1e-5  # a few fp32 steps against float64 ones


@pytest.mark.parametrize("options", [dict(lr=0.1), dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)],
                         ids=["plain", "momentum"])
def test_step_on_non_contiguous_parameters(options, backend):
    """A transposed (O, D) weight and a strided bias: every step reaches the
    parameter itself, which keeps its strides, and the momentum buffers match."""
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 3, generator=g).to(DEVICE).t())  # (3, 5), strides (1, 3)
    bias = nn.Parameter(torch.randn(6, generator=g).to(DEVICE)[::2])  # (3,), stride 2
    assert not weight.is_contiguous() and not bias.is_contiguous()
    strides = (weight.stride(), bias.stride())
    refs = [nn.Parameter(p.detach().double().clone()) for p in (weight, bias)]
    opt = FusedSGD([weight, bias], backend=backend, **options)
    ref_opt = torch.optim.SGD(refs, **options)
    x, y = torch.randn(7, 5, generator=g).to(DEVICE), torch.randn(7, 3, generator=g).to(DEVICE)
    for _ in range(3):
        for params, o in (((weight, bias), opt), (refs, ref_opt)):
            o.zero_grad()
            F.mse_loss(F.linear(x.to(params[0].dtype), *params), y.to(params[0].dtype)).backward()
            o.step()
    assert (weight.stride(), bias.stride()) == strides
    for p, r, name in zip((weight, bias), refs, ("weight", "bias")):
        assert_close(p, r, STEP_TOL, name)
        if options.get("momentum"):
            assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"], STEP_TOL,
                         f"{name} buffer")


def test_train_step_on_transposed_batches(backend):
    """x and target as transposed views: the step reads them through their strides."""
    g = torch.Generator().manual_seed(1)
    start = nn.Linear(6, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(start, backend=backend)
    opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.5, backend=backend)
    ref = nn.Linear(6, 2).double().to(DEVICE)
    ref.load_state_dict({k: v.double() for k, v in start.state_dict().items()})
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5)
    for _ in range(3):
        x = torch.randn(6, 19, generator=g).to(DEVICE).t()
        y = torch.randn(2, 19, generator=g).to(DEVICE).t()
        loss = model.train_step(x, y, opt)
        ref_opt.zero_grad()
        ref_loss = F.mse_loss(ref(x.double()), y.double())
        ref_loss.backward()
        ref_opt.step()
        assert_close(loss, ref_loss, STEP_TOL, "loss")
    assert_close(model.weight, ref.weight, STEP_TOL, "weight")
    assert_close(model.bias, ref.bias, STEP_TOL, "bias")


def test_fit_with_non_contiguous_parameters(backend):
    """A model whose weight is stored column-major (e.g. loaded from a
    transposed checkpoint) trains like any other: fit must not hand it to a
    kernel that reads it as row-major."""
    x, y = torch.randn(23, 4, device=DEVICE), torch.randn(23, 3, device=DEVICE)
    start = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(start, backend=backend)
    model.weight.data = model.weight.data.t().contiguous().t()  # the same values, column-major
    assert not model.weight.is_contiguous()
    opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.5, backend=backend)
    history = model.fit(x, y, epochs=4, batch_size=6, optimizer=opt, seed=2)
    ref, ref_opt, ref_history = eager_fit(start, x, y, loader_orders(23, 4, 2), 6, dict(lr=0.05, momentum=0.5))
    assert_close(torch.tensor(history), torch.tensor(ref_history), STEP_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, STEP_TOL)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_step_on_strided_and_expanded_gradients(momentum, backend):
    """A .grad set by hand need not be contiguous: a 1-D slice (stride 2), an
    expanded one (stride 0) and a (3, 1) column of a wider tensor flatten to
    views whose elements are not adjacent; each step uses their values, as
    torch.optim.SGD does, in float64 (tolerance 1e-12)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4,), (5,), (3, 1)]
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE)) for s in shapes]
    refs = [nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedSGD(params, lr=0.1, momentum=momentum, backend=backend)
    ref_opt = torch.optim.SGD(refs, lr=0.1, momentum=momentum)
    for _ in range(3):
        grads = [torch.randn(8, generator=g, dtype=torch.float64).to(DEVICE)[::2],
                 torch.randn(1, generator=g, dtype=torch.float64).to(DEVICE).expand(5),
                 torch.randn(3, 2, generator=g, dtype=torch.float64).to(DEVICE)[:, :1]]
        assert not any(grad.is_contiguous() for grad in grads[:2])
        for p, r, grad in zip(params, refs, grads):
            p.grad, r.grad = grad, grad.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(params, refs):
        assert_close(p, r, 1e-12, "parameter")
