"""Property-based checks of LinearStats.solve against torch.linalg.lstsq in float64 on the same
data: rank-deficient designs, columns of very different scales, data far from 0, tight and exact
fits, with and without an intercept. CI runs tests/test_properties.py's derandomized profile;
HYPOTHESIS_PROFILE=dev runs many more examples."""

import warnings

import pytest
import torch
from conftest import DEVICE
from hypothesis import assume, given
from hypothesis import strategies as st
from test_properties import settings  # noqa: F401  (registers and loads the project's profiles)

from linreg_fused import LinearStats


@st.composite
def designs(draw):
    n = draw(st.integers(2, 48))
    d = draw(st.integers(1, 7))
    o = draw(st.integers(1, 3))
    rank = draw(st.integers(1, d))  # < d: exactly rank-deficient (a product of random factors)
    exponents = draw(st.lists(st.integers(-3, 3), min_size=d, max_size=d))
    offset = draw(st.sampled_from([0.0, 10.0, 1e3]))
    noise = draw(st.sampled_from([0.0, 1e-9, 1e-2, 1.0]))
    intercept = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(n, rank, **f64) @ torch.randn(rank, d, **f64)
    x = x * 10.0 ** torch.tensor(exponents, dtype=torch.float64) + offset
    w = torch.randn(o, d, **f64) / 10.0 ** torch.tensor(exponents, dtype=torch.float64)
    t = x @ w.t() + (torch.randn(o, **f64) if intercept else 0.0) + noise * torch.randn(n, o, **f64)
    return x, t, intercept


def reference(x, t, intercept):
    """float64 least squares as lstsq gives it: centred when fitting an intercept, minimum norm,
    and the numerical rank at a cut far from both the data's null directions and its real ones."""
    xc, tc = (x - x.mean(0), t - t.mean(0)) if intercept else (x, t)
    out = torch.linalg.lstsq(xc, tc, rcond=1e-10, driver="gelsd")
    return out.solution.t(), int(out.rank)


@given(problem=designs())
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_solve_matches_lstsq(problem, backend):
    x, t, intercept = problem
    if backend == "triton" and x.shape[0] > 24:
        x, t = x[:24], t[:24]  # the interpreter's time
    ref_w, ref_rank = reference(x, t, intercept)
    stats = LinearStats.from_tensors(x.to(DEVICE), t.to(DEVICE), backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weight, bias = stats.solve(fit_intercept=intercept)
    rank_warnings = [str(w.message) for w in caught if "numerical rank" in str(w.message)]
    ours = int(rank_warnings[0].split("numerical rank ")[1].split(" ")[0]) if rank_warnings else x.shape[1]
    assume(ours == ref_rank)  # designs whose rank the two cuts decide alike (nearly all)
    weight, bias = weight.cpu(), None if bias is None else bias.cpu()
    xc, tc = (x - x.mean(0), t - t.mean(0)) if intercept else (x, t)
    scale = tc.norm().clamp_min(1e-300)
    # The same fit (whatever the null directions), and the same minimum-norm weights.
    fit_err = float((xc @ weight.t() - xc @ ref_w.t()).norm() / scale)
    assert fit_err < 1e-7, fit_err
    w_err = float((weight - ref_w).norm() / ref_w.norm().clamp_min(1e-300))
    assert w_err < 1e-6 or float(ref_w.norm()) == 0.0, w_err
    if intercept:
        assert torch.allclose(bias, t.mean(0) - weight @ x.mean(0), rtol=1e-9, atol=1e-9 * float(t.abs().max()))
    # The loss: never negative, and the true MSE of these weights wherever it is above rounding.
    pred = x @ weight.t() + (bias if intercept else 0.0)
    true = float(((pred - t) ** 2).mean())
    loss = float(stats.loss(weight.to(DEVICE), None if bias is None else bias.to(DEVICE)))
    assert loss >= 0.0
    rounding = float((2.0**-52 * (t.abs().max() + (x.abs().max(0).values * weight.abs()).sum(1).max())) ** 2)
    if true > 100 * rounding:
        assert abs(loss - true) <= 0.1 * true, (loss, true)
