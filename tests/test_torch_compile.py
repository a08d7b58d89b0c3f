"""torch.compile, torch.export and CUDA graphs over the registered ops.

fullgraph=True fails on any graph break, so each compiled function below is
one graph; the graphs must call linreg_fused's ops (not trace into the
launchers) and give the eager numbers bitwise (aot_eager runs the same ops
in the same order). Batch sizes are marked dynamic and the compiles counted:
a new N must not recompile. On the CPU, the Triton backend runs through the
interpreter; inductor runs where a C compiler is found (one test, ~15 s of
CPU for its C++ builds).
"""

import io
import shutil

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import DEVICE, requires_cuda
from oracle import TOLERANCE, assert_close
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD

SIZES = (5, 7, 12)  # batch sizes after the first: each must reuse the graph


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Recorder:
    """A torch.compile backend that counts the graphs it is given, keeps their code, and runs them with ``backend``."""

    def __init__(self, backend: str = "aot_eager") -> None:
        self.counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        self.code: list[str] = []

    def __call__(self, gm, example_inputs):
        self.code.append(gm.print_readable(print_output=False))
        return self.counter(gm, example_inputs)

    @property
    def graphs(self) -> int:
        return self.counter.frame_count

    def calls(self, op: str) -> bool:
        return any(f"linreg_fused.{op}" in code for code in self.code)


def _pair(backend, seed=0, in_features=4, out_features=3):
    """Two models with the same parameters: one to compile, one to run eagerly."""
    torch.manual_seed(seed)
    compiled = FusedLinearRegressor(in_features, out_features, backend=backend).to(DEVICE)
    eager = FusedLinearRegressor(in_features, out_features, backend=backend).to(DEVICE)
    eager.load_state_dict(compiled.state_dict())
    return compiled, eager


def _batch(n, in_features=4, out_features=3):
    x, t = torch.randn(n, in_features, device=DEVICE), torch.randn(n, out_features, device=DEVICE)
    for v in (x, t):
        torch._dynamo.mark_dynamic(v, 0)
    return x, t


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def test_compiled_loss_and_its_backward(backend):
    compiled, eager = _pair(backend)
    rec = _Recorder()
    loss_fn = torch.compile(lambda x, t: compiled.loss(x, t), backend=rec, fullgraph=True)
    for n in (9, *SIZES):
        x, t = _batch(n)
        loss = loss_fn(x, t)
        loss.backward()
        expected = eager.loss(x, t)
        expected.backward()
        assert torch.equal(loss, expected), n
        _assert_same(compiled, eager)
    assert rec.graphs == 1 and rec.calls("linear_mse")


def test_compiled_forward_and_backward_with_torch_sgd(backend):
    """loss.backward() inside the compiled region (dynamo traces it with trace_autograd_ops);
    torch.optim.SGD.step() outside it: SGD graph-breaks on purpose (torch.optim's
    _use_grad_for_differentiable), so no step function with it can be one graph."""
    compiled, eager = _pair(backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (compiled, eager)]
    rec = _Recorder()

    def forward_backward(x, t):
        loss = compiled.loss(x, t)
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(forward_backward, backend=rec, fullgraph=True)
        for n in (9, *SIZES):
            x, t = _batch(n)
            opts[0].zero_grad()
            loss = step(x, t)
            opts[0].step()
            opts[1].zero_grad()
            expected = eager.loss(x, t)
            expected.backward()
            opts[1].step()
            assert torch.equal(loss, expected.detach()), n
            _assert_same(compiled, eager)
    assert rec.graphs == 1 and rec.calls("linear_mse") and rec.calls("reduce_update_")


def test_compiled_whole_step_with_fused_sgd(backend):
    """FusedSGD.step(), unlike torch.optim.SGD.step(), traces: loss, backward and step in one graph."""
    compiled, eager = _pair(backend)
    opts = [FusedSGD(m.parameters(), lr=0.1, momentum=0.9, backend=backend) for m in (compiled, eager)]
    rec = _Recorder()

    def whole_step(x, t):
        loss = compiled.loss(x, t)
        loss.backward()
        opts[0].step()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch.compile(whole_step, backend=rec, fullgraph=True)
        for n in (9, *SIZES):
            x, t = _batch(n)
            opts[0].zero_grad()
            loss = step(x, t)
            opts[1].zero_grad()
            expected = eager.loss(x, t)
            expected.backward()
            opts[1].step()
            assert torch.equal(loss, expected.detach()), n
            _assert_same(compiled, eager)
    assert rec.graphs == 2  # before and after the momentum buffers exist
    assert rec.calls("linear_mse") and rec.calls("reduce_update_")


def test_compiled_fused_train_step(backend):
    compiled, eager = _pair(backend)
    opts = [FusedSGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, backend=backend)
            for m in (compiled, eager)]
    rec = _Recorder()
    step = torch.compile(compiled.train_step, backend=rec, fullgraph=True)
    for n in (9, *SIZES):
        x, t = _batch(n)
        loss = step(x, t, opts[0])
        expected = eager.train_step(x, t, opts[1])
        assert torch.equal(loss, expected), n
        _assert_same(compiled, eager)
        for p, q in zip(compiled.parameters(), eager.parameters()):
            assert torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"])
    # Two graphs: the first step creates the momentum buffers (SGD's first step sets them to the
    # gradient), every later step, whatever its N, runs the second.
    assert rec.graphs == 2
    assert rec.calls("linear_mse_partials") and rec.calls("reduce_update_")


def test_compiled_inference():
    model = nn.Sequential(FusedLinearRegressor(4, 3), nn.Tanh()).to(DEVICE)
    rec = _Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        for n in (9, *SIZES):
            x, _ = _batch(n)
            assert torch.equal(compiled(x), model(x))
    assert rec.graphs == 1 and rec.calls("linear")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_inductor_calls_the_ops_and_matches_eager():
    """Inductor keeps each op as a call (an extern kernel) and compiles the small torch ops around it."""
    compiled, eager = _pair("triton")
    opts = [FusedSGD(m.parameters(), lr=0.05, momentum=0.9, backend="triton") for m in (compiled, eager)]
    rec = _Recorder("inductor")
    step = torch.compile(compiled.train_step, backend=rec, fullgraph=True)
    loss_fn = torch.compile(lambda x, t: compiled.loss(x, t), backend=rec, fullgraph=True)
    for n in (9, 6):
        x, t = _batch(n)
        assert_close(step(x, t, opts[0]), eager.train_step(x, t, opts[1]), TOLERANCE[torch.float32], "step loss")
        loss = loss_fn(x, t)
        loss.backward()
        expected = eager.loss(x, t)
        expected.backward()
        assert_close(loss, expected, TOLERANCE[torch.float32], "loss")
        for p, q in zip(compiled.parameters(), eager.parameters()):
            assert_close(p, q, TOLERANCE[torch.float32], "parameter")
            assert_close(p.grad, q.grad, TOLERANCE[torch.float32], "gradient")
    assert rec.graphs == 3  # the loss, and the fused step before and after its momentum buffers exist
    assert rec.calls("linear_mse") and rec.calls("reduce_update_")


def test_export_keeps_the_op_in_the_graph():
    model = nn.Sequential(FusedLinearRegressor(4, 3), nn.Tanh()).to(DEVICE)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(5, 4, device=DEVICE),), dynamic_shapes=({0: batch},))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "linreg_fused.linear.default" in targets
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    with torch.no_grad():
        for n in (2, 9):
            x = torch.randn(n, 4, device=DEVICE)
            assert torch.equal(loaded(x), model(x))


@requires_cuda
def test_train_step_captures_in_a_cuda_graph_and_replays_bitwise():
    graphed, eager = _pair("triton")
    opts = [FusedSGD(m.parameters(), lr=0.05, momentum=0.9) for m in (graphed, eager)]
    batches = [(torch.randn(64, 4, device="cuda"), torch.randn(64, 3, device="cuda")) for _ in range(4)]
    static_x, static_t = (v.clone() for v in batches[0])
    for m, opt in ((graphed, opts[0]), (eager, opts[1])):  # the first step (buffers created, kernels compiled)
        m.train_step(*batches[0], opt)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step's two launches; runs nothing
        static_loss = graphed.train_step(static_x, static_t, opts[0])
    for x, t in batches[1:]:
        static_x.copy_(x), static_t.copy_(t)
        graph.replay()
        expected = eager.train_step(x, t, opts[1])
        torch.cuda.synchronize()
        assert torch.equal(static_loss, expected)
        _assert_same(graphed, eager)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_jit_trace_passes_its_check_and_saves_a_differentiable_module(backend):
    # torch.jit.trace retraces under no_grad to check the graph: the forward must trace to one graph in
    # any grad mode, one TorchScript can save, whose gradients are nn.Linear's.
    model = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    traced = torch.jit.trace(model, torch.randn(5, 4, device=DEVICE))  # check_trace=True: the default
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(9, 4, device=DEVICE)
    w, b = (p.detach().double().requires_grad_() for p in (model.weight, model.bias))
    ref = torch.nn.functional.linear(x.double(), w, b)
    ref.square().sum().backward()
    out = loaded(x)
    assert_close(out, ref, TOLERANCE[torch.float32], "traced output")
    out.square().sum().backward()
    assert_close(loaded.weight.grad, w.grad, TOLERANCE[torch.float32], "weight gradient")
    assert_close(loaded.bias.grad, b.grad, TOLERANCE[torch.float32], "bias gradient")


class _Loss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, target):
        return self.model.loss(x, target)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_jit_trace_of_the_loss_passes_its_check_and_saves(backend):
    model = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    traced = torch.jit.trace(_Loss(model), (torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE)))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x, t = torch.randn(5, 4, device=DEVICE), torch.randn(5, 3, device=DEVICE)
    w, b = (p.detach().double().requires_grad_() for p in (model.weight, model.bias))
    ref = torch.nn.functional.mse_loss(torch.nn.functional.linear(x.double(), w, b), t.double())
    ref.backward()
    out = loaded(x, t)
    assert_close(out, ref, TOLERANCE[torch.float32], "traced loss")
    out.backward()
    assert_close(loaded.model.weight.grad, w.grad, TOLERANCE[torch.float32], "weight gradient")
