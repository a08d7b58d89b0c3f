"""LinearStats at its edges: NumPy hyper-parameters, and the accuracy statistics claim after a
merge of differently accumulated parts. Regression tests of defects found by an adversarial run."""

import warnings

import numpy as np
import pytest
import torch

from linreg_fused import LinearStats


def test_rcond_takes_numpy_reals_and_refuses_bools():
    """As alpha does (scikit-learn's searches and NumPy arithmetic give np.float32/np.float64)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    stats = LinearStats.from_tensors(x, x @ torch.ones(3, 1, dtype=torch.float64), backend="torch")
    ref = stats.solve(rcond=1e-6)[0]
    for rcond in (np.float32(1e-6), np.float64(1e-6)):
        torch.testing.assert_close(stats.solve(rcond=rcond)[0], ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="rcond"):
        stats.solve(rcond=False)


def test_merging_fp32_statistics_in_judges_the_union_at_fp32():
    """Nearly collinear columns (condition ~1e4): fp32 accumulation leaves ~3 correct digits, fp64 all
    of them. Statistics that merge an fp32 part, in either order, are no more accurate than it: they
    say fp32 and warn as fp32 statistics of all the rows do."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(400, 1, generator=g, dtype=torch.float64)
    x = torch.cat([a, a + 1e-4 * torch.randn(400, 1, generator=g, dtype=torch.float64)], 1)
    t = x @ torch.tensor([[1.0], [2.0]], dtype=torch.float64) + 0.01 * torch.randn(400, 1, generator=g,
                                                                                 dtype=torch.float64)
    halves = [(x[:200], t[:200]), (x[200:], t[200:])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp64 statistics of all the rows: no warning
        LinearStats.from_tensors(x, t, backend="torch").solve()
    for precisions in (("fp64", "fp32"), ("fp32", "fp64")):
        parts = [LinearStats.from_tensors(xs, ts, backend="torch", precision=p) for (xs, ts), p in
                 zip(halves, precisions)]
        merged = parts[0].merge(parts[1])
        assert merged.precision == "fp32", precisions
        with pytest.warns(RuntimeWarning, match="correct significant digits .* fp32 accumulation"):
            merged.solve()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_solution_beyond_the_parameters_dtype_raises_and_keeps_them(backend):
    """A float16 model whose least-squares coefficient (~1e5, fresh random data) exceeds float16's
    65504 raises OverflowError and keeps its parameters, where storing it gave inf weights and a NaN
    loss without a word; a solution that fits (the same data with x scaled up) is stored."""
    from linreg_fused import FusedLinearRegressor, GroupedLinearRegressor

    x = (torch.rand(64, 2, dtype=torch.float64) + 0.5) * 1e-3
    t = x @ torch.tensor([[1e5], [2.0]], dtype=torch.float64) + 1e-3 * torch.randn(64, 1, dtype=torch.float64)
    x16, t16 = x.half(), t.half()
    model = FusedLinearRegressor(2, 1, dtype=torch.float16, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the digits warning of float16 data
        with pytest.raises(OverflowError, match="beyond torch.float16's largest value"):
            model.solve(x16, t16)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        grouped = GroupedLinearRegressor(3, 2, 1, dtype=torch.float16, backend=backend)  # group 2 stays empty
        before = [p.detach().clone() for p in grouped.parameters()]
        with pytest.raises(OverflowError, match="parameters are unchanged"):
            grouped.solve(x16, t16, torch.arange(64) % 2)
        assert all(torch.equal(a, b) for a, b in zip(before, grouped.parameters()))
        loss = model.solve((x * 1e3).half(), t16)  # coefficients ~100: representable
    assert torch.isfinite(model.weight).all() and torch.isfinite(loss)
    assert abs(model.weight[0, 0].item() - 100.0) < 2.0  # 1e5 · 1e-3, to float16's rounding of the data


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunks_without_rows_add_nothing(backend):
    """A stream may hold chunks of no rows (an empty partition, a filtered chunk, the tail of a
    generator): they add nothing, as merging empty statistics does, where update and from_batches
    raised "empty data". Their shapes are still checked; a stream of no rows at all is an error."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64) + 50.0
    t = x @ torch.randn(3, 2, generator=g, dtype=torch.float64) + torch.randn(13, 2, generator=g,
                                                                              dtype=torch.float64)
    ref = LinearStats.from_tensors(x, t, backend=backend).solve()
    empty = (x[:0], t[:0])
    chunks = [empty, (x[:1], t[:1]), empty, (x[1:9].numpy(), t[1:9].numpy()), (x[9:], t[9:]), empty]
    stats = LinearStats.from_batches(chunks, backend=backend)
    assert stats.n_rows == 13
    for got, want in zip(stats.solve(), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    before = stats.factor.clone()
    assert stats.update(*empty) is stats and stats.n_rows == 13 and torch.equal(stats.factor, before)
    with pytest.raises(ValueError, match="chunk has 2 features and 2 targets"):
        stats.update(x[:0, :2], t[:0])
    with pytest.raises(ValueError, match="no rows"):
        LinearStats.from_batches([empty, empty], backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_data_beyond_1e154_solve_as_scaled_data_do(backend):
    """Scaling x (or x and t) by 2**600 (exact in binary) scales the solution exactly. The factor
    holds such data (the kernel scales its reflectors); the solver squared column norms (above
    ~1e154, inf) and returned zero weights with a false "numerical rank 0" warning."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64) + 2.0
    t = x @ torch.randn(3, 2, generator=g, dtype=torch.float64) + torch.randn(24, 2, generator=g,
                                                                              dtype=torch.float64)
    big = 2.0**600
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full rank and well conditioned: no warning at any scale
        w, b = LinearStats.from_tensors(x, t, backend=backend).solve()
        ref = LinearStats.from_tensors(x, t, backend=backend).summary()
        for sx, st in ((big, 1.0), (big, big), (1.0, big)):
            stats = LinearStats.from_tensors(x * sx, t * st, backend=backend)
            got_w, got_b = stats.solve()
            torch.testing.assert_close(got_w * sx / st, w, rtol=1e-12, atol=0)
            torch.testing.assert_close(got_b / st, b, rtol=1e-12, atol=0)
            s = stats.summary()
            torch.testing.assert_close(s.t_values, ref.t_values, rtol=1e-10, atol=0)
            torch.testing.assert_close(s.r2, ref.r2, rtol=1e-12, atol=0)
            torch.testing.assert_close(s.residual_std / st, ref.residual_std, rtol=1e-12, atol=0)


def test_sizes_take_numpy_integers_and_refuse_bools():
    """LinearStats(D, O) and from_arrays' chunk_rows, given NumPy integers (array shapes and
    arithmetic give them): the same statistics as Python ints, where they raised "must be a
    positive integer, got 5"; bools are refused (True would silently mean one row per chunk)."""
    rng = np.random.default_rng(43)
    x, t = rng.standard_normal((11, 3)), rng.standard_normal((11, 2))
    ref = LinearStats.from_arrays(x, t, chunk_rows=5, backend="torch")
    got = LinearStats.from_arrays(x, t, chunk_rows=np.int64(5), backend="torch")
    assert got.n_rows == 11 and torch.equal(got.factor, ref.factor)
    empty = LinearStats(np.int64(3), np.int32(2))
    assert (empty.in_features, empty.out_features) == (3, 2) and type(empty.in_features) is int
    with pytest.raises(ValueError, match="chunk_rows"):
        LinearStats.from_arrays(x, t, chunk_rows=True)
    with pytest.raises(ValueError, match="in_features"):
        LinearStats(True, 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_statistics_of_data_that_require_grad_hold_no_graph(backend):
    """Features from a network (requires_grad) are summarised as data on both backends: the torch
    path kept the autograd graph of every chunk in the factor (memory growing with the stream, a
    state_dict of non-leaf tensors), the Triton path only in the means."""
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(12, 2, dtype=torch.float64)
    stats = LinearStats.from_tensors(x[:6], t[:6], backend=backend).update(x[6:], t[6:])
    ref = LinearStats.from_tensors(x[:6].detach(), t[:6], backend=backend).update(x[6:].detach(), t[6:])
    assert torch.equal(stats.factor, ref.factor)
    held = [stats.factor, stats.shift, *(v for v in stats.state_dict().values() if isinstance(v, torch.Tensor))]
    assert not any(v.requires_grad for v in held)


def test_a_target_without_its_last_dimension_is_named_as_such():
    """x (N, D) with t (N,): the message said their leading dimensions differ, both being N;
    it now says what t lacks and how to add it (here and in from_batches' chunks)."""
    x, t = torch.randn(5, 3), torch.randn(5)
    for build in (lambda: LinearStats.from_tensors(x, t), lambda: LinearStats.from_batches([(x.numpy(), t.numpy())])):
        with pytest.raises(ValueError, match=r"t has shape \(5,\): one target per row needs shape \(5, 1\)"):
            build()
    with pytest.raises(ValueError, match="leading dimensions differ"):  # a real mismatch keeps its message
        LinearStats.from_tensors(x, torch.randn(4, 1))
