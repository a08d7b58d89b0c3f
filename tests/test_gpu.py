"""GPU-only checks: compiled kernels (not the interpreter) on shapes the
interpreter cannot afford (several tiles along N, D and O), tf32, half
precision at scale, int64 offsets, races (bitwise determinism), fit's
one-launch, per-batch and CUDA-graph paths, and the automatic backend
choice. Every answer is checked against float64 eager PyTorch (nn.Linear +
F.mse_loss + optim.SGD over DataLoader's batches). Skipped without CUDA."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from oracle import (TF32_TOLERANCE, TOLERANCE, assert_close, assert_state_close, eager_fit, linear_mse_grads,
                    loader_orders, random_problem)
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD, linear_mse
from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields

pytestmark = requires_cuda
CUDA = torch.device("cuda")
TRAJECTORY_TOL = 5e-5  # fp32 fit vs float64 eager (as on the CPU; the measured error is ~1e-7)


def test_auto_backend_is_triton_on_cuda():
    assert select_ops("auto", CUDA).name == "triton"


@pytest.mark.parametrize("shape", [(4099, 64, 4), (1025, 256, 16), (513, 1000, 8), (300, 33, 70)], ids=str)
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_parity_at_scale(shape, precision, poisoned):
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


@pytest.mark.parametrize("shape", [(200_003, 64, 4), (100_003, 1000, 16), (50_001, 700, 70)], ids=str)
def test_deterministic_at_scale(shape):
    """Bitwise the same twice, with thousands of programs: a race (e.g. the
    chunked dW read-modify-write of D > BLOCK_D without its barrier) or an
    order-dependent reduction shows here, where the interpreter cannot see it.
    The loss and gradients must also be right, and so must a fused step's loss."""
    x, w, b, t = random_problem(*shape, device=CUDA)
    runs = []
    for _ in range(2):
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = linear_mse(x, wg, bg, t)
        loss.backward()
        model = FusedLinearRegressor(shape[1], shape[2], device=CUDA)
        model.load_state_dict({"weight": w, "bias": b})
        opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
        step_loss = model.train_step(x, t, opt)
        model.train_step(x, t, opt)
        runs.append((loss, wg.grad, bg.grad, step_loss, model.weight.detach(),
                     opt.state[model.weight]["momentum_buffer"]))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    ref = linear_mse_grads(x, w, b, t)
    tol = TOLERANCE[torch.float32] * 10
    assert_close(runs[0][0], ref["loss"], tol, "loss")
    assert_close(runs[0][1], ref["weight"], tol, "dW")
    assert_close(runs[0][2], ref["bias"], tol, "db")
    assert_close(runs[0][3], ref["loss"], tol, "train_step loss")


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


# (N, D, O, dtype, precision): the dot path tiles O in 64-wide blocks (O = 200: three and a ragged one) and D in
# 128-wide chunks; the FMA path (O < 16) tiles D; fp64 always takes the FMA path and tiles O in 16-wide blocks.
INFERENCE_CASES = [
    (10_001, 1000, 200, torch.float32, "ieee"),
    (4_099, 1000, 200, torch.float32, "tf32"),
    (10_001, 1000, 7, torch.float32, "ieee"),
    (2_049, 300, 70, torch.float64, "ieee"),
    (4_099, 256, 40, torch.bfloat16, "ieee"),  # bf16 x, fp32 weights
]


@pytest.mark.parametrize("n, d, o, dtype, precision", INFERENCE_CASES, ids=str)
def test_inference_matches_nn_linear(n, d, o, dtype, precision, poisoned):
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lin = nn.Linear(d, o, device=CUDA, dtype=param_dtype)
    model = FusedLinearRegressor.from_linear(lin, input_precision=precision)
    x = torch.randn(n, d, device=CUDA).to(dtype)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == param_dtype and y.shape == (n, o)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    tol = {"tf32": TF32_TOLERANCE}.get(precision, TOLERANCE[param_dtype] * 10)
    assert_close(y, ref, tol, f"inference {dtype} {precision}")


def test_minibatch_fit_on_gpu_matches_eager_loop():
    """The per-batch path (1024-row batches: no one-launch kernel) with its
    CUDA graph from the second epoch on, against the tutorial's loop in float64
    over DataLoader's batches: history, weight, bias, both momentum buffers."""
    x, y = random_problem(4096, 256, 16, device=CUDA)[::3]
    torch.manual_seed(0)
    model = FusedLinearRegressor(256, 16, device=CUDA)
    start = nn.Linear(256, 16, device=CUDA)
    start.load_state_dict(model.state_dict())
    opt = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
    history = model.fit(x, y, epochs=3, batch_size=1024, optimizer=opt, seed=0)
    ref, ref_opt, ref_history = eager_fit(start, x, y, loader_orders(4096, 3, 0), 1024, dict(lr=0.01, momentum=0.9))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


def test_tutorial_fit_on_gpu():
    """The tutorial (15 rows, batch 5: the one-launch kernel) on the GPU."""
    x, y = crop_yields(device=CUDA)
    torch.manual_seed(0)
    start = nn.Linear(3, 2).cuda()
    model = FusedLinearRegressor.from_linear(start)
    opt = FusedSGD(model.parameters(), lr=1e-5, momentum=0.5)
    h = model.fit(x, y, epochs=100, batch_size=5, optimizer=opt, seed=0, log_every=10, print_fn=lambda s: None)
    ref, ref_opt, h_ref = eager_fit(start, x, y, loader_orders(15, 100, 0), 5, dict(lr=1e-5, momentum=0.5))
    assert_close(torch.tensor(h), torch.tensor(h_ref), TRAJECTORY_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


def test_cuda_graph_epochs_match_eager_epochs():
    """fit's graphed per-batch path replays the same kernels in the same order."""
    x, y = random_problem(8192, 256, 16, device=CUDA)[::3]
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = FusedLinearRegressor(256, 16, device=CUDA)
        opt = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
        history = model.fit(x, y, epochs=4, batch_size=1024, optimizer=opt, seed=0, cuda_graph=graph)
        runs.append((history, *(t.detach().clone() for p in (model.weight, model.bias)
                                for t in (p, opt.state[p]["momentum_buffer"]))))
    assert runs[0][0] == runs[1][0]
    for eager, graphed in zip(runs[0][1:], runs[1][1:]):
        assert torch.equal(eager, graphed)


def test_fit_moves_cpu_data_to_the_model_device():
    x, y = crop_yields()  # CPU tensors, as a DataLoader or NumPy would give them
    torch.manual_seed(0)
    start = nn.Linear(3, 2)
    model = FusedLinearRegressor.from_linear(copy.deepcopy(start).cuda())
    history = model.fit(x, y, epochs=5, batch_size=5, lr=1e-5, seed=0)
    assert model.weight.device.type == "cuda" and x.device.type == "cpu"
    ref, ref_opt, ref_history = eager_fit(start, x, y, loader_orders(15, 5, 0), 5, dict(lr=1e-5))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")
