"""The fused linear + MSE op: loss and every gradient against nn.Linear +
F.mse_loss in float64, on both backends (Triton runs through the interpreter
on the CPU)."""

import pytest
import torch
from conftest import DEVICE
from oracle import TOLERANCE, assert_close, linear_mse_grads, random_problem

from linreg_fused import linear_mse

# (N, D, O): 1-sized dims, sizes that are no multiple of any block, D over one
# block (the interpreter's D block is 64), and more row tiles than programs
# (16-row tiles, at most 4 programs on the CPU), so partials accumulate.
SHAPES = [(1, 1, 1), (5, 3, 2), (37, 5, 3), (50, 70, 1), (33, 130, 17), (130, 1, 4), (150, 70, 3)]


def _run(x, weight, bias, target, backend, reduction="mean", grad_scale=1.0):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    loss = linear_mse(x, weight, bias, target, reduction, backend=backend)
    (loss * grad_scale).backward()
    return loss, x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grads_match_float64(shape, reduction, backend):
    x, weight, bias, target = random_problem(*shape, device=DEVICE)
    loss, gx, gw, gb = _run(x, weight, bias, target, backend, reduction)
    ref = linear_mse_grads(x.requires_grad_(), weight, bias, target, reduction)
    tol = TOLERANCE[torch.float32]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref["loss"], tol, "loss")
    assert_close(gw, ref["weight"], tol, "dW")
    assert_close(gb, ref["bias"], tol, "db")
    assert_close(gx, ref["x"], tol, "dX")


def test_no_bias_and_target_grad(backend):
    x, weight, _, target = random_problem(19, 6, 3, device=DEVICE, bias=False)
    target.requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_mse(x, w, None, target, backend=backend)
    loss.backward()
    ref = linear_mse_grads(x, weight, None, target)
    assert_close(loss, ref["loss"], TOLERANCE[torch.float32], "loss")
    assert_close(w.grad, ref["weight"], TOLERANCE[torch.float32], "dW")
    assert_close(target.grad, ref["target"], TOLERANCE[torch.float32], "dT")


def test_loss_scaled_before_backward(backend):
    """grad_output is read on the device: (3·loss).backward() gives 3× the gradients."""
    x, weight, bias, target = random_problem(23, 7, 2, device=DEVICE)
    _, gx, gw, gb = _run(x, weight, bias, target, backend, grad_scale=3.0)
    ref = linear_mse_grads(x.requires_grad_(), weight, bias, target, grad_scale=3.0)
    for out, key in ((gx, "x"), (gw, "weight"), (gb, "bias")):
        assert_close(out, ref[key], TOLERANCE[torch.float32], key)


def test_grads_accumulate_like_autograd(backend):
    x, weight, bias, target = random_problem(11, 4, 2, device=DEVICE)
    w = weight.clone().requires_grad_()
    for _ in range(2):
        linear_mse(x, w, bias, target, backend=backend).backward()
    ref = linear_mse_grads(x, weight, bias, target, grad_scale=2.0)
    assert_close(w.grad, ref["weight"], TOLERANCE[torch.float32], "2 × dW")


def test_leading_dims_and_strided_inputs(backend):
    """(..., D) inputs, a transposed x and a non-contiguous target give nn.Linear's answer."""
    base = torch.randn(6, 29, device=DEVICE)
    x = base.t()  # (29, 6), strides (1, 29): no copy needed by the kernels
    weight = torch.randn(3, 6, device=DEVICE)
    bias = torch.randn(3, device=DEVICE)
    target = torch.randn(3, 29, device=DEVICE).t()
    loss, gx, gw, gb = _run(x, weight, bias, target, backend)
    ref = linear_mse_grads(x.requires_grad_(), weight, bias, target)
    assert_close(loss, ref["loss"], TOLERANCE[torch.float32], "loss")
    assert_close(gw, ref["weight"], TOLERANCE[torch.float32], "dW")
    assert_close(gx, ref["x"], TOLERANCE[torch.float32], "dX")

    x3 = torch.randn(4, 5, 6, device=DEVICE)
    t3 = torch.randn(4, 5, 3, device=DEVICE)
    loss3, gx3, gw3, _ = _run(x3, weight, bias, t3, backend)
    ref3 = linear_mse_grads(x3.requires_grad_(), weight, bias, t3)
    assert_close(loss3, ref3["loss"], TOLERANCE[torch.float32], "loss (3-D)")
    assert gx3.shape == x3.shape
    assert_close(gx3, ref3["x"], TOLERANCE[torch.float32], "dX (3-D)")


def test_deterministic_bitwise(backend):
    # On the CPU the interpreter runs programs one after another, so this cannot
    # catch a race or an order-dependent reduction; it catches only host-side
    # nondeterminism (e.g. an output read before it was fully written). The GPU
    # twin, test_gpu.py::test_deterministic_at_scale, can fail on a race.
    x, weight, bias, target = random_problem(97, 70, 5, device=DEVICE)
    first = _run(x, weight, bias, target, backend)
    second = _run(x, weight, bias, target, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradcheck_float64(backend):
    x, weight, bias, target = random_problem(9, 5, 3, dtype=torch.float64, device=DEVICE)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias, target))

    def f(x, w, b, t):
        return linear_mse(x, w, b, t, backend=backend)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_float64_matches_reference(backend):
    x, weight, bias, target = random_problem(31, 70, 3, dtype=torch.float64, device=DEVICE)
    loss, gx, gw, gb = _run(x, weight, bias, target, backend)
    ref = linear_mse_grads(x.requires_grad_(), weight, bias, target)
    assert loss.dtype == torch.float64
    for out, key in ((loss, "loss"), (gx, "x"), (gw, "weight"), (gb, "bias")):
        assert_close(out, ref[key], TOLERANCE[torch.float64], key)


def test_nan_in_inputs_propagates(backend):
    """No silent answer: a NaN in x gives a NaN loss, as F.mse_loss does."""
    x, weight, bias, target = random_problem(20, 4, 2, device=DEVICE)
    x[7, 2] = float("nan")
    assert torch.isnan(linear_mse(x, weight, bias, target, backend=backend))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("master_weights", [True, False], ids=["fp32-weights", "half-weights"])
def test_half_precision_inputs(half, master_weights, backend):
    """Half-precision x and target; fp32 (mixed precision) or half weights.
    Products and sums run in fp32; the reference is float64 on the same
    (rounded) half values, so the tolerance covers only the output rounding."""
    x, weight, bias, target = random_problem(45, 70, 3, device=DEVICE)
    x, target = x.to(half), target.to(half)
    if not master_weights:
        weight, bias = weight.to(half), bias.to(half)
    loss, gx, gw, gb = _run(x, weight, bias, target, backend)
    assert loss.dtype == (torch.float32 if master_weights else half)
    assert gw.dtype == weight.dtype and gx.dtype == half
    ref = linear_mse_grads(x.requires_grad_(), weight, bias, target)
    tol = TOLERANCE[torch.float32] if master_weights else TOLERANCE[half]
    assert_close(loss, ref["loss"], tol, "loss")
    assert_close(gw, ref["weight"], tol, "dW")
    assert_close(gb, ref["bias"], tol, "db")
    assert_close(gx, ref["x"], TOLERANCE[half], "dX")
