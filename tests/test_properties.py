"""Property-based parity: random shapes, layouts, dtypes and SGD options
against the float64 oracle (nn.Linear + F.mse_loss + torch.optim.SGD), on
both backends.

CI runs a fixed, derandomized profile with a bounded number of examples
(the interpreter is slow); ``HYPOTHESIS_PROFILE=dev`` runs many more, with
fresh random examples each time.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import TOLERANCE, assert_close

from linreg_fused import FusedLinearRegressor, FusedSGD, linear_mse

settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# (x and target dtype, parameter dtype): same dtype, or half inputs with fp32 master weights.
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
          (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
LAYOUTS = ["contiguous", "transposed", "strided", "expanded", "3-D"]


def _leaf(rows: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """The storage a view in ``layout`` of ``rows`` (N, F) is made from (gradients land on it)."""
    if layout == "transposed":
        return rows.t().contiguous()
    if layout == "strided":
        leaf = torch.randn(2 * rows.shape[0], rows.shape[1], generator=gen).to(rows)
        leaf[::2] = rows
        return leaf
    if layout == "expanded":
        return rows[:1].clone()
    return rows


def _view(leaf: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    """(N, F) values in the layout: column-major, every other row, one row repeated (stride 0), or 3-D."""
    if layout == "transposed":
        return leaf.t()
    if layout == "strided":
        return leaf[::2]
    if layout == "expanded":
        return leaf.expand(n, leaf.shape[1])
    if layout == "3-D" and n % 2 == 0:
        return leaf.view(2, n // 2, leaf.shape[1])
    return leaf


@st.composite
def problems(draw):
    return dict(n=draw(st.integers(1, 300)), d=draw(st.integers(1, 150)), o=draw(st.integers(1, 40)),
                bias=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "sum"])),
                dtypes=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)),
                x_grad=draw(st.booleans()), t_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _tolerance(dtype: torch.dtype, param_dtype: torch.dtype) -> float:
    # Half inputs with fp32 weights are computed in fp32 from the exact half values: fp32's tolerance.
    return TOLERANCE[param_dtype if dtype != param_dtype else dtype]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@given(p=problems())
def test_linear_mse_matches_float64_on_random_problems(backend, p):
    gen = torch.Generator().manual_seed(p["seed"])
    n, dtype, param_dtype = p["n"], *p["dtypes"]
    t_layout = "3-D" if p["layout"] == "3-D" else "contiguous"
    x_leaf = _leaf(torch.randn(n, p["d"], generator=gen).to(DEVICE, dtype), p["layout"], gen)
    t_leaf = _leaf(torch.randn(n, p["o"], generator=gen).to(DEVICE, dtype), t_layout, gen)
    weight = (torch.randn(p["o"], p["d"], generator=gen) / p["d"] ** 0.5).to(DEVICE, param_dtype)
    bias = torch.randn(p["o"], generator=gen).to(DEVICE, param_dtype) if p["bias"] else None

    def run(x_leaf, t_leaf, weight, bias, fused):
        x_leaf, t_leaf = x_leaf.detach().requires_grad_(p["x_grad"]), t_leaf.detach().requires_grad_(p["t_grad"])
        weight = weight.detach().requires_grad_()
        bias = bias.detach().requires_grad_() if bias is not None else None
        x, t = _view(x_leaf, p["layout"], n), _view(t_leaf, t_layout, n)
        if fused:
            loss = linear_mse(x, weight, bias, t, p["reduction"], backend=backend)
        else:
            loss = F.mse_loss(F.linear(x, weight, bias), t, reduction=p["reduction"])
        loss.backward()
        return loss, x_leaf, t_leaf, weight, bias

    loss, x_leaf, t_leaf, weight, bias = run(x_leaf, t_leaf, weight, bias, fused=True)
    f64 = [None if v is None else v.detach().double() for v in (x_leaf, t_leaf, weight, bias)]
    ref_loss, ref_x, ref_t, ref_w, ref_b = run(*f64, fused=False)

    # Random problems include sums that cancel (db with O = 1 is one sum of N residuals), where no
    # float32 code is close to float64 relative to the result; the bound that holds is relative to the
    # same sums taken over absolute values (|fl(Σ v) − Σ v| ≤ γ_n Σ |v|). scale[...] are those sums.
    scale = _absolute_sums(*f64, p)
    # Half inputs with fp32 weights are computed in fp32 from the exact half values: fp32's tolerance.
    tol = TOLERANCE[param_dtype]
    assert loss.dtype == torch.promote_types(dtype, param_dtype)
    _assert_within(loss, ref_loss, scale["loss"], tol, "loss")
    _assert_within(weight.grad, ref_w.grad, scale["weight"], tol, "dW")
    if bias is not None:
        _assert_within(bias.grad, ref_b.grad, scale["bias"], tol, "db")
    # dX and dT come back in x's dtype: rounded to it once.
    if p["x_grad"]:
        _assert_within(x_leaf.grad, ref_x.grad, scale["x"], TOLERANCE[dtype], "dX")
    if p["t_grad"]:
        _assert_within(t_leaf.grad, ref_t.grad, scale["target"], TOLERANCE[dtype], "dT")


def _absolute_sums(x_leaf, t_leaf, weight, bias, p) -> dict[str, torch.Tensor]:
    """The loss and gradient formulas evaluated on absolute values (float64): the scale of each result's
    rounding error. a = |X|·|W|ᵀ + |b| + |T| bounds each residual's terms."""
    n = p["n"]
    x = _view(x_leaf, p["layout"], n).reshape(n, -1).abs()
    t = _view(t_leaf, "3-D" if p["layout"] == "3-D" else "contiguous", n).reshape(n, -1).abs()
    a = x @ weight.abs().t() + t + (bias.abs() if bias is not None else 0)
    k = 2.0 / a.numel() if p["reduction"] == "mean" else 2.0
    out = {"loss": (a * a).sum() * k / 2, "weight": k * a.t() @ x, "bias": k * a.sum(0)}
    out["x"] = _leaf_grad_of_view(k * a @ weight.abs(), x_leaf, p["layout"], n)
    out["target"] = (k * a).reshape(t_leaf.shape)
    return out


def _leaf_grad_of_view(v: torch.Tensor, leaf: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    """What autograd leaves on ``leaf`` when ``v`` (N, D) is the gradient of its view."""
    base = leaf.detach().clone().requires_grad_()
    view = _view(base, layout, n)
    view.backward(v.reshape(view.shape))
    return base.grad


def _assert_within(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: not finite"
    err = float((out.detach().double() - ref.detach().double()).norm() / scale.double().norm().clamp_min(1e-300))
    assert err <= tol, f"{what}: error {err:.3g} of the absolute-value scale > {tol:.3g}"


@st.composite
def sgd_runs(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    options = dict(lr=draw(st.sampled_from([0.01, 0.05])), momentum=momentum,
                   dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])), nesterov=nesterov,
                   weight_decay=draw(st.sampled_from([0.0, 0.01])), maximize=draw(st.booleans()))
    return dict(options=options, n=draw(st.integers(1, 40)), d=draw(st.integers(1, 20)), o=draw(st.integers(1, 8)),
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                reduction=draw(st.sampled_from(["mean", "sum"])),
                how=draw(st.sampled_from(["in-backward", "train_step", "step"])),
                steps=draw(st.integers(1, 6)), seed=draw(st.integers(0, 2**31 - 1)))


TRAJECTORY_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@given(r=sgd_runs())
def test_fused_sgd_trajectories_match_torch_sgd(backend, r):
    """A few steps of FusedSGD (in the backward, train_step, or .grad + step()) on fresh random batches
    against torch.optim.SGD in float64: parameters and every momentum buffer."""
    gen = torch.Generator().manual_seed(r["seed"])
    model = FusedLinearRegressor(r["d"], r["o"], bias=r["bias"], dtype=r["dtype"], backend=backend).to(DEVICE)
    ref = torch.nn.Linear(r["d"], r["o"], bias=r["bias"], dtype=torch.float64).to(DEVICE)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    opt = FusedSGD(model.parameters(), backend=backend, **r["options"])
    ref_opt = torch.optim.SGD(ref.parameters(), **r["options"])
    for _ in range(r["steps"]):
        x = torch.randn(r["n"], r["d"], generator=gen).to(DEVICE, r["dtype"])
        t = torch.randn(r["n"], r["o"], generator=gen).to(DEVICE, r["dtype"])
        if r["how"] == "in-backward":
            model.loss(x, t, r["reduction"], optimizer=opt).backward()
        elif r["how"] == "train_step":
            model.train_step(x, t, opt, r["reduction"])
        else:
            opt.zero_grad()
            model.loss(x, t, r["reduction"]).backward()
            opt.step()
        ref_opt.zero_grad()
        F.mse_loss(ref(x.double()), t.double(), reduction=r["reduction"]).backward()
        ref_opt.step()
    tol = TRAJECTORY_TOL[r["dtype"]]
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, tol, name)
        if r["options"]["momentum"]:
            assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], tol, f"{name} buffer")
