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
    real_grad, real_forward = ops._grad.linear_mse_partials, ops._forward.linear_forward

    def grad(*args, input_precision, **kwargs):
        seen.append(("grad", input_precision))
        return real_grad(*args, input_precision=input_precision, **kwargs)

    def forward(*args, input_precision, **kwargs):
        seen.append(("forward", input_precision))
        return real_forward(*args, input_precision=input_precision, **kwargs)

    monkeypatch.setattr(ops._grad, "linear_mse_partials", grad)
    monkeypatch.setattr(ops._forward, "linear_forward", forward)
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
