"""GPU-only checks of the statistics path: the compiled kernels (not the
interpreter) at sizes the interpreter cannot afford, bitwise determinism,
64-bit offsets, half inputs, and host chunks streamed through the pinned
double buffers. Skipped without CUDA."""

import pytest
import torch
from conftest import requires_cuda
from oracle import assert_close

from linreg_fused import FusedLinearRegressor, LinearStats
from linreg_fused.reference import TORCH_OPS
from linreg_fused.stats import row_chunks

pytestmark = requires_cuda
CUDA = torch.device("cuda")
# Split-TF32 products (≤ 1.2e-6 each), fp32 sums over ≤ 1024 rows: relative to the moments' norm.
GPU_MOMENT_TOL = 2e-5


def _data(n, d, o, dtype=torch.float32, offset=3.0):
    x = torch.randn(n, d, device=CUDA) + offset
    features = torch.arange(o, device=CUDA) % d  # target j follows feature j mod d (o may exceed d)
    t = x[:, features] * 0.5 - 1.0 + torch.randn(n, o, device=CUDA)
    return x.to(dtype), t.to(dtype)


@pytest.mark.parametrize("shape", [(200_003, 64, 4), (65_537, 256, 16), (16_385, 1000, 8), (3000, 33, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moments_at_scale(shape, dtype):
    x, t = _data(*shape, dtype=dtype)
    stats = LinearStats.from_tensors(x, t, backend="triton")
    ref = TORCH_OPS.linear_moments(x, t, fp64=True)
    for out, expected, name in zip((stats.mean_x, stats.mean_t, stats.m_xx, stats.m_tx, stats.m_tt), ref[1:],
                                   ("mean_x", "mean_t", "M_xx", "M_tx", "M_tt")):
        assert_close(out, expected, GPU_MOMENT_TOL, name)
    again = LinearStats.from_tensors(x, t, backend="triton")
    assert torch.equal(again.m_xx, stats.m_xx) and torch.equal(again.m_tx, stats.m_tx), "bitwise reproducible"


def test_int64_offsets():
    """More than 2³¹ elements in X: row offsets must be 64-bit."""
    n, d, o = (1 << 31) // 64 + 4099, 64, 1
    x = torch.empty(n, d, device=CUDA)
    x[:, :] = 1.0
    x[-1, -1] = 3.0  # a value only the last row has
    t = torch.ones(n, o, device=CUDA)
    stats = LinearStats.from_tensors(x, t, backend="triton")
    assert stats.n_rows == n
    assert abs(float(stats.mean_x[-1]) - (1.0 + 2.0 / n)) < 1e-12
    assert abs(float(stats.m_xx[-1, -1]) - 4.0 * (n - 1) / n) < 1e-6


def test_streaming_through_pinned_buffers():
    n, d, o = 300_000, 48, 3
    x, t = _data(n, d, o)
    xn, tn = x.cpu().numpy(), t.cpu().numpy()
    streamed = LinearStats.from_batches(row_chunks(xn, tn, 70_000), device=CUDA, backend="triton")
    whole = LinearStats.from_tensors(x, t, backend="triton")
    assert streamed.device.type == "cuda" and streamed.n_rows == n
    for a, b in zip((streamed.m_xx, streamed.m_tx, streamed.mean_x), (whole.m_xx, whole.m_tx, whole.mean_x)):
        assert_close(a, b, GPU_MOMENT_TOL, "streamed vs whole")


def test_solve_on_the_device():
    x, t = _data(100_000, 32, 4, offset=0.0)
    model = FusedLinearRegressor(32, 4, device=CUDA)
    model.solve(x, t)
    z = torch.cat([x.double(), torch.ones(len(x), 1, device=CUDA, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(z.cpu(), t.double().cpu()).solution.t()
    assert_close(torch.cat([model.weight, model.bias[:, None]], 1).cpu(), ref, 1e-4, "[W b]")
