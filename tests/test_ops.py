"""The registered ops (linreg_fused::*): torch.library.opcheck on both
backends (the Triton kernels run through the interpreter on the CPU), their
results against float64 references, the mutations their schemas declare,
and fake/meta tensors through the module."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close, linear_mse_grads, random_problem
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from linreg_fused import FusedLinearRegressor, FusedSGD, ops
from linreg_fused.kernels.specs import SGDHyper
from linreg_fused.reference import sgd_update_

FP32 = TOLERANCE[torch.float32]
OPS = ("linear", "linear_mse", "linear_mse_partials", "reduce_update_", "fit_small_")


def _opcheck(op, args, kwargs):
    result = torch.library.opcheck(op, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


def _sums(partials: torch.Tensor) -> torch.Tensor:
    return partials.double().sum(0)


# ---------------------------------------------------------------- opcheck and values
@pytest.mark.parametrize("bias", [True, False])
def test_linear_op(backend, bias):
    x, w, b, _ = random_problem(7, 5, 3, device=DEVICE, bias=bias)
    _opcheck(ops.linear, (x, w, b), {"backend": backend})
    y = ops.linear(x, w, b, backend=backend)
    assert_close(y, F.linear(x.double(), w.double(), None if b is None else b.double()), FP32, "y")


@pytest.mark.parametrize("keep_residual", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_mse_op(backend, keep_residual, reduction):
    x, w, b, t = random_problem(9, 4, 3, device=DEVICE)
    kwargs = {"reduction": reduction, "keep_residual": keep_residual, "backend": backend}
    _opcheck(ops.linear_mse, (x, w, b, t), kwargs)
    loss, partials, residual = ops.linear_mse(x, w, b, t, **kwargs)
    ref = linear_mse_grads(x, w, b, t, reduction=reduction)
    assert_close(loss, ref["loss"], FP32, "loss")
    r64 = F.linear(x.double(), w.double(), b.double()) - t.double()
    assert partials.shape[1] == 3 * 4 + 3 + 1
    assert_close(_sums(partials), torch.cat([(r64.t() @ x.double()).reshape(-1), r64.sum(0), (r64 ** 2).sum()[None]]),
                 FP32, "partial sums")
    if keep_residual:
        assert_close(residual, r64, FP32, "residual")
    else:
        assert residual.shape == (0, 3)


@pytest.mark.parametrize("with_rows", [True, False])
def test_linear_mse_partials_op(backend, with_rows):
    x, w, b, t = random_problem(11, 3, 2, device=DEVICE)
    rows = torch.tensor([4, 0, 9, 9, 2], device=DEVICE) if with_rows else None
    kwargs = {"backend": backend}
    _opcheck(ops.linear_mse_partials, (x, w, None, t, rows), kwargs)
    partials = ops.linear_mse_partials(x, w, None, t, rows, **kwargs)
    xs, ts = (x[rows], t[rows]) if with_rows else (x, t)
    r64 = xs.double() @ w.double().t() - ts.double()
    assert_close(_sums(partials), torch.cat([(r64.t() @ xs.double()).reshape(-1), r64.sum(0), (r64 ** 2).sum()[None]]),
                 FP32, "partial sums")


def test_reduce_update_op_writes_gradients(backend):
    partials = torch.randn(3, 4 * 2 + 2 + 1, device=DEVICE)
    grad_w, grad_b = torch.full((2, 4), float("nan"), device=DEVICE), torch.full((2,), float("nan"), device=DEVICE)
    grad_output = torch.tensor(1.5, device=DEVICE)
    args = (partials, grad_w, None, grad_b, None, grad_output)
    kwargs = {"col_starts": [0, 8], "sgd": [], "sgd2": [], "scale": 0.25, "loss_column": 10, "loss_scale": 2.0,
              "loss_dtype": torch.float64, "backend": backend}
    _opcheck(ops.reduce_update_, args, kwargs)
    loss = ops.reduce_update_(*args, **kwargs)
    sums = _sums(partials)
    assert_close(grad_w, (sums[:8] * 0.25 * 1.5).view(2, 4), FP32, "dW")
    assert_close(grad_b, sums[8:10] * 0.25 * 1.5, FP32, "db")
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert_close(loss, sums[10] * 2.0, FP32, "loss")
    no_loss = ops.reduce_update_(*args, **{**kwargs, "loss_column": None})
    assert no_loss.shape == (0,)


@pytest.mark.parametrize("first_step", [True, False])
def test_reduce_update_op_applies_sgd_in_place(backend, first_step):
    partials = torch.randn(2, 6 + 3 + 1, device=DEVICE)
    weight, bias = torch.randn(3, 2, device=DEVICE), torch.randn(3, device=DEVICE)
    w_buf, b_buf = torch.randn(3, 2, device=DEVICE), torch.randn(3, device=DEVICE)
    if first_step:  # a new buffer is zero-filled; the step sets it to the gradient
        w_buf.zero_(), b_buf.zero_()
    w_hyper = SGDHyper(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
    b_hyper = SGDHyper(lr=0.05, momentum=0.5, nesterov=True, maximize=True)
    kwargs = {"col_starts": [0, 6], "sgd": ops.pack_sgd(w_hyper, first_step),
              "sgd2": ops.pack_sgd(b_hyper, first_step), "scale": 0.5, "backend": backend}
    _opcheck(ops.reduce_update_, (partials, weight.clone(), w_buf.clone(), bias.clone(), b_buf.clone(), None), kwargs)

    sums = partials.double().sum(0) * 0.5
    expected = [t.double().clone() for t in (weight, w_buf, bias, b_buf)]
    sgd_update_(expected[0], sums[:6].view(3, 2), expected[1], w_hyper, init_buffer=first_step)
    sgd_update_(expected[2], sums[6:9], expected[3], b_hyper, init_buffer=first_step)
    ops.reduce_update_(partials, weight, w_buf, bias, b_buf, None, **kwargs)
    for out, ref, name in zip((weight, w_buf, bias, b_buf), expected, ("weight", "w_buf", "bias", "b_buf")):
        assert_close(out, ref, FP32, name)


def test_fit_small_op(backend):
    x, w, b, t = random_problem(10, 3, 2, device=DEVICE)
    orders = torch.stack([torch.randperm(10) for _ in range(2)]).to(DEVICE)
    hyper = ops.pack_sgd(SGDHyper(lr=0.05, momentum=0.5), True)
    args = (x, t, w.clone(), b.clone(), torch.zeros_like(w), torch.zeros_like(b), orders, torch.empty(2, 2, device=DEVICE))
    kwargs = {"batch_size": 4, "mean": True, "weight_sgd": hyper, "bias_sgd": hyper, "backend": backend}
    _opcheck(ops.fit_small_, args, kwargs)

    weight, bias, history = w.clone(), b.clone(), torch.empty(2, 2, device=DEVICE)
    ops.fit_small_(x, t, weight, bias, torch.zeros_like(w), torch.zeros_like(b), orders, history, **kwargs)
    ref = torch.nn.Linear(3, 2).double()
    ref.load_state_dict({"weight": w.double().cpu(), "bias": b.double().cpu()})
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5)
    for e in range(2):
        losses = []
        for i in range(0, 10, 4):
            rows = orders[e, i : i + 4].cpu()
            opt.zero_grad()
            loss = F.mse_loss(ref(x.double().cpu()[rows]), t.double().cpu()[rows])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(history[e, 0], torch.stack(losses).mean(), FP32, f"epoch {e} mean loss")
        assert_close(history[e, 1], losses[-1], FP32, f"epoch {e} last batch loss")
    assert_close(weight, ref.weight, FP32, "weight")
    assert_close(bias, ref.bias, FP32, "bias")

    # An empty SGD list leaves that parameter (and its buffer) untouched.
    frozen_bias, bias_buffer = b.clone(), torch.full_like(b, 0.5)
    ops.fit_small_(x, t, w.clone(), frozen_bias, torch.zeros_like(w), bias_buffer, orders,
                   torch.empty(2, 2, device=DEVICE), **{**kwargs, "bias_sgd": []})
    assert torch.equal(frozen_bias, b) and torch.equal(bias_buffer, torch.full_like(b, 0.5))



@pytest.mark.parametrize("shape", [(2,), (2, 1), (2, 4), (3, 2)])
def test_fit_small_op_refuses_a_history_it_would_write_out_of_bounds(shape):
    """The kernel writes 2 or 3 values per epoch row: a (2,) history was once written past its end."""
    x, w, b, t = random_problem(10, 3, 2, device=DEVICE)
    orders = torch.stack([torch.randperm(10) for _ in range(2)]).to(DEVICE)
    hyper = ops.pack_sgd(SGDHyper(lr=0.05), False)
    with pytest.raises(ValueError, match="history|permutations"):
        ops.fit_small_(x, t, w.clone(), b.clone(), None, None, orders, torch.empty(*shape, device=DEVICE),
                       batch_size=4, mean=True, weight_sgd=hyper, bias_sgd=hyper, backend="triton")

def test_mutating_ops_declare_what_they_write():
    def written(op):
        return {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}

    assert written(ops.reduce_update_) == {"out", "momentum_buffer", "out2", "momentum_buffer2"}
    assert written(ops.fit_small_) == {"weight", "bias", "weight_momentum", "bias_momentum", "history"}
    for name in ("linear", "linear_mse", "linear_mse_partials"):
        assert written(getattr(ops, name)) == set(), name
    assert {op.name() for op in map(lambda n: getattr(ops, n), OPS)} == {f"linreg_fused::{n}" for n in OPS}


def test_sgd_settings_round_trip():
    hyper = SGDHyper(lr=0.1, momentum=0.9, dampening=0.25, weight_decay=1e-4, nesterov=True, maximize=True)
    assert ops.unpack_sgd(ops.pack_sgd(hyper, True)) == (hyper, True)
    assert ops.unpack_sgd(ops.pack_sgd(None)) == (None, False)
    with pytest.raises(ValueError, match="7 values"):
        ops.unpack_sgd([0.1, 0.9])


# ---------------------------------------------------------------- fake and meta tensors
def test_module_on_meta_tensors():
    model = FusedLinearRegressor(5, 3, device="meta")
    x, t = torch.empty(8, 5, device="meta"), torch.empty(8, 3, device="meta")
    y = model(x)
    assert y.device.type == "meta" and y.shape == (8, 3)
    loss = model.loss(x, t)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert model.weight.grad.shape == (3, 5) and model.weight.grad.device.type == "meta"


def test_fake_tensors_trace_every_path(backend):
    # With a ShapeEnv, as torch.compile and torch.export make them: the partial buffer's row count is the
    # launch helper's choice, an unbacked size (plain FakeTensorMode() refuses such ops, as it does nonzero).
    with FakeTensorMode(shape_env=ShapeEnv()):
        model = FusedLinearRegressor(4, 2, backend=backend)
        opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
        x, t = torch.randn(6, 4), torch.randn(6, 2)
        assert model(x).shape == (6, 2)
        loss = model.loss(x, t)
        loss.backward()
        assert loss.shape == () and model.weight.grad.shape == (2, 4)
        step_loss = model.train_step(x, t, opt)
        assert step_loss.shape == () and step_loss.dtype == torch.float32
        model.loss(x, t, optimizer=opt).backward()
        opt.step()
