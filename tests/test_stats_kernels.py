"""The statistics kernels (kernels/linear_stats.py) directly: the one-pass
moments against a float64 two-pass oracle for every product mode, dtype,
stride and block boundary; the split-TF32 product, run through the kernel's
own split and through an emulation of what a GPU's tensor cores compute;
the one-launch SGD epochs against the reference loop; and an sm_90 compile
that must not spill."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE
from oracle import assert_close

from linreg_fused.backend import select_ops
from linreg_fused.kernels.linear_stats import _split_tf32
from linreg_fused.kernels.specs import SGDHyper
from linreg_fused.reference import TORCH_OPS

# ‖out − ref‖ / ‖ref‖ of each centred co-moment against float64, per precision: fp32
# centring rounds each value once (2⁻²⁴) and fp32 sums run over ≤ group_rows rows.
MOMENT_TOL = {"fp32": 2e-6, "fp64": 1e-13}


@pytest.fixture
def linear_stats():
    from linreg_fused.kernels import linear_stats

    select_ops("triton", DEVICE)  # fails loudly if Triton cannot run here
    return linear_stats


def oracle_moments(x, t):
    """Two-pass float64 moments of the given (already rounded) values."""
    x64, t64 = x.double(), t.double()
    xc, tc = x64 - x64.mean(0), t64 - t64.mean(0)
    return x.shape[0], x64.mean(0), t64.mean(0), xc.t() @ xc, tc.t() @ xc, tc.t() @ tc


def check_moments(out, ref, tol, what=""):
    assert out[0] == ref[0], f"{what}: row count {out[0]} != {ref[0]}"
    for name, a, b in zip(("mean_x", "mean_t", "M_xx", "M_tx", "M_tt"), out[1:], ref[1:]):
        assert a.dtype == torch.float64, f"{what} {name}: {a.dtype}"
        assert_close(a, b, tol, f"{what} {name}")


def data(n, d, o, dtype=torch.float32, offset=3.0):
    """Random rows off the origin (so the shift matters), never zeros."""
    x = torch.randn(n, d, device=DEVICE) * torch.rand(d, device=DEVICE).add(0.5) + offset
    t = torch.randn(n, o, device=DEVICE) - offset
    return x.to(dtype), t.to(dtype)


def configs(linear_stats, out_features):
    """Small blocks so every loop runs: several D blocks (off-diagonal pairs), several row
    groups per split, three splits; BLOCK_O covers O. One per product mode."""
    o = 1 << (out_features - 1).bit_length()
    cfg = linear_stats.StatsConfig
    return {
        "tf32x3": cfg(16, 16, max(16, o), "tf32x3", group_rows=32, n_splits=3),
        "ieee": cfg(16, 16, max(16, o), "ieee", group_rows=32, n_splits=3),
        "fma": cfg(8, 16, o, "fma", group_rows=16, n_splits=3),
    }


@pytest.mark.parametrize("shape", [(100, 37, 3), (70, 20, 17), (41, 1, 1), (9, 5, 2)], ids=str)
@pytest.mark.parametrize("product", ["tf32x3", "ieee", "fma"])
def test_moments_match_float64(shape, product, linear_stats):
    n, d, o = shape
    x, t = data(n, d, o)
    out = linear_stats.linear_moments(x, t, config=configs(linear_stats, o)[product])
    check_moments(out, oracle_moments(x, t), MOMENT_TOL["fp32"], product)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_moments_dtypes(dtype, linear_stats):
    """Half inputs are upcast exactly, so their tolerance is fp32's; fp64 is exact products."""
    x, t = data(90, 19, 2, dtype)
    out = linear_stats.linear_moments(x, t)
    check_moments(out, oracle_moments(x, t), MOMENT_TOL["fp64" if dtype == torch.float64 else "fp32"], str(dtype))


def test_fp64_statistics_of_fp32_data(linear_stats):
    x, t = data(64, 21, 3)
    out = linear_stats.linear_moments(x, t, fp64=True)
    check_moments(out, oracle_moments(x, t), MOMENT_TOL["fp64"], "fp64 of fp32")


def test_any_strides(linear_stats):
    base_x, base_t = data(80, 30, 6)
    x = base_x.t().contiguous().t()[::2, 3:26]  # column-major, every other row, a column window
    t = base_t[::2, ::2]
    assert not x.is_contiguous() and not t.is_contiguous()
    out = linear_stats.linear_moments(x, t, config=configs(linear_stats, 3)["tf32x3"])
    check_moments(out, oracle_moments(x, t), MOMENT_TOL["fp32"], "strided")


def test_single_row_and_constant_columns(linear_stats):
    x, t = data(1, 5, 2)
    out = linear_stats.linear_moments(x, t)
    assert torch.equal(out[1], x[0].double()) and torch.equal(out[2], t[0].double())
    assert all(bool((m == 0).all()) for m in out[3:]), "one row has no spread"
    x, t = data(50, 4, 2)
    x[:, 1] = 7.25  # a constant column: zero variance, exactly
    out = linear_stats.linear_moments(x, t)
    assert bool((out[3][1] == 0).all()) and bool((out[4][:, 1] == 0).all())


def test_bitwise_deterministic(linear_stats):
    x, t = data(70, 37, 3)
    cfg = configs(linear_stats, 3)["tf32x3"]
    first, second = (linear_stats.linear_moments(x, t, config=cfg) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first[1:], second[1:]))


def test_backends_agree():
    x, t = data(120, 23, 5)
    triton_out = select_ops("triton", DEVICE).linear_moments(x, t, fp64=False)
    torch_out = TORCH_OPS.linear_moments(x, t, fp64=False)
    check_moments(triton_out, torch_out, MOMENT_TOL["fp32"], "triton vs torch")


def test_many_outputs_take_the_reference(linear_stats):
    x, t = data(40, 3, linear_stats.MAX_OUT_FEATURES + 1)
    out = select_ops("triton", DEVICE).linear_moments(x, t, fp64=False)
    check_moments(out, oracle_moments(x, t), MOMENT_TOL["fp64"], "O > MAX_OUT_FEATURES")


def test_config_must_cover_out_features(linear_stats):
    x, t = data(10, 3, 20)
    with pytest.raises(ValueError, match="block_o"):
        linear_stats.linear_moments(x, t, config=linear_stats.StatsConfig(16, 16, 16, "tf32x3"))


# ---------------------------------------------------------------- the split-TF32 product
def tf32_bits(v: torch.Tensor, mode: str) -> torch.Tensor:
    """fp32 -> tf32 (10 mantissa bits) in torch: "nearest" as the kernel rounds hi (ties away
    from zero), "truncate" as tensor cores read an fp32 register (the low 13 bits ignored)."""
    bits = v.contiguous().view(torch.int32)
    if mode == "nearest":
        bits = bits + 0x1000
    return (bits & -0x2000).view(torch.float32)


@triton.jit
def _split_kernel(a_ptr, hi_ptr, lo_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    hi, lo = _split_tf32(tl.load(a_ptr + offs))
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


def test_kernel_split_is_exact_and_tf32(linear_stats):
    a = torch.randn(1024, device=DEVICE) * torch.logspace(-20, 20, 1024, device=DEVICE)
    a[:4] = torch.tensor([1.0 + 2.0**-11, -(1.0 + 2.0**-11), 3.0, -0.0])  # ties round away from zero
    hi, lo = torch.empty_like(a), torch.empty_like(a)
    _split_kernel[(1,)](a, hi, lo, BLOCK=1024)
    assert torch.equal(hi.double() + lo.double(), a.double()), "hi + lo must be exactly a"
    assert bool((hi.view(torch.int32) & 0x1FFF == 0).all()), "hi must be a tf32 value"
    assert bool((lo.abs() <= a.abs() * 2.0**-11).all())
    assert hi[0] == 1.0 + 2.0**-10 and hi[1] == -(1.0 + 2.0**-10) and hi[2] == 3.0
    assert torch.equal(hi.cpu(), tf32_bits(a.cpu(), "nearest")), "the torch emulation below rounds like the kernel"


def test_split_tf32_error_on_tensor_cores_emulated():
    """What a GPU computes (the interpreter's tl.dot is exact fp32, so it cannot show this):
    hi rounded to tf32 by the kernel, lo truncated by the tensor core, three products. Each
    product is within 2.5·2⁻²¹ of exact relative to |a|·|b|; one plain tf32 product is not
    within 2⁻¹¹, and the split gains about three orders of magnitude on a Gram matrix."""
    a = (torch.randn(512, 48, dtype=torch.float64) * 3 + 0.5).float()
    b = torch.randn(512, 16).float()
    exact = a.double().t() @ b.double()
    magnitude = a.double().abs().t() @ b.double().abs()
    a_hi, b_hi = tf32_bits(a, "nearest"), tf32_bits(b, "nearest")
    a_lo, b_lo = tf32_bits(a - a_hi, "truncate"), tf32_bits(b - b_hi, "truncate")
    # tf32 x tf32 products are exact in fp64 (11 x 11 significant bits); sum them exactly too
    split = sum(p.double().t() @ q.double() for p, q in ((a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi)))
    plain = tf32_bits(a, "truncate").double().t() @ tf32_bits(b, "truncate").double()
    split_err = ((split - exact).abs() / magnitude).max().item()
    plain_err = ((plain - exact).abs() / magnitude).max().item()
    assert split_err <= 2.5 * 2.0**-21, split_err
    assert plain_err > 100 * split_err, (plain_err, split_err)


# ---------------------------------------------------------------- the epochs kernel
HYPERS = {
    "plain": (SGDHyper(lr=0.05), SGDHyper(lr=0.05)),
    "nesterov-wd": (SGDHyper(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
                    SGDHyper(lr=0.03, momentum=0.5)),
    "dampening-maximize": (SGDHyper(lr=0.02, momentum=0.9, dampening=0.3, maximize=True),
                           SGDHyper(lr=0.01, momentum=0.8, dampening=0.1, maximize=True, weight_decay=0.1)),
    "frozen-weight": (None, SGDHyper(lr=0.1, momentum=0.9)),
    "frozen-bias": (SGDHyper(lr=0.05, momentum=0.7), None),
}


def run_epochs(ops, moments, n, w, b, hypers, init, epochs, mean):
    w, b = w.clone(), (b.clone() if b is not None else None)
    bufs = [torch.zeros_like(w) if init else torch.full_like(w, 0.1),
            (torch.zeros_like(b) if init else torch.full_like(b, -0.2)) if b is not None else None]
    history = torch.empty(epochs, dtype=torch.float64, device=DEVICE)
    ops.stats_sgd_epochs(n, moments, w, b, bufs[0], bufs[1], history, mean=mean, weight_hyper=hypers[0],
                         bias_hyper=hypers[1], init_weight_buffer=init, init_bias_buffer=init)
    return history, w, b, bufs


@pytest.mark.parametrize("init", [True, False], ids=["new-buffers", "old-buffers"])
@pytest.mark.parametrize("case", list(HYPERS))
def test_epochs_kernel_matches_reference(case, init, linear_stats):
    n, d, o = 60, 37, 3  # D in two column blocks of the kernel
    x, t = data(n, d, o, offset=0.5)
    moments = oracle_moments(x, t)
    w = torch.randn(o, d, device=DEVICE) * 0.1
    b = torch.randn(o, device=DEVICE)
    triton_ops = select_ops("triton", DEVICE)
    out = run_epochs(triton_ops, moments[1:], n, w, b, HYPERS[case], init, 7, mean=True)
    ref = run_epochs(TORCH_OPS, moments[1:], n, w, b, HYPERS[case], init, 7, mean=True)
    tol = 1e-12  # the same fp64 arithmetic, parameters stored in fp32 after each step
    assert_close(out[0], ref[0], tol, "history")
    assert_close(out[1], ref[1], 1e-6, "weight")
    assert_close(out[2], ref[2], 1e-6, "bias")
    for i, h in enumerate(HYPERS[case]):
        if h is not None and h.momentum:
            assert_close(out[3][i], ref[3][i], 1e-6, f"momentum buffer {i}")
    if HYPERS[case][0] is None:
        assert torch.equal(out[1], w), "a frozen weight does not move"


def test_epochs_kernel_without_bias_and_sum(linear_stats):
    n, d, o = 30, 5, 1
    x, t = data(n, d, o, offset=0.2)
    moments = oracle_moments(x, t)
    w = torch.randn(o, d, device=DEVICE) * 0.1
    hypers = (SGDHyper(lr=1e-3, momentum=0.5), None)
    out = run_epochs(select_ops("triton", DEVICE), moments[1:], n, w, None, hypers, True, 5, mean=False)
    ref = run_epochs(TORCH_OPS, moments[1:], n, w, None, hypers, True, 5, mean=False)
    assert_close(out[0], ref[0], 1e-12, "history")
    assert_close(out[1], ref[1], 1e-6, "weight")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_epochs_keep_the_last_finite_epoch(backend):
    n, d, o = 40, 6, 2
    x, t = data(n, d, o, offset=5.0)
    moments = oracle_moments(x, t)
    w, b = torch.randn(o, d, device=DEVICE) * 0.1, torch.randn(o, device=DEVICE)
    hypers = (SGDHyper(lr=1.0, momentum=0.9), SGDHyper(lr=1.0, momentum=0.9))  # diverges within a few epochs
    ops = select_ops(backend, DEVICE)
    history, w1, b1, bufs1 = run_epochs(ops, moments[1:], n, w, b, hypers, True, 30, mean=True)
    finite = torch.isfinite(history)
    bad = int((~finite).nonzero()[0, 0])
    assert bad > 0 and bool(finite[:bad].all())
    _, w2, b2, bufs2 = run_epochs(ops, moments[1:], n, w, b, hypers, True, bad, mean=True)
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and torch.equal(bufs1[0], bufs2[0])


# ---------------------------------------------------------------- sm_90 compile
def test_compiles_for_sm90_without_spills():
    """The tall regime's kernels (4,194,304×64→4, fp32: the pass, its fp64 variant, the epochs)
    compiled for an H100 without a GPU, in a process without the interpreter: no register
    spills, shared memory within the limit."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(root / "bench" / "compile_stats.py"), "--check", "--regime",
                             "stats-tall", "--dtype", "fp32"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "stats-tall" in line]
    kernels = {line.split("full")[1].split("regs")[0].strip() for line in lines}
    assert {"pass, diagonal", "pass fp64, diagonal", "epochs"} <= kernels, result.stdout
    assert all(" ok " in line for line in lines) and "no spills" in result.stdout, result.stdout


def test_reference_moments_merge_their_chunks(monkeypatch):
    """The reference pass (fit's statistics path on the torch backend) merges chunks with Chan's
    pairwise update: chunks of 7 rows give the one-pass moments."""
    from linreg_fused import reference

    monkeypatch.setattr(reference, "MOMENT_CHUNK_ROWS", 7)
    x, t = data(50, 4, 2, dtype=torch.float64)
    check_moments(TORCH_OPS.linear_moments(x, t, fp64=True), oracle_moments(x, t), MOMENT_TOL["fp64"], "7-row chunks")
