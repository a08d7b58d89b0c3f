"""FusedLinearRegressor as a drop-in for nn.Linear, and clear errors for bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close, linear_mse_grads
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD, linear, linear_mse
from linreg_fused.backend import interpreter_enabled, select_ops


@pytest.mark.parametrize("bias", [True, False])
def test_same_init_parameters_and_state_dict_as_nn_linear(bias):
    torch.manual_seed(7)
    ref = nn.Linear(5, 3, bias=bias)
    torch.manual_seed(7)
    model = FusedLinearRegressor(5, 3, bias=bias)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert model.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.weight.shape == (3, 5) and model.weight.requires_grad


def test_state_dict_round_trips_with_nn_linear():
    ref = nn.Linear(4, 2)
    model = FusedLinearRegressor(4, 2)
    model.load_state_dict(ref.state_dict())
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)
    with torch.no_grad():
        model.weight.mul_(-2.0)
    back = nn.Linear(4, 2)
    back.load_state_dict(model.state_dict())
    assert torch.equal(back.weight, model.weight)
    assert torch.equal(FusedLinearRegressor.from_linear(ref).weight, ref.weight)


def test_from_linear_keeps_frozen_parameters_frozen(backend):
    """A frozen bias (or weight) of the nn.Linear stays frozen in the copy, so training it changes what
    training the nn.Linear would (it came back trainable: the bias moved where nn.Linear's would not)."""
    import torch.nn.functional as F

    from linreg_fused import FusedSGD

    for frozen in ("bias", "weight"):
        ref = nn.Linear(3, 2).double()
        getattr(ref, frozen).requires_grad_(False)
        model = FusedLinearRegressor.from_linear(ref, backend=backend)
        assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in ref.parameters()]
        x, t = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
        model.train_step(x, t, FusedSGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
        opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
        F.mse_loss(ref(x), t).backward()
        opt.step()
        assert torch.allclose(model.weight, ref.weight, rtol=1e-12, atol=1e-14), frozen
        assert torch.allclose(model.bias, ref.bias, rtol=1e-12, atol=1e-14), frozen


def test_repr_like_nn_linear():
    assert repr(FusedLinearRegressor(3, 2)) == "FusedLinearRegressor(in_features=3, out_features=2, bias=True)"
    assert "backend='torch'" in repr(FusedLinearRegressor(3, 2, bias=False, backend="torch"))


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (4, 3, 70)], ids=str)
def test_forward_equals_nn_linear(shape, backend):
    d = shape[-1]
    ref = nn.Linear(d, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(ref, backend=backend)
    x = torch.randn(*shape, device=DEVICE)
    expected = nn.Linear(d, 3).double().to(DEVICE)
    expected.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        out = model(x)
        assert out.shape == (*shape[:-1], 3)
        assert_close(out, expected(x.double()), TOLERANCE[torch.float32], "no_grad forward")
    # With autograd on, the same values and nn.Linear's gradients.
    xg = x.clone().requires_grad_()
    out = model(xg)
    out.square().sum().backward()
    xr = x.double().clone().requires_grad_()
    expected(xr).square().sum().backward()
    assert_close(out, expected(x.double()), TOLERANCE[torch.float32], "forward")
    assert_close(xg.grad, xr.grad, TOLERANCE[torch.float32], "dX")
    assert_close(model.weight.grad, expected.weight.grad, TOLERANCE[torch.float32], "dW")
    assert_close(model.bias.grad, expected.bias.grad, TOLERANCE[torch.float32], "db")


def test_strided_forward(backend):
    model = FusedLinearRegressor(6, 2, backend=backend).to(DEVICE)
    x = torch.randn(6, 21, device=DEVICE).t()
    with torch.no_grad():
        assert_close(model(x), nn.functional.linear(x.double(), model.weight.double(), model.bias.double()),
                     TOLERANCE[torch.float32], "strided forward")


def test_module_loss_matches_mse(backend):
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    x, y = torch.randn(15, 3, device=DEVICE) * 50, torch.randn(15, 2, device=DEVICE) * 50
    ref = nn.functional.mse_loss(nn.functional.linear(x.double(), model.weight.double(), model.bias.double()),
                                 y.double())
    assert_close(model.loss(x, y), ref, TOLERANCE[torch.float32], "loss")
    assert_close(model.loss(x, y, "sum"), ref * 30, TOLERANCE[torch.float32], "sum loss")


# ---------------------------------------------------------------- training steps
@pytest.mark.parametrize("how", ["train_step", "in-backward", "torch-sgd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_steps_follow_the_reduction(reduction, how, backend):
    """train_step and loss(optimizer=).backward() step on F.mse_loss(..., reduction)
    like torch.optim.SGD after a float64 backward; the returned loss is that loss."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(9, 4, generator=g).to(DEVICE), torch.randn(9, 3, generator=g).to(DEVICE))
               for _ in range(5)]
    start = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(start, backend=backend)
    options = dict(lr=0.01, momentum=0.6, dampening=0.2)
    opt = torch.optim.SGD(model.parameters(), **options) if how == "torch-sgd" else FusedSGD(
        model.parameters(), backend=backend, **options)
    ref = nn.Linear(4, 3).double().to(DEVICE)
    ref.load_state_dict({k: v.double() for k, v in start.state_dict().items()})
    ref_opt = torch.optim.SGD(ref.parameters(), **options)
    for x, y in batches:
        if how == "in-backward":
            loss = model.loss(x, y, reduction, optimizer=opt)
            loss.backward()
        else:
            loss = model.train_step(x, y, opt, reduction)
        ref_opt.zero_grad()
        ref_loss = nn.functional.mse_loss(ref(x.double()), y.double(), reduction=reduction)
        ref_loss.backward()
        ref_opt.step()
        assert_close(loss, ref_loss, TOLERANCE[torch.float32] * 10, f"{reduction} loss")
    for name in ("weight", "bias"):
        p, r = getattr(model, name), getattr(ref, name)
        assert_close(p, r, 1e-5, name)
        assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"], 1e-5, f"{name} buffer")


@pytest.mark.parametrize("how", ["train_step", "in-backward"])
@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_steps_leave_a_frozen_parameter_alone(frozen, how, backend):
    x, y = torch.randn(12, 4, device=DEVICE), torch.randn(12, 2, device=DEVICE)
    start = nn.Linear(4, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(start, backend=backend)
    getattr(model, frozen).requires_grad_(False)
    before = getattr(model, frozen).detach().clone()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.5, backend=backend)
    for _ in range(2):
        if how == "train_step":
            model.train_step(x, y, opt)
        else:
            model.loss(x, y, optimizer=opt).backward()
    assert torch.equal(getattr(model, frozen), before)
    assert "momentum_buffer" not in opt.state[getattr(model, frozen)]
    ref = nn.Linear(4, 2).double().to(DEVICE)
    ref.load_state_dict({k: v.double() for k, v in start.state_dict().items()})
    getattr(ref, frozen).requires_grad_(False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x.double()), y.double()).backward()
        ref_opt.step()
    trained = "bias" if frozen == "weight" else "weight"
    assert_close(getattr(model, trained), getattr(ref, trained), 1e-5, trained)


# ---------------------------------------------------------------- bad input
def _bad_cases():
    x, w, b, t = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2), torch.randn(4, 2)
    return {
        "feature count": ((torch.randn(4, 5), w, b, t), ValueError, "features"),
        "target shape": ((x, w, b, torch.randn(4, 3)), ValueError, "target has shape"),
        "target rows": ((x, w, b, torch.randn(5, 2)), ValueError, "target has shape"),
        "integer x": ((x.long(), w, b, t), TypeError, "floating-point"),
        "integer target": ((x, w, b, t.long()), TypeError, "floating-point"),
        "x/target dtype": ((x, w, b, t.double()), TypeError, "target is torch.float64"),
        "x/weight dtype": ((x.double(), w, b, t.double()), TypeError, "mixed precision"),
        "bias dtype": ((x, w, b.double(), t), TypeError, "bias is torch.float64"),
        "bias shape": ((x, w, torch.randn(3), t), ValueError, "bias must have shape"),
        "weight dims": ((x, w.reshape(-1), b, t), ValueError, "2-D"),
        "empty batch": ((x[:0], w, b, t[:0]), ValueError, "empty batch"),
        "devices": ((x, w.to("meta"), b.to("meta"), t), ValueError, "device"),
        "not a tensor": ((x.tolist(), w, b, t), TypeError, "torch.Tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_a_clear_error(case):
    args, error, words = _bad_cases()[case]
    for backend in ("triton", "torch"):
        with pytest.raises(error, match=words):
            linear_mse(*args, backend=backend)


def test_bad_options():
    x, w, t = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="reduction"):
        linear_mse(x, w, None, t, "none")
    with pytest.raises(ValueError, match="input_precision"):
        linear_mse(x, w, None, t, input_precision="fp8")
    with pytest.raises(ValueError, match="backend"):
        linear_mse(x, w, None, t, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        FusedLinearRegressor(3, 2, backend="jax")
    with pytest.raises(ValueError, match="features"):
        linear(torch.randn(4, 4), w)


def test_mixed_precision_half_inputs_with_float32_weights(backend):
    """Half-precision x with fp32 master weights is allowed: computed in fp32,
    float32 loss, output and weight gradients (nn.Linear would raise on the mix)."""
    x, t = torch.randn(21, 5, device=DEVICE), torch.randn(21, 2, device=DEVICE)
    weight, bias = torch.randn(2, 5, device=DEVICE), torch.randn(2, device=DEVICE)
    for half in (torch.bfloat16, torch.float16):
        xh, th = x.to(half), t.to(half)
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = linear_mse(xh, w, b, th, backend=backend)
        loss.backward()
        assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
        ref = linear_mse_grads(xh, weight, bias, th)
        assert_close(loss, ref["loss"], TOLERANCE[torch.float32], f"{half} loss")
        assert_close(w.grad, ref["weight"], TOLERANCE[torch.float32], f"{half} dW")
        assert_close(b.grad, ref["bias"], TOLERANCE[torch.float32], f"{half} db")

        w.grad = None
        y = linear(xh, w, b, backend=backend)
        assert y.dtype == torch.float32
        assert_close(y, xh.double() @ weight.double().t() + bias.double(), TOLERANCE[torch.float32], f"{half} y")
        y.square().sum().backward()
        w64 = weight.double().requires_grad_()
        (xh.double() @ w64.t() + bias.double()).square().sum().backward()
        assert_close(w.grad, w64.grad, TOLERANCE[torch.float32], f"{half} dW through the forward")


def test_backend_selection():
    assert select_ops("torch", torch.device("cpu")).name == "torch"
    assert select_ops("triton", DEVICE).name == "triton"
    # auto runs the kernels wherever they can run: CUDA, or the CPU with the interpreter on (as in these tests).
    assert select_ops("auto", DEVICE).name == ("triton" if DEVICE.type == "cuda" or interpreter_enabled() else "torch")
    assert select_ops("auto", torch.device("meta")).name == "torch"
    with pytest.raises(RuntimeError, match="cannot run here"):
        select_ops("triton", torch.device("meta"))


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_ops("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_ops("triton", torch.device("cpu"))


def test_interpreter_switched_on_too_late_says_why(tmp_path):
    """Triton builds its own functions when first imported; turning the
    interpreter on after that cannot work, and the error says so."""
    import subprocess
    import sys

    code = """
import os, torch
from torch import nn
m = nn.Linear(2, 2)
torch.optim.SGD(m.parameters(), lr=0.1).step()  # imports triton.language
import triton.language
os.environ["TRITON_INTERPRET"] = "1"
from linreg_fused import linear_mse
x, w, t = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
print(float(linear_mse(x, w, None, t)))  # auto: falls back to the reference
try:
    linear_mse(x, w, None, t, backend="triton")
except RuntimeError as err:
    print(err)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "was set after Triton was imported" in out


@pytest.mark.parametrize("how", ["train_step", "loss", "fit"])
def test_module_hooks_run_in_the_loss_and_the_steps_as_model_x_runs_them(how, backend):
    """A forward pre-hook that scales the input and torch.nn.utils.prune's (it recomputes the weight from
    weight_orig and a mask) run in loss, train_step and fit as they run in nn.Linear + F.mse_loss."""
    from torch.nn.utils import prune
    from torch.utils.data import DataLoader, TensorDataset

    x, t = torch.randn(6, 4, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    mask = torch.rand(3, 4, device=DEVICE) > 0.5
    ref = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(ref, backend=backend)
    ref = ref.double()
    for m in (model, ref):
        prune.custom_from_mask(m, "weight", mask)
        m.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.05), torch.optim.SGD(ref.parameters(), lr=0.05)
    g_fit, g_loader = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    if how == "fit":
        model.fit(x, t, epochs=2, batch_size=4, optimizer=opt, generator=g_fit)
    for _ in range(2):
        for xb, tb in DataLoader(TensorDataset(x.double(), t.double()), batch_size=4 if how == "fit" else 6,
                                 shuffle=how == "fit", generator=g_loader):
            ref_opt.zero_grad()
            F.mse_loss(ref(xb), tb).backward()
            ref_opt.step()
            if how == "train_step":
                model.train_step(xb.float(), tb.float(), opt)
            elif how == "loss":
                opt.zero_grad()
                model.loss(xb.float(), tb.float()).backward()
                opt.step()
    assert_close(model.weight_orig, ref.weight_orig, TOLERANCE[torch.float32], "weight_orig")
    assert_close(model.bias, ref.bias, TOLERANCE[torch.float32], "bias")
    assert_close(model.loss(x, t), F.mse_loss(ref(x.double()), t.double()), TOLERANCE[torch.float32], "loss")
    with pytest.raises(ValueError, match="hooks"):  # the step in the backward cannot see the hooks' graph
        model.loss(x, t, optimizer=opt)


@pytest.mark.parametrize("how", ["train_step", "fit"])
def test_a_forward_pre_hook_alone_runs_in_the_steps(how, backend):
    """An input-scaling pre-hook on a model whose own parameters are plain (no prune, no parametrize): the
    steps must see it as model(x) does (the fused path would train on the unscaled input)."""
    x, t = torch.randn(6, 4, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    ref = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(ref, backend=backend)
    ref = ref.double()
    for m in (model, ref):
        m.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.05), torch.optim.SGD(ref.parameters(), lr=0.05)
    if how == "fit":
        model.fit(x, t, epochs=2, optimizer=opt)
    for _ in range(2):
        ref_opt.zero_grad()
        F.mse_loss(ref(x.double()), t.double()).backward()
        ref_opt.step()
        if how == "train_step":
            model.train_step(x, t, opt)
    assert_close(model.weight, ref.weight, TOLERANCE[torch.float32], "weight")
    assert_close(model.bias, ref.bias, TOLERANCE[torch.float32], "bias")


@pytest.mark.parametrize("how", ["train_step", "fit"])
def test_a_parametrized_weight_is_trained_through_its_parameters(how, backend):
    """torch.nn.utils.parametrize: the weight is computed from parametrizations.weight.original, which the
    optimizer holds; the fused steps must train it (they updated the bias alone), loss(optimizer=) refuses."""
    from torch.nn.utils import parametrize

    class Halved(nn.Module):
        def forward(self, w):
            return w * 0.5

    x, t = torch.randn(6, 4, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    ref = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(ref, backend=backend)
    ref = ref.double()
    for m in (model, ref):
        parametrize.register_parametrization(m, "weight", Halved())
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        if how == "fit":
            model.fit(x, t, epochs=1, optimizer=opt)
        else:
            model.train_step(x, t, opt)
        ref_opt.zero_grad()
        F.mse_loss(ref(x.double()), t.double()).backward()
        ref_opt.step()
    original = model.parametrizations.weight.original
    assert_close(original, ref.parametrizations.weight.original, TOLERANCE[torch.float32], "weight's original")
    assert_close(model.bias, ref.bias, TOLERANCE[torch.float32], "bias")
    with pytest.raises(ValueError, match="parametrize"):
        model.loss(x, t, optimizer=opt)


@pytest.mark.parametrize("how", ["parametrize", "prune"])
def test_solve_refuses_a_computed_weight(how):
    """solve writes weight and bias in place: into a parametrized weight's temporary, or a pruned weight that the
    next forward recomputes, the solution was lost while solve returned its loss."""
    from torch.nn.utils import parametrize, prune

    model = FusedLinearRegressor(4, 3, backend="torch", device=DEVICE)
    if how == "parametrize":
        parametrize.register_parametrization(model, "weight", nn.Identity())
    else:
        prune.l1_unstructured(model, "weight", amount=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="parametrize"):
        model.solve(torch.randn(8, 4, device=DEVICE), torch.randn(8, 3, device=DEVICE))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_hooked_step_under_torch_distributed_is_refused(monkeypatch):
    """With hooks the step goes through model(x) and .grad on this rank's rows: under torch.distributed
    (where FusedSGD's step all-reduces) that would train each replica apart, so it is a clear error."""
    from linreg_fused import step_cache

    model = FusedLinearRegressor(4, 3, device=DEVICE)
    model.register_forward_pre_hook(lambda module, args: None)
    opt = FusedSGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(step_cache, "distributed", lambda: True)  # as after init_process_group
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        model.train_step(torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE), opt)
    assert torch.equal(model.weight, before)
    model.train_step(torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE), opt, process_group=False)
    assert not torch.equal(model.weight, before)
