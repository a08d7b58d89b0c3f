"""LinearStats and FusedLinearRegressor.solve: statistics from one pass, in
chunks, merged and streamed from a memory-mapped file; the loss and gradients
they give against float64 nn.Linear + F.mse_loss; the exact solutions against
numpy.linalg.lstsq and scikit-learn on the data sets scikit-learn ships; and
clear errors."""

import io
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE
from memory_probe import peak_memory
from oracle import assert_close, linear_mse_grads, rel_err

from linreg_fused import FusedLinearRegressor, LinearStats
from linreg_fused.stats import row_chunks

# Relative error of statistics-derived values against float64 on well-conditioned data:
# a factor accumulated in fp32 carries ~1e-7 of the data's spread, an fp64 one ~1e-15.
STAT_TOL = {"fp32": 1e-5, "fp64": 1e-11}


def problem(n=97, d=6, o=3, dtype=torch.float32, offset=2.0, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + offset
    w = torch.randn(o, d, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64)
    t = x @ w.t() + b + noise * torch.randn(n, o, generator=g, dtype=torch.float64)
    return x.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE)


def moments_of(stats):
    return (stats.mean_x, stats.mean_t, stats.m_xx, stats.m_tx, stats.m_tt)


# ---------------------------------------------------------------- building
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_loss_and_grads_match_float64_autograd(reduction, with_bias, backend):
    x, t = problem()
    stats = LinearStats.from_tensors(x, t, backend=backend)
    assert stats.n_rows == 97 and (stats.in_features, stats.out_features) == (6, 3)
    w = torch.randn(3, 6, device=DEVICE)
    b = torch.randn(3, device=DEVICE) if with_bias else None
    ref = linear_mse_grads(x, w, b, t, reduction)
    loss = stats.loss(w, b, reduction)
    grad_w, grad_b = stats.grads(w, b, reduction)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert_close(loss, ref["loss"], STAT_TOL[stats.precision], "loss")
    assert_close(grad_w, ref["weight"], STAT_TOL[stats.precision], "dW")
    if with_bias:
        assert_close(grad_b, ref["bias"], STAT_TOL[stats.precision], "db")
    else:
        assert grad_b is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_dtypes_and_leading_dims(dtype, backend):
    x, t = problem(n=60, dtype=dtype)
    stats = LinearStats.from_tensors(x.reshape(3, 20, 6), t.reshape(3, 20, 3), backend=backend)
    assert stats.precision == "fp64"  # every input dtype accumulates in fp64 unless asked otherwise
    w, b = torch.randn(3, 6, device=DEVICE, dtype=torch.float64), torch.randn(3, device=DEVICE, dtype=torch.float64)
    ref = linear_mse_grads(x, w, b, t)  # of the given (rounded) values, in float64
    assert_close(stats.loss(w, b), ref["loss"], STAT_TOL[stats.precision], "loss")


def test_update_and_merge_equal_one_pass(backend):
    x, t = problem(n=150)
    whole = LinearStats.from_tensors(x, t, backend=backend)
    chunked = LinearStats(6, 3, device=DEVICE, precision=whole.precision, backend=backend)
    for start in (0, 1, 50, 51, 130):  # chunks of 1, 49, 1, 79 and 20 rows
        stop = {0: 1, 1: 50, 50: 51, 51: 130, 130: 150}[start]
        chunked.update(x[start:stop], t[start:stop])
    left = LinearStats.from_tensors(x[:64], t[:64], backend=backend)
    merged = left.merge(LinearStats.from_tensors(x[64:], t[64:], backend=backend))
    assert merged is left and chunked.n_rows == merged.n_rows == 150
    for other in (chunked, merged):
        for a, b in zip(moments_of(other), moments_of(whole)):
            assert_close(a, b, STAT_TOL[whole.precision], "chunked or merged")


def test_empty_statistics_merge_as_identity():
    x, t = problem(n=20)
    stats = LinearStats.from_tensors(x, t, backend="torch")
    empty = LinearStats(6, 3, device=DEVICE)
    assert empty.n_rows == 0
    with pytest.raises(ValueError, match="no rows"):
        empty.loss(torch.zeros(3, 6, device=DEVICE))
    empty.merge(stats)
    assert all(torch.equal(a, b) for a, b in zip(moments_of(empty), moments_of(stats)))


def test_large_mean_small_noise_does_not_cancel(backend):
    """x ~ 1e4 + N(0, 1), t = W·x + b + 1e-2·noise, fp32: the loss at the least-squares solution
    is ~1e-4 against targets of ~1e4. Centred statistics keep it; the uncentred sums
    G = ZᵀZ, C = TᵀZ, ‖T‖² lose every digit in fp32 and two in fp64."""
    g = torch.Generator().manual_seed(5)
    n, d, o = 800, 4, 2
    x = (1e4 + torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    t = (x.double() @ torch.randn(o, d, generator=g, dtype=torch.float64).t() + 1.0
         + 1e-2 * torch.randn(n, o, generator=g, dtype=torch.float64)).float()
    z = np.hstack([x.double().numpy(), np.ones((n, 1))])
    solution = np.linalg.lstsq(z, t.double().numpy(), rcond=None)[0]
    w, b = torch.from_numpy(solution[:d].T.copy()), torch.from_numpy(solution[d].copy())
    r = x.double() @ w.t() + b - t.double()
    ref = (r * r).mean().item()
    assert 5e-5 < ref < 2e-4

    def err(loss):
        return abs(float(loss) - ref) / ref

    x, t, w, b = (v.to(DEVICE) for v in (x, t, w, b))
    fp64 = LinearStats.from_tensors(x, t, precision="fp64", backend=backend)
    fp32 = LinearStats.from_tensors(x, t, precision="fp32", backend=backend)
    z32 = torch.cat([x, torch.ones(n, 1, device=DEVICE)], 1)
    wb = torch.cat([w, b[:, None]], 1)

    def uncentred(dtype):
        zz, tt, p = z32.to(dtype), t.to(dtype), wb.to(dtype)
        gram, cross = zz.t() @ zz, tt.t() @ zz
        return ((p @ gram * p).sum() - 2 * (p * cross).sum() + (tt * tt).sum()) / (n * o)

    assert err(fp64.loss(w, b)) < 1e-8
    assert err(fp32.loss(w, b)) < 2e-2  # measured 2.5e-3 in the interpreter, 5.7e-12 on the (fp64) reference
    assert err(uncentred(torch.float32)) > 1e3
    assert err(uncentred(torch.float64)) > 1e-3


# ---------------------------------------------------------------- exact solutions
def sklearn_datasets():
    datasets = pytest.importorskip("sklearn.datasets")
    diabetes = datasets.load_diabetes()
    linnerud = datasets.load_linnerud()
    return {"diabetes": (diabetes.data, diabetes.target[:, None]), "linnerud": (linnerud.data, linnerud.target)}


@pytest.mark.parametrize("name", ["diabetes", "linnerud"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_solve_matches_scikit_learn(name, alpha, fit_intercept, backend):
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, t = sklearn_datasets()[name]
    stats = LinearStats.from_tensors(torch.from_numpy(x).to(DEVICE), torch.from_numpy(t).to(DEVICE), backend=backend)
    weight, bias = stats.solve(alpha, fit_intercept=fit_intercept)
    peer = (linear_model.Ridge(alpha=alpha, fit_intercept=fit_intercept) if alpha
            else linear_model.LinearRegression(fit_intercept=fit_intercept)).fit(x, t)
    tol = 1e-9  # fp64 data: fp64 statistics; cond(centred X) ~ 20 for both data sets
    assert_close(weight, torch.from_numpy(np.atleast_2d(peer.coef_)), tol, "coefficients")
    if fit_intercept:
        assert_close(bias, torch.from_numpy(np.atleast_1d(peer.intercept_)), tol, "intercept")
    else:
        assert bias is None
    if alpha == 0 and fit_intercept:
        z = np.hstack([x, np.ones((len(x), 1))])
        lstsq = np.linalg.lstsq(z, t, rcond=None)[0]
        assert_close(torch.cat([weight, bias[:, None]], 1), torch.from_numpy(lstsq.T), tol, "numpy lstsq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_solve_random_well_conditioned(dtype, backend):
    x, t = problem(n=300, d=9, o=4, dtype=dtype)
    stats = LinearStats.from_tensors(x, t, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rank warning on a well-conditioned problem
        weight, bias = stats.solve()
    z = torch.cat([x.double(), torch.ones(300, 1, dtype=torch.float64, device=DEVICE)], 1).cpu().numpy()
    ref = np.linalg.lstsq(z, t.double().cpu().numpy(), rcond=None)[0].T
    tol = {"fp32": 1e-4, "fp64": 1e-10}[stats.precision]  # cond(XᵀX) ~ 1e2 times the statistics' accuracy
    assert_close(torch.cat([weight, bias[:, None]], 1), torch.from_numpy(ref), tol, "[W b]")


@pytest.mark.parametrize("case", ["duplicate-column", "low-rank", "constant-column"])
def test_solve_rank_deficient_warns_and_gives_minimum_norm(case, backend):
    g = torch.Generator().manual_seed(3)
    n = 80
    if case == "duplicate-column":  # x3 = x0 + x1 exactly, x4 = 2·x2
        base = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x = torch.cat([base, base[:, :1] + base[:, 1:2], 2 * base[:, 2:]], 1)
        rank = 3
    elif case == "low-rank":  # 7 features in a 4-dimensional subspace
        x = torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 7, generator=g, dtype=torch.float64)
        rank = 4
    else:  # a column with no variance is collinear with the intercept
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        x[:, 2] = 3.0
        rank = 4
    t = x @ torch.randn(x.shape[1], 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, 2, generator=g,
                                                                                            dtype=torch.float64)
    stats = LinearStats.from_tensors(x.to(DEVICE), t.to(DEVICE), backend=backend)
    with pytest.warns(RuntimeWarning, match=f"numerical rank {rank} of {x.shape[1]}"):
        weight, bias = stats.solve()
    xc, tc = (x - x.mean(0)).numpy(), (t - t.mean(0)).numpy()
    ref = np.linalg.lstsq(xc, tc, rcond=None)[0].T  # scikit-learn's LinearRegression: centred, minimum norm
    assert_close(weight, torch.from_numpy(ref), 1e-8, "minimum-norm W")
    assert_close(bias, t.mean(0) - torch.from_numpy(ref) @ x.mean(0), 1e-8, "intercept")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ridge_w, _ = stats.solve(alpha=1.0)  # ridge makes it well-posed: no warning
    linear_model = pytest.importorskip("sklearn.linear_model")
    peer = linear_model.Ridge(alpha=1.0).fit(x.numpy(), t.numpy())
    assert_close(ridge_w, torch.from_numpy(peer.coef_), 1e-9, "ridge on rank-deficient data")


def test_model_solve(backend):
    x, t = problem(n=120, d=5, o=2)
    model = FusedLinearRegressor(5, 2, backend=backend).to(DEVICE)
    loss = model.solve(x, t)
    z = torch.cat([x.double(), torch.ones(120, 1, dtype=torch.float64, device=DEVICE)], 1)
    ref = torch.linalg.lstsq(z.cpu(), t.double().cpu()).solution.t()
    assert_close(torch.cat([model.weight, model.bias[:, None]], 1), ref, 1e-4, "[W b]")
    ref_loss = linear_mse_grads(x, model.weight, model.bias, t)["loss"]
    # At the minimum the loss is a difference of terms as large as the targets' variance.
    cancellation = float(t.double().var(0).mean() / ref_loss)
    assert_close(loss, ref_loss, 1e-6 * cancellation, "returned loss")
    # The same from statistics, from chunks, and a ridge without bias.
    stats = LinearStats.from_tensors(x, t, backend=backend)
    other = FusedLinearRegressor(5, 2, backend=backend).to(DEVICE)
    other.solve(stats)
    assert torch.equal(other.weight, model.weight)
    other.solve(row_chunks(x, t, 50))
    assert_close(other.weight, model.weight, 1e-5, "from chunks")
    other.solve(x, t, precision="fp64")
    assert_close(torch.cat([other.weight, other.bias[:, None]], 1), ref, 1e-6, "fp64 statistics")
    no_bias = FusedLinearRegressor(5, 2, bias=False, backend=backend).to(DEVICE)
    no_bias.solve(x, t, alpha=2.0)
    xd, td = x.double(), t.double()
    ref = torch.linalg.solve(xd.t() @ xd + 2.0 * torch.eye(5, dtype=torch.float64, device=DEVICE), xd.t() @ td).t()
    assert_close(no_bias.weight, ref, 1e-4, "ridge without intercept")


# ---------------------------------------------------------------- persistence, errors
def test_state_dict_round_trip(backend):
    x, t = problem(n=40)
    stats = LinearStats.from_tensors(x, t, backend=backend)
    buffer = io.BytesIO()
    torch.save(stats.state_dict(), buffer)
    buffer.seek(0)
    loaded = LinearStats(6, 3, device=DEVICE)
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.n_rows == 40 and loaded.precision == stats.precision
    for a, b in zip(moments_of(loaded), moments_of(stats)):
        assert_close(a, b, 1e-14, "round trip")
    w = torch.randn(3, 6, dtype=torch.float64, device=DEVICE)
    assert_close(loaded.loss(w), stats.loss(w), 1e-14, "loss after the round trip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the input's float32 resolution survives the round trip: no warning here
        (lw, lb), (sw, sb) = loaded.solve(), stats.solve()
    assert_close(torch.cat([lw, lb[:, None]], 1), torch.cat([sw, sb[:, None]], 1), 1e-12, "solution, round trip")
    with pytest.raises(ValueError, match=r"mean_x'\] has shape \(6,\), expected \(5,\)"):
        LinearStats(5, 3).load_state_dict(stats.state_dict())
    with pytest.raises(KeyError, match="factor"):
        LinearStats(6, 3).load_state_dict({k: v for k, v in stats.state_dict().items() if k != "factor"})


def test_loads_the_moments_format_of_earlier_releases(backend):
    """A state saved as moments (n_rows, means, centred co-moments) loads as a factor with the same Gram:
    the same loss, gradients and solution as statistics built from the data."""
    x, t = problem(n=50, dtype=torch.float64)
    xc, tc = x - x.mean(0), t - t.mean(0)
    old = {"n_rows": 50, "mean_x": x.mean(0), "mean_t": t.mean(0), "m_xx": xc.t() @ xc, "m_tx": tc.t() @ xc,
           "m_tt": tc.t() @ tc, "precision": "fp64"}
    loaded = LinearStats(6, 3, device=DEVICE)
    loaded.load_state_dict(old)
    fresh = LinearStats.from_tensors(x, t, backend=backend)
    assert loaded.n_rows == 50
    for a, b in zip(moments_of(loaded), moments_of(fresh)):
        assert_close(a, b, 1e-12, "moments of the converted state")
    w, b = torch.randn(3, 6, dtype=torch.float64, device=DEVICE), torch.randn(3, dtype=torch.float64, device=DEVICE)
    assert_close(loaded.loss(w, b), fresh.loss(w, b), 1e-12, "loss")
    assert_close(loaded.grads(w, b)[0], fresh.grads(w, b)[0], 1e-12, "dW")
    assert_close(loaded.solve()[0], fresh.solve()[0], 1e-10, "solution")
    with pytest.raises(KeyError, match="m_tt"):
        LinearStats(6, 3).load_state_dict({k: v for k, v in old.items() if k != "m_tt"})


def test_clear_errors():
    x, t = problem(n=10)
    with pytest.raises(TypeError, match="floating-point"):
        LinearStats.from_tensors(x.long(), t)
    with pytest.raises(TypeError, match="must match"):
        LinearStats.from_tensors(x, t.double())
    with pytest.raises(ValueError, match="leading dimensions"):
        LinearStats.from_tensors(x, t[:9])
    with pytest.raises(ValueError, match="empty"):
        LinearStats.from_tensors(x[:0], t[:0])
    with pytest.raises(ValueError, match="precision"):
        LinearStats(6, 3, precision="fp16")
    stats = LinearStats.from_tensors(x, t, backend="torch")
    with pytest.raises(ValueError, match="6 features and 2 targets|has 6 features"):
        stats.update(x, t[:, :2])
    with pytest.raises(ValueError, match="weight must have shape"):
        stats.loss(torch.zeros(6, 3))
    with pytest.raises(ValueError, match="reduction"):
        stats.loss(torch.zeros(3, 6), reduction="max")
    for alpha in (-1.0, float("nan"), True, "1", torch.ones(2)):
        with pytest.raises(ValueError, match="alpha"):
            stats.solve(alpha=alpha)
    with pytest.raises(ValueError, match="rcond"):
        stats.solve(rcond=2.0)
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(LinearStats(5, 3))
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        LinearStats.from_tensors(bad, t, backend="torch").solve()
    with pytest.raises(ValueError, match="no chunks"):
        LinearStats.from_batches([])
    with pytest.raises(TypeError, match=r"\(x, t\) pair"):
        LinearStats.from_batches([x])
    model = FusedLinearRegressor(6, 3)
    with pytest.raises(ValueError, match="targets=None"):
        model.solve(stats, t)
    with pytest.raises(ValueError, match="are of 6→3 but the model is 6→2"):
        FusedLinearRegressor(6, 2).solve(LinearStats.from_tensors(x, t, backend="torch"))


# ---------------------------------------------------------------- out of core
def test_from_batches_of_numpy_chunks(backend):
    x, t = problem(n=90)
    xn, tn = x.cpu().numpy(), t.cpu().numpy()
    streamed = LinearStats.from_batches(row_chunks(xn, tn, 32), device=DEVICE, backend=backend)
    whole = LinearStats.from_tensors(x, t, backend=backend)
    assert streamed.n_rows == 90 and streamed.device == whole.device
    for a, b in zip(moments_of(streamed), moments_of(whole)):
        assert_close(a, b, STAT_TOL[whole.precision], "streamed")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc and ru_maxrss (Linux)")
def test_memory_mapped_file_in_bounded_memory(tmp_path):
    """A 64 MiB pair of .npy files, memory-mapped, streamed in 1 MiB chunks: the statistics equal
    the in-memory ones, and the memory the pass allocates stays a few chunks, not the file."""
    n, d, o = 1 << 20, 12, 4
    chunk_rows = 1 << 14
    rng = np.random.default_rng(0)
    x_path, t_path = tmp_path / "x.npy", tmp_path / "t.npy"
    x_file = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(n, d))
    t_file = np.lib.format.open_memmap(t_path, mode="w+", dtype=np.float32, shape=(n, o))
    block = 1 << 17
    for start in range(0, n, block):  # written in blocks too
        xs = rng.standard_normal((block, d), dtype=np.float32) + 5
        x_file[start : start + block] = xs
        t_file[start : start + block] = xs[:, :o] * 2 - 1 + rng.standard_normal((block, o), dtype=np.float32)
    x_file.flush()
    t_file.flush()
    del x_file, t_file
    file_bytes = n * (d + o) * 4
    chunk_bytes = chunk_rows * (d + o) * 4

    streamed, start_peak = peak_memory("streamed", x_path, t_path, chunk_rows, tmp_path / "streamed.pt")
    # The reference's temporaries are fp64 copies of a chunk and its centred values: ~4 chunks.
    print(f"streamed: peak {streamed / 2**20:.1f} MiB for {chunk_bytes / 2**20:.0f} MiB chunks "
          f"of a {file_bytes / 2**20:.0f} MiB file")
    assert start_peak < 2 * chunk_bytes  # the mark starts at the baseline (reset, or nothing above it yet)
    assert streamed < 12 * chunk_bytes, f"peak {streamed / 2**20:.1f} MiB"
    in_memory, _ = peak_memory("in_memory", x_path, t_path, chunk_rows, tmp_path / "whole.pt")
    assert in_memory > file_bytes  # the control: the same probe does see a whole-file load
    streamed_stats, whole = torch.load(tmp_path / "streamed.pt"), torch.load(tmp_path / "whole.pt")
    assert streamed_stats[0] == whole[0] == n
    for a, b in zip(streamed_stats[1:], whole[1:]):
        assert_close(a, b, 1e-12, "memory-mapped vs in memory")
    assert rel_err(streamed_stats[1], torch.full((d,), 5.0, dtype=torch.float64)) < 1e-2
