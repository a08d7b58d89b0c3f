"""The "rows", "chunks" and "mma" formulations (kernels/grad_rows.py, grad_chunks.py, grad_mma.py,
forward_rows.py, forward_chunks.py) against float64 and against the default kernels, under Triton's interpreter,
and the rule that chooses a formulation (kernels/config.py).

Fresh random inputs each test; tolerances are relative to the largest reference value:
fp32 products 2e-6 (fp32 FMAs over at most a few hundred terms), bf16/fp16 inputs the same (they
are upcast exactly and multiplied in fp32; the reference takes the same rounded inputs), fp64 1e-12.
The mma formulation (kernels/grad_mma.py) runs here as its interpreter twin: the same three-term
splits, multiplied as fp32 (the interpreter's bf16 dot is wrong); its bf16 MMAs are checked on a GPU
(bench/gpu_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from linreg_fused.kernels import config, formulations
from linreg_fused.kernels.blocks import chunks_config, mma_config, rows_config
from linreg_fused.kernels.config import INTERPRETER, DeviceProfile
from linreg_fused.kernels.probe import interpreter_runs_runtime_loops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not interpreter_runs_runtime_loops(),
                                reason="this Triton's interpreter cannot run loops with runtime bounds")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6, torch.float64: 1e-12}
H200 = DeviceProfile(gpu=True, multiprocessors=132, shared_per_block=232448, shared_per_sm=233472)


def _problem(n, d, o, dtype, *, bias=True, strided=False):
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    if strided:  # every other column of a wider X; T as a transposed view (column stride n)
        x = torch.randn(n, 2 * d, device=DEVICE).to(dtype)[:, ::2]
        t = torch.randn(o, n, device=DEVICE).to(dtype).T
    else:
        x = torch.randn(n, d, device=DEVICE).to(dtype)
        t = torch.randn(n, o, device=DEVICE).to(dtype)
    w = torch.randn(o, d, device=DEVICE, dtype=pdt) / d ** 0.5
    b = torch.randn(o, device=DEVICE, dtype=pdt) if bias else None
    return x, w, b, t


def _reference(x, w, b, t, rows=None):
    """[dW (O·D) | db (O) | loss (1)] and the residual, in float64."""
    if rows is not None:
        x, t = x[rows], t[rows]
    x, w, t = x.double(), w.double(), t.double()
    r = x @ w.T - t + (b.double() if b is not None else 0.0)
    return torch.cat([(r.T @ x).flatten(), r.sum(0), (r * r).sum().reshape(1)]), r


def _rel(got, ref) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


# (formulation, N, D, O, dtype): odd N (a partial last tile; under the interpreter two programs walk
# several tiles each), 1-sized dims, D over one chunk (chunks: 16 columns under the interpreter; rows:
# several lanes and vectors), O = 1 and O = 16.
GRAD_CASES = [
    ("rows", 37, 5, 3, torch.float32), ("rows", 1, 1, 1, torch.float32), ("rows", 65, 64, 4, torch.float32),
    ("rows", 50, 70, 1, torch.float32), ("rows", 33, 24, 8, torch.bfloat16), ("rows", 29, 12, 2, torch.float16),
    ("rows", 41, 9, 3, torch.float64), ("rows", 23, 16, 16, torch.float32),
    ("chunks", 37, 40, 3, torch.float32), ("chunks", 1, 1, 1, torch.float32), ("chunks", 45, 64, 16, torch.float32),
    ("chunks", 70, 33, 1, torch.float32), ("chunks", 34, 48, 5, torch.bfloat16), ("chunks", 50, 17, 16, torch.float16),
    ("mma", 37, 40, 3, torch.bfloat16), ("mma", 1, 1, 1, torch.bfloat16), ("mma", 45, 64, 16, torch.bfloat16),
    ("mma", 70, 33, 1, torch.bfloat16), ("mma", 19, 100, 7, torch.bfloat16),
]
# The mma formulation (bf16 X on tensor cores) serves "tf32x3", bf16's default precision; the others IEEE.
PRECISION = {"rows": "ieee", "chunks": "ieee", "mma": "tf32x3"}


@pytest.mark.parametrize("name,n,d,o,dtype", GRAD_CASES)
def test_grad_partials_match_float64_and_the_default_kernel(name, n, d, o, dtype):
    x, w, b, t = _problem(n, d, o, dtype)
    ref, _ = _reference(x, w, b, t)
    precision = PRECISION[name]
    got = formulations.grad_partials(x, w, b, t, input_precision=precision, formulation=name)
    assert got.buffer.shape[1] == o * d + o + 1 and got.buffer.shape[0] >= 1
    err = _rel(got.buffer.sum(0), ref)
    assert err <= TOL[dtype], f"{name} {n}x{d}->{o} {dtype}: {err:.2e}"
    default = formulations.grad_partials(x, w, b, t, input_precision=precision, formulation="default")
    assert _rel(got.buffer.sum(0), default.buffer.double().sum(0)) <= 2 * TOL[dtype]


@pytest.mark.parametrize("name", ["rows", "chunks", "mma"])
def test_grad_strided_gather_residual_no_bias(name):
    """Strided X and T, a gathered mini-batch (row_index with a stride), the residual kept, no bias."""
    n, d, o = 53, 20, 3
    dtype = torch.bfloat16 if name == "mma" else torch.float32
    x, w, b, t = _problem(n, d, o, dtype, bias=False, strided=True)
    rows = torch.randperm(n, device=DEVICE)[:62:2]  # every other entry of a permutation: stride 2
    ref, r = _reference(x, w, None, t, rows)
    got = formulations.grad_partials(x, w, None, t, row_index=rows, store_residual=True,
                                     input_precision=PRECISION[name], formulation=name)
    assert _rel(got.buffer.sum(0), ref) <= TOL[dtype]
    assert got.n_rows == rows.numel() and _rel(got.residual, r) <= TOL[dtype]


@pytest.mark.parametrize("name", ["rows", "chunks", "mma"])
def test_grad_is_bitwise_deterministic(name):
    x, w, b, t = _problem(97, 24, 4, torch.bfloat16 if name == "mma" else torch.float32)
    first = formulations.grad_partials(x, w, b, t, input_precision=PRECISION[name], formulation=name).buffer
    assert first.shape[0] > 1  # several programs: the fixed-order reduction is what is tested
    again = formulations.grad_partials(x, w, b, t, input_precision=PRECISION[name], formulation=name).buffer
    assert torch.equal(first, again)


def test_mma_products_are_exact_in_fp32():
    """The three-term bf16 splits carry all 24 bits of an fp32 operand: with X = I (exact in bf16) and
    T = 0, X·Wᵀ is Wᵀ and Rᵀ·X is R, so the residual and dW must equal W bit for bit (a two-term split
    would keep 16 bits: ~1e-5 off). Fresh full-mantissa weights, 1-sized and odd dims."""
    for d, o in ((1, 1), (24, 5), (40, 16)):
        x = torch.eye(d, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(o, d, device=DEVICE) * torch.logspace(-6, 6, d, device=DEVICE)  # every bit and exponent
        t = torch.zeros(d, o, device=DEVICE, dtype=torch.bfloat16)
        got = formulations.grad_partials(x, w, None, t, store_residual=True, input_precision="tf32x3",
                                         formulation="mma")
        assert torch.equal(got.residual, w.T), (d, o)
        assert torch.equal(got.buffer.sum(0)[: o * d], w.flatten()), (d, o)  # one nonzero term per column


FORWARD_CASES = [
    ("rows", 37, 5, 3, torch.float32), ("rows", 1, 1, 1, torch.float32), ("rows", 65, 64, 4, torch.float32),
    ("rows", 30, 16, 8, torch.bfloat16), ("rows", 21, 7, 2, torch.float64),
    ("chunks", 37, 40, 3, torch.float32), ("chunks", 1, 1, 1, torch.float32), ("chunks", 45, 64, 16, torch.float32),
    ("chunks", 26, 33, 1, torch.float16),
]


@pytest.mark.parametrize("name,n,d,o,dtype", FORWARD_CASES)
def test_forward_matches_float64_and_the_default_kernel(name, n, d, o, dtype):
    x, w, b, _ = _problem(n, d, o, dtype)
    ref = x.double() @ w.double().T + b.double()
    pdt = w.dtype
    y = formulations.forward(x, w, b, out_dtype=pdt, formulation=name)
    assert y.shape == (n, o) and y.dtype == pdt
    assert _rel(y, ref) <= TOL[dtype]
    assert _rel(y, formulations.forward(x, w, b, out_dtype=pdt, formulation="default").double()) <= 2 * TOL[dtype]


def test_forward_strided_no_bias():
    x, w, _, _ = _problem(41, 12, 2, torch.float32, strided=True)
    for name in ("rows", "chunks"):
        y = formulations.forward(x, w, None, out_dtype=torch.float32, formulation=name)
        assert _rel(y, x.double() @ w.double().T) <= TOL[torch.float32], name


# ------------------------------------------------------------------ the choice
def test_auto_is_the_default_kernel_until_checked_on_a_gpu(monkeypatch):
    assert config.GPU_CHECKED == {}, "a formulation listed as GPU-checked: update this test with the evidence"
    for d, o in ((64, 4), (256, 16), (1024, 8)):
        assert config.choose_formulation(d, o, H200, torch.float32, "ieee", torch.float32) == "default"
        assert config.choose_formulation(d, o, INTERPRETER, torch.float32, "ieee", torch.float32) == "default"
    # Listed for this release (rows preferred): auto takes rows where it fits, else chunks, on a GPU only,
    # IEEE only; a listing for another release changes nothing.
    from linreg_fused.kernels.measured import release, triton_version

    major, minor = release(triton_version())
    monkeypatch.setitem(config.GPU_CHECKED, f"{major}.{minor + 1}", ("rows", "chunks"))
    config.choose_formulation.cache_clear()
    assert config.choose_formulation(64, 4, H200, torch.float32, "ieee", torch.float32) == "default"
    monkeypatch.setitem(config.GPU_CHECKED, f"{major}.{minor}", ("rows", "chunks"))
    config.choose_formulation.cache_clear()
    try:
        assert config.choose_formulation(64, 4, H200, torch.float32, "ieee", torch.float32) == "rows"
        assert config.choose_formulation(256, 16, H200, torch.float32, "ieee", torch.float32) == "chunks"
        assert config.choose_formulation(256, 16, H200, torch.float32, "tf32x3", torch.bfloat16) == "default"
        assert config.choose_formulation(4096, 16, H200, torch.float32, "ieee", torch.float32) == "default"
        assert config.choose_formulation(64, 4, INTERPRETER, torch.float32, "ieee", torch.float32) == "default"
        monkeypatch.setitem(config.GPU_CHECKED, f"{major}.{minor}", ("chunks", "rows"))  # the measured order rules
        config.choose_formulation.cache_clear()
        assert config.choose_formulation(64, 4, H200, torch.float32, "ieee", torch.float32) == "chunks"
    finally:
        config.choose_formulation.cache_clear()


def test_a_named_formulation_that_cannot_serve_the_problem_is_refused():
    with pytest.raises(ValueError, match="rows formulation"):
        config.choose_formulation(256, 16, H200, torch.float32, "ieee", torch.float32, "rows")
    with pytest.raises(ValueError, match="IEEE"):
        config.choose_formulation(64, 4, H200, torch.float32, "tf32", torch.float32, "chunks")
    with pytest.raises(ValueError, match="fp32"):
        config.choose_formulation(64, 4, H200, torch.float64, "ieee", torch.float64, "chunks")
    with pytest.raises(ValueError, match="unknown"):
        config.choose_formulation(64, 4, H200, torch.float32, "ieee", torch.float32, "fastest")
    x, w, b, t = _problem(8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="IEEE"):
        formulations.grad_partials(x, w, b, t, input_precision="tf32", formulation="rows")
    # mma: a bf16 X, fp32 weights, tf32x3 (never the IEEE contract), D <= 1024 and O <= 16, gradient only.
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(ValueError, match="bfloat16 x"):
            config.choose_formulation(64, 4, H200, torch.float32, "tf32x3", dtype, "mma")
    with pytest.raises(ValueError, match="bfloat16 x"):
        config.choose_formulation(64, 4, H200, torch.float64, "tf32x3", torch.bfloat16, "mma")
    for precision in ("ieee", "tf32"):
        with pytest.raises(ValueError, match="tf32x3-accurate"):
            config.choose_formulation(64, 4, H200, torch.float32, precision, torch.bfloat16, "mma")
    with pytest.raises(ValueError, match="D <= 1024"):
        config.choose_formulation(2048, 4, H200, torch.float32, "tf32x3", torch.bfloat16, "mma")
    assert config.choose_formulation(1024, 16, H200, torch.float32, "tf32x3", torch.bfloat16, "mma") == "mma"
    xb, tb = x.to(torch.bfloat16), t.to(torch.bfloat16)
    with pytest.raises(ValueError, match="unknown forward formulation 'mma'"):
        formulations.forward(xb, w, b, out_dtype=torch.float32, input_precision="tf32x3", formulation="mma")
    with pytest.raises(ValueError, match="tf32x3-accurate"):
        formulations.grad_partials(xb, w, b, tb, formulation="mma")  # input_precision defaults to "ieee"


def test_blocks_of_the_benchmark_regimes():
    """The layouts the compile report proves (tests/test_compile_formulations.py) are the ones chosen."""
    tall = rows_config(64, 4, H200, 4)
    assert (tall.lanes, tall.columns, tall.vec, tall.rows, tall.num_warps) == (8, 8, 4, 16, 4)
    assert rows_config(64, 4, H200, 2).vec == 8
    wide, deep = chunks_config(256, 16, H200, 4), chunks_config(1024, 8, H200, 4)
    assert (wide.block_n, wide.k_chunk, wide.chunks, wide.num_warps) == (32, 64, 4, 4)
    assert (deep.block_n, deep.k_chunk, deep.chunks, deep.num_warps) == (16, 64, 16, 8)
    tall, wide, deep = mma_config(64, 4, H200), mma_config(256, 16, H200), mma_config(1024, 8, H200)
    assert (tall.block_n, tall.block_o, tall.chunks, tall.num_warps, tall.num_stages) == (64, 8, 1, 4, 3)
    assert (wide.block_n, wide.block_o, wide.chunks, wide.num_warps, wide.num_stages) == (16, 16, 4, 4, 3)
    assert (deep.block_n, deep.block_o, deep.chunks, deep.num_warps, deep.num_stages) == (16, 8, 16, 8, 2)


# ------------------------------------------------------------------ tuning data per Triton release
def test_measured_tables_are_keyed_by_triton_release(monkeypatch):
    from linreg_fused.kernels import measured
    from linreg_fused.kernels.config import TileConfig, grad_config

    grad = measured.MEASURED_GRAD
    assert measured.table_for(grad, "3.6.0") is grad["3.6"] and measured.table_for(grad, "3.9.0+git1a2b") is grad["3.9"]
    assert measured.table_for(grad, "3.7.1") is grad["3.6"]  # no table of its own: the newest before it
    assert measured.table_for(grad, "3.10.0") is grad["3.9"]  # 3.10 comes after 3.9, not before 3.2
    assert measured.table_for(grad, "3.5.0") == {}  # older than every table: the rules alone
    # Today's H200 choices stand for both releases the card and this machine ran.
    assert grad["3.6"] == grad["3.9"] and measured.MEASURED_FORWARD["3.6"] == measured.MEASURED_FORWARD["3.9"]
    grad_config.cache_clear()
    try:
        for version in ("3.6.0", "3.9.0"):
            monkeypatch.setattr(measured, "triton_version", lambda v=version: v)
            grad_config.cache_clear()
            assert grad_config(256, 16, H200, torch.float32, "ieee", 4) == TileConfig(32, 256, 16, True, 264, 4, 2)
        monkeypatch.setattr(measured, "triton_version", lambda: "3.5.0")  # no table: the rules choose
        grad_config.cache_clear()
        assert grad_config(256, 16, H200, torch.float32, "ieee", 4) != TileConfig(32, 256, 16, True, 264, 4, 2)
    finally:
        grad_config.cache_clear()
