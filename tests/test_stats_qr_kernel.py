"""The TSQR factor kernel (kernels/linear_qr.py) against float64 Householder QR of the same
shifted rows: odd shapes and 1-sized dims, every input dtype and layout, several programs and
merge levels, fp32 accumulation, extreme scales, determinism; and its sm_90 build (no spills)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from test_compile import ROOT, _tools_missing

from linreg_fused.backend import select_ops
from linreg_fused.factor import leading_shift, qr_r, torch_factor

pytestmark = pytest.mark.skipif(select_ops("auto", DEVICE).name != "triton", reason="needs the Triton backend")


def reference(x, t, shift):
    """R (diagonal ≥ 0) of [1, x − s_x, t − s_t] by float64 Householder QR (LAPACK)."""
    d = x.shape[1]
    z = torch.cat([torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device),
                   x.double() - shift[:d], t.double() - shift[d:]], 1)
    return qr_r(z.cpu())


def rel(a, b):
    return float((a.cpu() - b.cpu()).norm() / b.cpu().norm())


def data(n, d, o, dtype=torch.float32, offset=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 4, d, dtype=torch.float64) + offset
    t = x[:, :1] * 0.5 - 1 + torch.randn(n, o, generator=g, dtype=torch.float64)
    return x.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE)


# (N, D, O): one row; fewer rows than columns; one tile; three 1024-row tiles, programs and a merge; P = 64
# (float32 only: the interpreter takes ~6 s there). Other dtypes on the mid-sized shape.
SHAPES = [(1, 1, 1), (3, 4, 2), (17, 1, 1), (97, 6, 3), (2100, 13, 2), (41, 60, 3)]
CASES = [(shape, torch.float32) for shape in SHAPES] + [
    ((97, 6, 3), dtype) for dtype in (torch.float64, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_factor_matches_float64_householder(shape, dtype):
    from linreg_fused.kernels.linear_qr import linear_qr

    x, t = data(*shape, dtype=dtype)
    shift = leading_shift(x, t, torch.float64)
    r = linear_qr(x, t, shift)
    ref = reference(x, t, shift)
    assert r.dtype == torch.float64 and r.shape == ref.shape
    assert torch.equal(r, r.triu()) and bool((r.diagonal() >= 0).all())
    n, p = shape[0], sum(shape[1:]) + 1
    if n >= p:  # full rank: R is unique
        assert rel(r, ref) < 1e-12, rel(r, ref)
    z_gram = ref.t() @ ref
    assert rel(r.t().cpu() @ r.cpu(), z_gram) < 1e-13  # RᵀR = ZᵀZ whatever the rank
    assert torch.equal(r, linear_qr(x, t, shift)), "bitwise the same run to run"


def test_layouts_merge_levels_and_fp32_accumulation():
    from linreg_fused.kernels.linear_qr import QRConfig, linear_qr

    x, t = data(300, 5, 2)
    shift = leading_shift(x, t, torch.float64)
    ref = reference(x, t, shift)
    # Transposed x and every-other-row t: strided loads.
    strided_t = torch.empty(600, 2, device=DEVICE)
    strided_t[::2] = t
    assert rel(linear_qr(x.t().contiguous().t(), strided_t[::2], shift), ref) < 1e-12
    # 19 programs of 16 rows: three merge levels (19 -> 3 -> 1) of 8 factors at most.
    many = QRConfig(block_n=16, block_p=8, n_programs=19)
    assert rel(linear_qr(x, t, shift, config=many), ref) < 1e-12
    # fp32 Householder steps (then fp64 merges): the Gram to float32's resolution.
    r32 = linear_qr(x, t, shift.float().double(), fp64=False)
    ref32 = reference(x, t, shift.float().double())
    gram = ref32.t() @ ref32
    assert 1e-10 < rel(r32.t().cpu() @ r32.cpu(), gram) < 2e-6
    with pytest.raises(ValueError, match="1 \\+ D \\+ O = 66 > 64"):
        linear_qr(torch.zeros(4, 62, device=DEVICE), torch.zeros(4, 3, device=DEVICE), torch.zeros(65))


def test_extreme_scales_and_zero_columns():
    """The reflectors are scaled by their largest entry: 1e±200 neither overflows nor underflows;
    an all-zero column leaves a zero diagonal, not NaN."""
    from linreg_fused.kernels.linear_qr import linear_qr

    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    x[:, 0] *= 1e200
    x[:, 1] *= 1e-200
    x[:, 2] = 0.0
    t = torch.randn(50, 1, generator=g, dtype=torch.float64)
    shift = torch.zeros(5, dtype=torch.float64)
    r = linear_qr(x.to(DEVICE), t.to(DEVICE), shift.to(DEVICE)).cpu()
    assert bool(torch.isfinite(r).all()) and float(r[3, 3]) == 0.0
    ref = torch_factor(x, t, shift)
    # R is not unique past a zero column: compare RᵀR, each column scaled to unit norm first.
    norms = ref.norm(dim=0)
    norms[norms == 0] = 1.0
    rs, refs = r / norms, ref / norms
    assert float((rs.t() @ rs - refs.t() @ refs).abs().max()) < 1e-13


def test_triton_and_torch_paths_agree():
    x, t = data(700, 9, 4, dtype=torch.float64, offset=1e4)
    shift = leading_shift(x, t, torch.float64)
    from linreg_fused.kernels.linear_qr import linear_qr

    assert rel(linear_qr(x, t, shift), torch_factor(x, t, shift)) < 1e-12


@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_compiles_for_sm90_without_spills():
    """Every BLOCK_P (4 to 64), fp32/bf16/fp64 inputs, both accumulators, the merge launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_qr.py"), "--check"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(" ok") == 16, done.stdout
