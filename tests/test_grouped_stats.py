"""Grouped statistics (LinearStats.from_tensors(..., groups=, n_groups=)): each group's solution
against float64 least squares on that group's rows alone, ragged and unsorted groups, empty,
one-row and rank-deficient groups, merging, persistence, errors, and bitwise reproducibility.

Tolerances: the data are float32 or float64 values, read exactly into float64 by both sides;
the reference is numpy.linalg.lstsq (SVD) on the group's centred rows. The statistics solve the
normal equations, so agreement is to ~cond²·2⁻⁵²; on these well-conditioned draws (cond < 50)
1e-9 relative to the coefficients' scale is a margin of ~1e3 over the errors seen (~1e-13)."""

import warnings

import numpy as np
import pytest
import torch

from linreg_fused import LinearStats
from linreg_fused.grouped_stats import EMPTY, NONFINITE, OK, RANK_DEFICIENT, GroupedLinearStats

COEF_TOL = 1e-9


def ragged(sizes, d, o, *, offset=0.0, dtype=torch.float32, seed=0):
    """Rows of len(sizes) groups (group i: sizes[i] rows, its own true weights) in a random order."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.cat([torch.full((s,), i, dtype=torch.int64) for i, s in enumerate(sizes)])
    g = g[torch.randperm(g.numel(), generator=gen)]
    x = torch.randn(g.numel(), d, generator=gen, dtype=torch.float64) + offset
    w = torch.randn(len(sizes), o, d, generator=gen, dtype=torch.float64)
    t = torch.einsum("nd,nod->no", x, w[g]) + 0.1 * torch.randn(g.numel(), o, generator=gen, dtype=torch.float64)
    return x.to(dtype), t.to(dtype), g


def lstsq_per_group(x, t, g, i, alpha=0.0):
    """float64 reference: minimum-norm least squares (ridge) on group i's centred rows.

    rcond: singular values below 1e-7 of the largest are dropped. The statistics cannot resolve
    smaller ones (their eigenvalue threshold D·2⁻⁵² is a singular-value ratio of ~3e-8), and
    NumPy's default (2⁻⁵²·rows) would fit the rounding left by centring rows that sit at 1e4."""
    xs, ts = x[g == i].double().numpy(), t[g == i].double().numpy()
    xc, tc = xs - xs.mean(0), ts - ts.mean(0)
    if alpha:
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(xs.shape[1]), xc.T @ tc).T
    else:
        w = np.linalg.lstsq(xc, tc, rcond=1e-7)[0].T
    return w, ts.mean(0) - w @ xs.mean(0)


def assert_groups_match(sol, x, t, g, groups, alpha=0.0, tol=COEF_TOL):
    weight, bias = sol
    for i in groups:
        w, b = lstsq_per_group(x, t, g, i, alpha)
        scale = max(1.0, np.abs(w).max(), np.abs(b).max())
        np.testing.assert_allclose(weight[i].numpy(), w, rtol=0, atol=tol * scale, err_msg=f"group {i}")
        np.testing.assert_allclose(bias[i].numpy(), b, rtol=0, atol=tol * scale, err_msg=f"group {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 2), (1, 1), (5, 1)], ids=lambda s: f"D{s[0]}O{s[1]}")
def test_each_group_equals_least_squares_on_its_rows(backend, dtype, shape):
    d, o = shape
    sizes = [7, 1, 2, 0, 33, 64 + 5, d + 1]  # one row, fewer rows than features, an empty group
    x, t, g = ragged(sizes, d, o, offset=3.0, dtype=dtype)
    stats = LinearStats.from_tensors(x, t, groups=g, n_groups=len(sizes), backend=backend)
    assert isinstance(stats, GroupedLinearStats) and stats.shape == (len(sizes), d, o)
    assert stats.n_rows.tolist() == sizes
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        sol = stats.solve()
    assert sol.weight.shape == (len(sizes), o, d) and sol.bias.shape == (len(sizes), o)
    assert_groups_match(sol, x, t, g, [i for i, s in enumerate(sizes) if s])
    expected = [OK if s > d else EMPTY if s == 0 else RANK_DEFICIENT for s in sizes]
    assert sol.status.tolist() == expected
    assert sol.rank.tolist() == [min(max(s - 1, 0), d) for s in sizes]
    assert torch.isnan(sol.weight[3]).all() and torch.isnan(sol.bias[3]).all()
    assert sol.groups_with(EMPTY).tolist() == [3]
    # One row: no slope can be seen; the minimum-norm weights are 0 and the intercept is the target.
    assert torch.equal(sol.weight[1], torch.zeros(o, d, dtype=torch.float64))
    assert torch.equal(sol.bias[1], t[g == 1][0].double())


def test_large_ragged_groups_far_from_zero_on_torch():
    """1 to 10⁵ rows per group, data at 1e4 ± 1: the shifted fp64 sums do not cancel."""
    sizes = [1, 2, 3, 10, 1000, 100_000, 17]
    x, t, g = ragged(sizes, 4, 2, offset=1e4, dtype=torch.float64, seed=3)
    with pytest.warns(RuntimeWarning):
        sol = LinearStats.from_tensors(x, t, groups=g, n_groups=len(sizes), backend="torch").solve()
    assert_groups_match(sol, x, t, g, range(len(sizes)), tol=1e-8)  # cond(x) ~ 1e0 after centring
    assert sol.status.tolist() == [RANK_DEFICIENT] * 3 + [OK] * 4


def test_rank_deficient_groups_get_the_minimum_norm_solution(backend):
    x, t, g = ragged([40, 30, 25], 4, 2, dtype=torch.float64, seed=5)
    x[g == 0, 3] = 2.0 * x[g == 0, 1] - x[g == 0, 0]  # collinear columns
    x[g == 1, 2] = 7.0  # a constant column: no variance in the group
    with pytest.warns(RuntimeWarning, match=r"0 \(rank_deficient, rank 3 of 4\)"):
        sol = LinearStats.from_tensors(x, t, groups=g, n_groups=3, backend=backend).solve()
    assert sol.status.tolist() == [RANK_DEFICIENT, RANK_DEFICIENT, OK]
    assert sol.rank.tolist() == [3, 3, 4]
    assert_groups_match(sol, x, t, g, range(3))


def test_ridge_and_no_intercept(backend):
    x, t, g = ragged([20, 9, 31], 3, 2, offset=2.0, dtype=torch.float64, seed=6)
    stats = LinearStats.from_tensors(x, t, groups=g, n_groups=3, backend=backend)
    assert_groups_match(stats.solve(alpha=2.5), x, t, g, range(3), alpha=2.5)
    weight, bias = stats.solve(fit_intercept=False)
    assert bias is None
    for i in range(3):
        ref = np.linalg.lstsq(x[g == i].numpy(), t[g == i].numpy(), rcond=None)[0].T
        np.testing.assert_allclose(weight[i].numpy(), ref, rtol=0, atol=COEF_TOL * max(1, np.abs(ref).max()))


def test_a_group_with_nan_gets_its_status_and_the_others_are_solved(backend):
    x, t, g = ragged([10, 12, 11], 2, 1, dtype=torch.float64, seed=7)
    x[torch.nonzero(g == 1)[0, 0], 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="nonfinite"):
        sol = LinearStats.from_tensors(x, t, groups=g, n_groups=3, backend=backend).solve()
    assert sol.status.tolist() == [OK, NONFINITE, OK]
    assert torch.isnan(sol.weight[1]).all() and torch.isnan(sol.bias[1]).all()
    assert_groups_match(sol, x, t, g, [0, 2])


def test_update_and_merge_equal_one_pass_and_state_dict_round_trips(backend):
    x, t, g = ragged([30, 1, 0, 45, 12], 3, 2, offset=50.0, dtype=torch.float64, seed=8)
    whole = LinearStats.from_tensors(x, t, groups=g, n_groups=5, backend=backend)
    part = LinearStats.from_tensors(x[:20], t[:20], groups=g[:20], n_groups=5, backend=backend)
    other = GroupedLinearStats(5, 3, 2, backend=backend).update(x[20:50], t[20:50], g[20:50])
    part.merge(other.update(x[50:], t[50:], g[50:]))
    assert torch.equal(part.n_rows, whole.n_rows)
    for key in ("mean_x", "mean_t", "m_xx", "m_tx", "m_tt"):
        torch.testing.assert_close(getattr(part, key), getattr(whole, key), rtol=1e-12, atol=1e-10)
    copy = GroupedLinearStats(5, 3, 2)
    copy.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in whole.state_dict().items()})
    for a, b in zip(copy.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    with pytest.raises(ValueError, match="expected"):
        GroupedLinearStats(4, 3, 2).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(GroupedLinearStats(5, 2, 2))


def test_loss_and_grads_per_group_equal_autograd_on_the_rows(backend):
    x, t, g = ragged([8, 13, 0, 5], 3, 2, offset=5.0, dtype=torch.float64, seed=9)
    stats = LinearStats.from_tensors(x, t, groups=g, n_groups=4, backend=backend)
    w = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    loss = stats.loss(w, b)
    grad_w, grad_b = stats.grads(w, b)
    assert torch.isnan(loss[2])  # the mean over no rows
    for i in (0, 1, 3):
        ref = torch.nn.functional.mse_loss(x[g == i] @ w[i].t() + b[i], t[g == i])
        rw, rb = torch.autograd.grad(ref, (w, b))
        torch.testing.assert_close(loss[i], ref.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_w[i], rw[i], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(grad_b[i], rb[i], rtol=1e-9, atol=1e-11)
    sums = stats.loss(w, None, reduction="sum")
    torch.testing.assert_close(sums[1], ((x[g == 1] @ w[1].t() - t[g == 1]) ** 2).sum().detach())


def test_bitwise_reproducible_run_to_run(backend):
    x, t, g = ragged([300, 2, 77, 1, 150], 4, 1, offset=1.0, seed=10)
    runs = [LinearStats.from_tensors(x, t, groups=g, n_groups=5, backend=backend) for _ in range(2)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the CPU scatter adds each group's rows in row order, any thread count
        runs.append(LinearStats.from_tensors(x, t, groups=g, n_groups=5, backend=backend))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(run.state_dict().values(), runs[0].state_dict().values()):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_the_two_backends_agree():
    x, t, g = ragged([70, 3, 1, 130], 5, 3, offset=-20.0, seed=11)
    a = LinearStats.from_tensors(x, t, groups=g, n_groups=4, backend="torch")
    b = LinearStats.from_tensors(x, t, groups=g, n_groups=4, backend="triton")
    for key in ("mean_x", "mean_t", "m_xx", "m_tx", "m_tt"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-13, atol=1e-11)


@pytest.mark.parametrize("groups, n_groups, error, match", [
    (torch.tensor([0, 1, 3]), 3, ValueError, r"\[0, 3\); got ids from 0 to 3"),
    (torch.tensor([0, -1, 1]), 3, ValueError, "got ids from -1"),
    (torch.tensor([0, 1, 1], dtype=torch.int32), 3, TypeError, "int64"),
    (torch.tensor([0.0, 1.0, 1.0]), 3, TypeError, "int64"),
    (torch.tensor([0, 1]), 3, ValueError, "one id per row"),
    ([0, 1, 1], 3, TypeError, "torch.Tensor"),
    (torch.tensor([0, 1, 1]), 0, ValueError, "n_groups must be a positive integer"),
    (torch.tensor([0, 1, 1]), None, ValueError, "n_groups must be a positive integer"),
])
def test_bad_group_ids_are_refused_before_any_work(groups, n_groups, error, match):
    x, t = torch.randn(3, 2), torch.randn(3, 1)
    with pytest.raises(error, match=match):
        LinearStats.from_tensors(x, t, groups=groups, n_groups=n_groups)


def test_fp32_precision_is_refused_for_groups():
    with pytest.raises(ValueError, match="fp64"):
        LinearStats.from_tensors(torch.randn(3, 2), torch.randn(3, 1), groups=torch.zeros(3, dtype=torch.int64),
                                 n_groups=1, precision="fp32")


def test_rows_wider_than_the_kernel_take_the_torch_pass():
    """K = D + O > 64 does not fit the Triton program's accumulator: backend="triton" runs PyTorch's pass."""
    x, t, g = ragged([5, 9], 64, 1, seed=12)
    a = LinearStats.from_tensors(x, t, groups=g, n_groups=2, backend="triton")
    b = LinearStats.from_tensors(x, t, groups=g, n_groups=2, backend="torch")
    for u, v in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v


def test_the_widest_rows_the_kernel_takes_match_the_torch_pass():
    x, t, g = ragged([3, 70, 1], 60, 4, offset=2.0, seed=13)
    a = LinearStats.from_tensors(x, t, groups=g, n_groups=3, backend="triton")
    b = LinearStats.from_tensors(x, t, groups=g, n_groups=3, backend="torch")
    for key in ("mean_x", "mean_t", "m_xx", "m_tx", "m_tt"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("x, t, error, match", [
    (torch.randn(3, 2), torch.randn(3, 1, dtype=torch.float64), TypeError, "must match"),
    (torch.randn(3, 2), torch.randn(4, 1), ValueError, "leading dimensions differ"),
    (torch.ones(3, 2, dtype=torch.int64), torch.randn(3, 1), TypeError, "floating-point"),
    (torch.randn(3, 0), torch.randn(3, 1), ValueError, "empty data"),
])
def test_bad_rows_are_refused(x, t, error, match):
    with pytest.raises(error, match=match):
        LinearStats.from_tensors(x, t, groups=torch.zeros(3, dtype=torch.int64), n_groups=1)


def test_groups_spread_over_many_triton_items_add_up(monkeypatch):
    """A group of more than ITEM_ROWS rows is split over several programs and its items' sums are
    added in order: with ITEM_ROWS = 8, groups of 1 to 50 rows take 1 to 7 items."""
    from linreg_fused.kernels import grouped_stats as kernel

    monkeypatch.setattr(kernel, "ITEM_ROWS", 8)
    x, t, g = ragged([50, 1, 8, 9, 0, 17], 3, 2, offset=4.0, seed=14)
    a = LinearStats.from_tensors(x, t, groups=g, n_groups=6, backend="triton")
    b = LinearStats.from_tensors(x, t, groups=g, n_groups=6, backend="torch")
    assert torch.equal(a.n_rows, b.n_rows)
    for key in ("mean_x", "mean_t", "m_xx", "m_tx", "m_tt"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-12, atol=1e-10)


def test_rows_that_require_grad_are_read_as_data(backend):
    # As LinearStats takes them: the torch pass's cat(out=) refused them, the Triton one kept the graph.
    x, t, g = ragged([4, 0, 7], 2, 1, offset=1.0, dtype=torch.float32, seed=30)
    x.requires_grad_(True)
    stats = LinearStats.from_tensors(x, t, groups=g, n_groups=3, backend=backend)
    plain = LinearStats.from_tensors(x.detach(), t, groups=g, n_groups=3, backend=backend)
    for got, expected in zip(stats.state_dict().values(), plain.state_dict().values()):
        if isinstance(got, torch.Tensor):
            assert not got.requires_grad and torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_groups_whose_normal_equations_lose_the_digits_are_named(backend):
    """Near-collinear features (cond(X) ~2e6 once centred) in some groups, well-conditioned ones
    (~1e2) in the others, fresh data: the moments' normal equations square the condition number,
    so the ill groups keep under 4 digits of a float64 lstsq of their rows; the warning must name
    exactly those groups, where solve said nothing before."""
    rng = np.random.default_rng()
    n, d, ill = 40, 4, {1, 4}
    xs, ts, gs = [], [], []
    for i in range(6):
        spread = 5e-7 if i in ill else 1e-2  # the columns' independent part beside a shared one
        shared = rng.standard_normal((n, 1))
        x = shared + spread * rng.standard_normal((n, d)) + 5.0
        xs.append(x)
        ts.append(x @ rng.standard_normal(d) + 1.0 + 1e-3 * rng.standard_normal(n))
        gs.append(np.full(n, i))
    x, t, g = (torch.tensor(np.concatenate(a)) for a in (xs, ts, gs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solution = GroupedLinearStats.from_tensors(x, t[:, None], g, 6, backend=backend).solve()
    named = [str(m.message) for m in caught if "ill-conditioned" in str(m.message)]
    assert len(named) == 1 and "2 group(s)" in named[0] and ("[1, 4]" in named[0] or "[4, 1]" in named[0]), named
    for i in range(6):  # the warning is true: the ill groups lost the digits, the others did not
        z = np.column_stack([xs[i], np.ones(n)])
        want = np.linalg.lstsq(z, ts[i], rcond=None)[0][:d]
        digits = -np.log10(np.max(np.abs(solution.weight[i, 0].numpy() - want) / np.abs(want)))
        assert (digits < 4) if i in ill else (digits > 6), (i, digits)  # 150 draws: ill <= 3.2, others >= 7.6
