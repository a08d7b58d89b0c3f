"""Steps and losses at the edges: torch.compile with an LR schedule (a tensor lr), a compiled
loss(optimizer=).backward() without fullgraph (with momentum, the model as an argument), no outputs,
no features, no rows."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(backend, d=4, o=3):
    torch.manual_seed(0)
    a = FusedLinearRegressor(d, o, backend=backend).to(DEVICE)
    b = FusedLinearRegressor(d, o, backend=backend).to(DEVICE)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_compiled_train_step_follows_a_schedule_of_a_tensor_lr(backend, momentum):
    """fullgraph=True, StepLR on a tensor lr: one graph (two with momentum: before and after the
    buffers exist) for every step, the eager steps' numbers bitwise, and the schedule's lr applied
    (against torch.optim.SGD in float64 with the same schedule)."""
    compiled, eager = _pair(backend)
    ref = nn.Linear(4, 3, dtype=torch.float64, device=DEVICE)
    ref.load_state_dict({k: v.double() for k, v in compiled.state_dict().items()})
    opts = [FusedSGD(m.parameters(), lr=torch.tensor(0.2, device=DEVICE), momentum=momentum, backend=backend)
            for m in (compiled, eager)]
    ref_opt = torch.optim.SGD(ref.parameters(), lr=torch.tensor(0.2, dtype=torch.float64, device=DEVICE),
                              momentum=momentum)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.6) for o in (*opts, ref_opt)]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(compiled.train_step, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    for _ in range(10):  # past Dynamo's recompile limit of 8, had each lr recompiled
        x, t = torch.randn(9, 4, generator=g).to(DEVICE), torch.randn(9, 3, generator=g).to(DEVICE)
        loss = step(x, t, opts[0])
        assert torch.equal(loss, eager.train_step(x, t, opts[1]))
        ref_opt.zero_grad()
        F.mse_loss(ref(x.double()), t.double()).backward()
        ref_opt.step()
        for s in scheds:
            s.step()
    assert counter.frame_count == (2 if momentum else 1)
    for p, q, r in zip(compiled.parameters(), eager.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert torch.allclose(p.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sgd, as_argument", [
    (dict(weight_decay=0.01), False), (dict(momentum=0.9), False),
    (dict(momentum=0.9, nesterov=True, weight_decay=0.01), True), (dict(), True)],
    ids=["decay", "momentum", "nesterov-argument", "plain-argument"])
def test_compiled_fused_backward_without_fullgraph(backend, sgd, as_argument):
    """Dynamo runs the fused backward eagerly (a graph break) and must not trace into the launch
    helpers (under TRITON_INTERPRET that was Triton's interpreter: InterpreterError). The backward,
    run by autograd inside the compiled region, is compiled as a frame of its own: a momentum buffer
    it makes must not put a new key into optimizer.state there (Dynamo wrote the state back keyed by
    the parameter taken from ctx.saved_tensors after the step changed it: "modified by an inplace
    operation"). The model, optimizer and data as globals of the function or as its arguments."""
    compiled, eager = _pair(backend)
    opts = [FusedSGD(m.parameters(), lr=0.1, backend=backend, **sgd) for m in (compiled, eager)]

    if as_argument:
        def fused_step(model, optimizer, x, t):
            loss = model.loss(x, t, optimizer=optimizer)
            loss.backward()
            return loss.detach()
    else:
        def fused_step(x, t):
            loss = compiled.loss(x, t, optimizer=opts[0])
            loss.backward()
            return loss.detach()

    step = torch.compile(fused_step, backend="aot_eager")
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        x, t = torch.randn(9, 4, generator=g).to(DEVICE), torch.randn(9, 3, generator=g).to(DEVICE)
        expected = eager.loss(x, t, optimizer=opts[1])
        expected.backward()
        got = step(compiled, opts[0], x, t) if as_argument else step(x, t)
        assert torch.equal(got, expected.detach())
        for p, q in zip(compiled.parameters(), eager.parameters()):
            assert torch.equal(p, q)
            assert torch.equal(opts[0].state[p].get("momentum_buffer", p), opts[1].state[q].get("momentum_buffer", q))


@pytest.mark.parametrize("grad", [True, False])
def test_no_outputs_is_an_empty_prediction(backend, grad):
    model = FusedLinearRegressor(4, 0, backend=backend).to(DEVICE)
    x = torch.randn(3, 4, device=DEVICE)
    with torch.set_grad_enabled(grad):
        y = model(x)
    assert y.shape == (3, 0) and torch.equal(y, F.linear(x, model.weight, model.bias))
    with pytest.raises(ValueError, match="out_features=0"):
        model.loss(x, torch.randn(3, 0, device=DEVICE))


def test_no_features_is_the_loss_of_the_bias(backend):
    """0 features but 3 rows: the loss of the bias alone (as F.linear + F.mse_loss give), its
    gradient, and the fused step; not "empty batch"."""
    model = FusedLinearRegressor(0, 2, backend=backend).to(DEVICE)
    x, t = torch.randn(3, 0, device=DEVICE), torch.randn(3, 2, device=DEVICE)
    loss = model.loss(x, t)
    loss.backward()
    bias = model.bias.detach().clone().requires_grad_()
    expected = F.mse_loss(F.linear(x, model.weight.detach(), bias), t)
    expected.backward()
    assert torch.allclose(loss, expected) and torch.allclose(model.bias.grad, bias.grad)
    opt = FusedSGD(model.parameters(), lr=0.5, backend=backend)
    step_loss = model.train_step(x, t, opt)
    assert torch.allclose(step_loss, expected)
    assert torch.allclose(model.bias, bias.detach() - 0.5 * bias.grad)


def test_no_rows_is_an_empty_batch(backend):
    model = FusedLinearRegressor(4, 2, backend=backend).to(DEVICE)
    with pytest.raises(ValueError, match=r"empty batch: x has shape \(0, 4\) \(no rows\)"):
        model.loss(torch.randn(0, 4, device=DEVICE), torch.randn(0, 2, device=DEVICE))



def _stepped(model, opt, x, t, path):
    if path == "train_step":
        model.train_step(x, t, opt)
    elif path == "loss":
        model.loss(x, t, optimizer=opt).backward()
    else:
        opt.zero_grad()
        model.loss(x, t).backward()
        opt.step()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("path", ["train_step", "loss", "step"])
@pytest.mark.parametrize("shape", [(1, 4), (12,), (4, 3)], ids=["broadcastable", "flat", "transposed"])
def test_a_momentum_buffer_of_another_shape_raises_before_any_update(backend, path, shape):
    """A momentum buffer whose shape is not its parameter's (set by hand, or loaded from another
    model's state) is refused, as torch.optim.SGD refuses it, before anything changes: the kernels
    read and wrote it as the parameter's O·D elements (past its end)."""
    model = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    x, t = torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    for _ in range(2):  # the second step is a repeat step where there is one: its guards see the new buffer
        _stepped(model, opt, x, t, path)
    opt.state[model.weight]["momentum_buffer"] = torch.zeros(shape, device=DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="momentum_buffer .* has shape"):
        _stepped(model, opt, x, t, path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("path", ["train_step", "loss"])
def test_a_new_buffer_is_dropped_when_the_next_parameter_fails(path):
    """The weight's first momentum step makes its (zero) buffer, then the bias's buffer is refused:
    the step updates nothing and leaves no zero buffer, which the next step would take for a real one."""
    model = FusedLinearRegressor(4, 3, backend="triton").to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[model.bias]["momentum_buffer"] = torch.zeros(6, device=DEVICE)
    x, t = torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="momentum_buffer .* has shape"):
        _stepped(model, opt, x, t, path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert "momentum_buffer" not in opt.state[model.weight]
