"""FusedLinearRegressor takes what nn.Linear takes: PyTorch's own module test inputs for
nn.Linear (module_db, including forward(input=x)), layer sizes given as NumPy integers;
and solve takes what a scikit-learn user has: NumPy arrays and a 1-D target."""

import numpy as np
import pytest
import torch
from conftest import DEVICE
from torch import nn
from torch.testing._internal.common_modules import module_db

from linreg_fused import FusedLinearRegressor

LINEAR_INFO = next(info for info in module_db if info.module_cls is nn.Linear)
# |error| / Σ|x·w| (the products' magnitude): one rounding of the output in half precision
# (bf16 2^-8, fp16 2^-11) with float32 accumulation; a float32 sum of ten products; float64.
MODULE_DB_TOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _forward_and_grads(reference_fn, module, params, inputs, grad_out):
    """The reference's output and its gradients in x, weight, bias, in float64."""
    params = [p.detach().double().requires_grad_() for p in params]
    inputs = [x.detach().double().requires_grad_() for x in inputs]
    out = reference_fn(module, params, *inputs)
    grads = torch.autograd.grad(out, inputs + params, grad_out.double())
    return [out.detach(), *grads]


@pytest.mark.parametrize("dtype", list(MODULE_DB_TOL), ids=str)
def test_pytorch_module_db_inputs_for_nn_linear(backend, dtype):
    """Each of module_db's nn.Linear cases (forward(input=x), no bias, no batch dim): the output
    and the gradients of x, weight and bias against the case's reference_fn in float64."""
    cases = LINEAR_INFO.module_inputs_func(LINEAR_INFO, device="cpu", dtype=dtype, requires_grad=True, training=True)
    assert len(cases) >= 3
    for case in cases:
        module = FusedLinearRegressor(*case.constructor_input.args, **case.constructor_input.kwargs,
                                      dtype=dtype, backend=backend)
        args, kwargs = case.forward_input.args, case.forward_input.kwargs
        out = module(*args, **kwargs)
        inputs = [*args, *kwargs.values()]
        grad_out = torch.randn(out.shape, dtype=dtype)
        got = [out, *torch.autograd.grad(out, inputs + list(module.parameters()), grad_out)]
        # The module's own reference function, called with module_db's signature (m, params, *inputs).
        reference_fn = case.reference_fn.__wrapped__
        ref = _forward_and_grads(reference_fn, module, list(module.parameters()), inputs, grad_out)
        size = _forward_and_grads(reference_fn, module, [p.abs() for p in module.parameters()],
                                  [x.abs() for x in inputs], grad_out.abs())
        for name, g, r, s in zip(["output", "grad input", "grad weight", "grad bias"], got, ref, size):
            assert g.dtype == dtype and g.shape == r.shape, (case.desc, name)
            err = float(((g.detach().double() - r).abs() / s.clamp_min(1e-30)).max())
            assert err <= MODULE_DB_TOL[dtype], (case.desc, name, err)


def test_forward_argument_is_named_input_like_nn_linear():
    x = torch.randn(3, 4)
    model = FusedLinearRegressor(4, 2, backend="torch")
    assert torch.equal(model(input=x), model(x))
    with pytest.raises(TypeError):
        model(x=x)


def test_layer_sizes_accept_numpy_integers_and_refuse_the_rest():
    model = FusedLinearRegressor(np.int64(4), np.int32(2), backend="torch")
    assert type(model.in_features) is int and type(model.out_features) is int
    assert model.weight.shape == (2, 4)
    assert repr(model) == "FusedLinearRegressor(in_features=4, out_features=2, bias=True, backend='torch')"
    for bad in (True, 3.0, "3", np.float64(3)):
        with pytest.raises(TypeError, match="in_features must be an integer"):
            FusedLinearRegressor(bad, 2)
    with pytest.raises(ValueError, match="out_features must be >= 0, got -1"):
        FusedLinearRegressor(3, -1)


def _lstsq(x, y):
    a = np.column_stack([x, np.ones(len(x))])
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return coef[:-1].T, coef[-1]


def test_solve_takes_numpy_arrays(backend, tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((61, 4)) * [1, 10, 0.1, 3] + 2
    y = x @ rng.standard_normal((4, 2)) + rng.standard_normal(2) + 0.1 * rng.standard_normal((61, 2))
    w, b = _lstsq(x, y)
    model = FusedLinearRegressor(4, 2, dtype=torch.float64, backend=backend, device=DEVICE)
    loss = model.solve(x, y)  # float64 arrays: float64 statistics
    np.testing.assert_allclose(model.weight.detach().cpu().numpy(), w, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(model.bias.detach().cpu().numpy(), b, rtol=1e-9, atol=1e-11)
    mse = float(np.mean((x @ w.T + b - y) ** 2))
    assert float(loss) == pytest.approx(mse, rel=1e-6)
    # the same as the tensors' solve; and from memory-mapped files, lists and integer arrays
    tensors = FusedLinearRegressor(4, 2, dtype=torch.float64, backend=backend, device=DEVICE)
    tensors.solve(torch.from_numpy(x), torch.from_numpy(y))
    torch.testing.assert_close(model.weight, tensors.weight, rtol=1e-12, atol=1e-12)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    mapped = FusedLinearRegressor(4, 2, dtype=torch.float64, backend=backend, device=DEVICE)
    mapped.solve(np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r"))
    torch.testing.assert_close(mapped.weight, model.weight, rtol=1e-12, atol=1e-12)
    x32 = x.astype(np.float32)  # float32 inputs with float64 targets: solved in float64
    mixed = FusedLinearRegressor(4, 2, dtype=torch.float64, backend=backend, device=DEVICE)
    mixed.solve(x32, y)
    np.testing.assert_allclose(mixed.weight.detach().cpu().numpy(), _lstsq(x32.astype(np.float64), y)[0],
                               rtol=1e-9, atol=1e-11)
    xi = rng.integers(-5, 6, (30, 2))
    yi = xi @ [[2], [-1]] + 3
    listed = FusedLinearRegressor(2, 1, dtype=torch.float64, backend=backend, device=DEVICE)
    listed.solve(xi.tolist(), yi)
    torch.testing.assert_close(listed.weight.cpu(), torch.tensor([[2.0, -1.0]], dtype=torch.float64))


def test_solve_takes_a_one_dimensional_target_for_one_output(backend):
    rng = np.random.default_rng()
    x = rng.standard_normal((442, 10))
    y = x @ rng.standard_normal(10) + 1.5 + 0.01 * rng.standard_normal(442)  # (442,), as scikit-learn takes it
    w, b = _lstsq(x, y)
    for xs, ys in ((x, y), (torch.from_numpy(x).to(DEVICE), torch.from_numpy(y).to(DEVICE))):
        model = FusedLinearRegressor(10, 1, dtype=torch.float64, backend=backend, device=DEVICE)
        model.solve(xs, ys)
        np.testing.assert_allclose(model.weight.detach().cpu().numpy()[0], w, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(float(model.bias.detach()), b, rtol=1e-8)
    with pytest.raises(ValueError, match=r"fits a model with one output; this one has 3.*\(442, 3\)"):
        FusedLinearRegressor(10, 3, backend=backend).solve(x, y)


def test_solve_argument_errors():
    model = FusedLinearRegressor(3, 1, backend="torch")
    with pytest.raises(TypeError, match="solve\\(x\\) needs the targets"):
        model.solve(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="give two tensors or two arrays"):
        model.solve(torch.zeros(4, 3), np.zeros(4))
    with pytest.raises(TypeError, match="inputs must hold real numbers"):
        model.solve(np.array([["a", "b", "c"]]), np.zeros(1))


@pytest.mark.parametrize("batch_size,statistics", [(None, None), (2, None), (None, True)])
def test_a_model_without_features_fits_its_bias(batch_size, statistics, backend):
    """in_features=0: fit trains the bias alone, as nn.Linear(0, O) + SGD does (it raised: reshape(-1, 0);
    the statistics path, from the target's moments, raised IndexError on the Triton backend)."""
    import torch.nn.functional as F

    from linreg_fused import FusedSGD

    x, t = torch.randn(5, 0, device=DEVICE), torch.randn(5, 2, device=DEVICE)
    model = FusedLinearRegressor(0, 2, backend=backend, device=DEVICE)
    ref = nn.Linear(0, 2, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ref.bias.copy_(model.bias)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    model.fit(x, t, epochs=2, batch_size=batch_size, shuffle=False, statistics=statistics,
              optimizer=FusedSGD(model.parameters(), lr=0.1, momentum=0.5))
    step = batch_size or 5
    for _ in range(2):
        for start in range(0, 5, step):
            ref_opt.zero_grad()
            F.mse_loss(ref(x[start : start + step].double()), t[start : start + step].double()).backward()
            ref_opt.step()
    torch.testing.assert_close(model.bias, ref.bias.float(), rtol=2e-6, atol=2e-7)
