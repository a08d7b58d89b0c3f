"""GPU-only checks: compiled kernels (not the interpreter) on shapes the
interpreter cannot afford, tf32, half precision at scale, int64 offsets,
and the automatic backend choice. Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from oracle import TF32_TOLERANCE, TOLERANCE, assert_close, linear_mse_grads, random_problem
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD, linear_mse
from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields

pytestmark = requires_cuda
CUDA = torch.device("cuda")


def test_auto_backend_is_triton_on_cuda():
    assert select_ops("auto", CUDA).name == "triton"


@pytest.mark.parametrize("shape", [(4099, 64, 4), (1025, 256, 16), (513, 1000, 8), (300, 33, 70)], ids=str)
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_parity_at_scale(shape, precision):
    x, w, b, t = random_problem(*shape, device=CUDA)
    xg, wg, bg = (v.clone().requires_grad_() for v in (x, w, b))
    loss = linear_mse(xg, wg, bg, t, input_precision=precision)
    loss.backward()
    ref = linear_mse_grads(x.requires_grad_(), w, b, t)
    tol = TOLERANCE[torch.float32] * 10 if precision == "ieee" else TF32_TOLERANCE
    for out, key in ((loss, "loss"), (wg.grad, "weight"), (bg.grad, "bias"), (xg.grad, "x")):
        assert_close(out, ref[key], tol, f"{key} ({precision})")


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_with_fp32_master_weights_at_scale(half):
    x, w, b, t = random_problem(8191, 256, 16, device=CUDA)
    x, t = x.to(half), t.to(half)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = linear_mse(x, wg, bg, t)
    loss.backward()
    ref = linear_mse_grads(x, w, b, t)
    for out, key in ((loss, "loss"), (wg.grad, "weight"), (bg.grad, "bias")):
        assert_close(out, ref[key], TOLERANCE[torch.float32] * 10, key)


def test_deterministic_at_scale():
    x, w, b, t = random_problem(200_003, 64, 4, device=CUDA)
    runs = []
    for _ in range(2):
        wg = w.clone().requires_grad_()
        loss = linear_mse(x, wg, b, t)
        loss.backward()
        runs.append((loss, wg.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_int64_offsets():
    """N·D beyond 2³¹ elements (bf16, ~4.3 GB): offsets must not wrap."""
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    n, d, o = 2**31 // 64 + 4097, 64, 2
    x = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16)
    t = torch.randn(n, o, device=CUDA, dtype=torch.bfloat16)
    w, b = torch.randn(o, d, device=CUDA) / 8, torch.randn(o, device=CUDA)
    loss = linear_mse(x, w, b, t)
    tail = slice(n - 4096, n)  # rows past the 2³¹-element mark must be read: compare loss and a tail-only loss
    ref = F.mse_loss(F.linear(x.float(), w, b), t.float())
    assert_close(loss, ref, 1e-5, "loss over > 2³¹ elements")
    assert_close(linear_mse(x[tail], w, b, t[tail]), F.mse_loss(F.linear(x[tail].float(), w, b), t[tail].float()),
                 1e-5, "tail rows")


def test_inference_matches_nn_linear():
    lin = nn.Linear(1000, 8).cuda()
    model = FusedLinearRegressor.from_linear(lin)
    x = torch.randn(10_001, 1000, device=CUDA)
    with torch.no_grad():
        assert_close(model(x), F.linear(x.double(), lin.weight.double(), lin.bias.double()),
                     TOLERANCE[torch.float32] * 10, "inference")


def test_minibatch_fit_on_gpu_matches_reference_backend():
    x, y = random_problem(65536 // 16, 256, 16, device=CUDA)[::3]
    runs = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = FusedLinearRegressor(256, 16, device=CUDA, backend=backend)
        history = model.fit(x, y, epochs=3, batch_size=1024, optimizer=FusedSGD(model.parameters(), lr=0.01,
                            momentum=0.9, backend=backend), seed=0)
        runs.append((history, model.weight.detach()))
    assert_close(torch.tensor(runs[0][0]), torch.tensor(runs[1][0]), 1e-4, "history")
    assert_close(runs[0][1], runs[1][1], 1e-4, "weight")


def test_tutorial_fit_on_gpu():
    x, y = crop_yields(device=CUDA)
    torch.manual_seed(0)
    model = FusedLinearRegressor(3, 2, device=CUDA)
    ref = FusedLinearRegressor.from_linear(nn.Linear(3, 2).cuda(), backend="torch")
    ref.load_state_dict(model.state_dict())
    h = model.fit(x, y, epochs=100, batch_size=5, lr=1e-5, seed=0)
    h_ref = ref.fit(x, y, epochs=100, batch_size=5, lr=1e-5, seed=0)
    assert_close(torch.tensor(h), torch.tensor(h_ref), 1e-5, "history")
    assert_close(model.weight, ref.weight, 1e-5, "weight")


def test_cuda_graph_epochs_match_eager_epochs():
    """fit's graphed per-batch path replays the same kernels in the same order."""
    x, y = random_problem(8192, 256, 16, device=CUDA)[::3]
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = FusedLinearRegressor(256, 16, device=CUDA)
        opt = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
        history = model.fit(x, y, epochs=4, batch_size=1024, optimizer=opt, seed=0, cuda_graph=graph)
        runs.append((history, model.weight.detach().clone(), opt.state[model.weight]["momentum_buffer"].clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])


def test_fit_moves_cpu_data_to_the_model_device():
    x, y = crop_yields()  # CPU tensors, as a DataLoader or NumPy would give them
    model = FusedLinearRegressor(3, 2, device=CUDA)
    history = model.fit(x, y, epochs=5, batch_size=5, lr=1e-5, seed=0)
    assert len(history) == 5 and history[-1] < history[0]
