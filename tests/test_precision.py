"""input_precision="auto": which products the Triton kernels are asked for."""

import pytest
import torch
from conftest import DEVICE

from linreg_fused import FusedLinearRegressor, FusedSGD
from linreg_fused.backend import resolve_precision, select_ops


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("torch_setting, expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_auto_follows_torchs_float32_matmul_precision(matmul_precision, torch_setting, expected):
    matmul_precision(torch_setting)
    assert resolve_precision("auto", torch.float32) == expected
    # 16-bit inputs are exact in TF32: the split products, whatever the float32 setting.
    assert resolve_precision("auto", torch.bfloat16) == "tf32x3"
    assert resolve_precision("auto", torch.float16) == "tf32x3"
    assert resolve_precision("auto", torch.float64) == "ieee"


@pytest.mark.parametrize("explicit", ["ieee", "tf32", "tf32x3"])
def test_an_explicit_precision_is_kept(matmul_precision, explicit):
    matmul_precision("medium")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert resolve_precision(explicit, dtype) == explicit


def test_the_kernels_receive_the_resolved_precision(monkeypatch, matmul_precision):
    """The module's default reaches the launch helpers resolved, for the gradient and the forward."""
    ops = select_ops("triton", DEVICE)
    seen = []
    real_grad, real_forward = ops._passes.grad_partials, ops._passes.forward  # kernels/formulations.py

    def grad(*args, input_precision, **kwargs):
        seen.append(("grad", input_precision))
        return real_grad(*args, input_precision=input_precision, **kwargs)

    def forward(*args, input_precision, **kwargs):
        seen.append(("forward", input_precision))
        return real_forward(*args, input_precision=input_precision, **kwargs)

    monkeypatch.setattr(ops._passes, "grad_partials", grad)
    monkeypatch.setattr(ops._passes, "forward", forward)
    matmul_precision("highest")
    model = FusedLinearRegressor(5, 3, backend="triton").to(DEVICE)
    assert model.input_precision == "auto"
    x, t = torch.randn(9, 5, device=DEVICE), torch.randn(9, 3, device=DEVICE)
    model.train_step(x, t, FusedSGD(model.parameters(), lr=0.1, backend="triton"))
    model(x)
    model.train_step(x.bfloat16(), t.bfloat16(), FusedSGD(model.parameters(), lr=0.1, backend="triton"))
    matmul_precision("high")
    model(x)
    assert seen == [("grad", "ieee"), ("forward", "ieee"), ("grad", "tf32x3"), ("forward", "tf32x3")]


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="input_precision must be one of"):
        FusedLinearRegressor(2, 1, input_precision="bf16x3")


def test_ieee_inference_goes_to_the_gemm_only_where_it_was_measured_faster(matmul_precision):
    """kernels.config.forward_uses_library: on a GPU, IEEE fp32 inference with D > 64 or O > 16
    is PyTorch's GEMM (the kernel measured 0.38-0.62x nn.Linear there); tall data stays on the kernel."""
    from linreg_fused.kernels.config import INTERPRETER, DeviceProfile, forward_uses_library

    gpu = DeviceProfile(gpu=True, multiprocessors=132, shared_per_block=232448, shared_per_sm=233472)
    f32, bf16 = torch.float32, torch.bfloat16
    matmul_precision("highest")
    assert not forward_uses_library(64, 4, gpu, f32, f32, "ieee")  # tall: the kernel, 1.13x nn.Linear
    assert forward_uses_library(256, 16, gpu, f32, f32, "ieee")
    assert forward_uses_library(1024, 8, gpu, f32, f32, "ieee")
    assert forward_uses_library(64, 200, gpu, f32, f32, "ieee")
    assert not forward_uses_library(256, 16, INTERPRETER, f32, f32, "ieee")  # the interpreter runs the kernel
    assert not forward_uses_library(256, 16, gpu, f32, f32, "tf32x3")  # other precisions: the kernel
    assert not forward_uses_library(256, 16, gpu, bf16, f32, "ieee")  # mixed dtypes: no GEMM without a copy
    matmul_precision("high")  # the GEMM would be TF32 then: not what "ieee" asks
    assert not forward_uses_library(256, 16, gpu, f32, f32, "ieee")
