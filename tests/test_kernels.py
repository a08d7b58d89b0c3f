"""The kernels' launch helpers directly: small block configs that force every
loop (D chunks, several tiles per program, several programs), row gathers,
outputs poisoned with NaN before each launch; the SGD update and the
persistent fit kernel against torch.optim.SGD in float64. Runs wherever the
Triton backend can."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close, random_problem
from torch import nn

from linreg_fused.backend import select_ops
from linreg_fused.kernels.config import TileConfig, ReduceConfig
from linreg_fused.kernels.specs import ColumnTarget, SGDHyper


def tiny(out_features: int, use_dot: bool) -> TileConfig:
    """Small blocks and 3 programs, so every loop runs: 16-wide for tl.dot (its
    minimum), narrower for the FMA products. BLOCK_O must cover O."""
    o = 1 << (out_features - 1).bit_length()
    if use_dot:
        return TileConfig(block_n=16, block_d=16, block_o=max(16, o), use_dot=True, max_programs=3)
    return TileConfig(block_n=8, block_d=4, block_o=o, use_dot=False, max_programs=3)


PRODUCTS = pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "fma"])


@pytest.fixture
def kernels():
    from linreg_fused.kernels import fused_fit, linear_forward, linear_mse_grad, reduce_update

    select_ops("triton", DEVICE)  # skips nothing: fails loudly if Triton cannot run here
    return linear_mse_grad, reduce_update, linear_forward, fused_fit


@pytest.mark.parametrize("shape", [(70, 37, 3), (100, 16, 17), (5, 50, 1)], ids=str)
@pytest.mark.parametrize("gather", [False, True])
@PRODUCTS
def test_partial_sums(shape, gather, use_dot, kernels, poisoned):
    linear_mse_grad = kernels[0]
    n, d, o = shape
    x, w, b, t = random_problem(n, d, o, device=DEVICE)
    rows = torch.randperm(n, device=DEVICE)[: max(1, n - 7)] if gather else None
    p = linear_mse_grad.linear_mse_partials(x, w, b, t, row_index=rows, store_residual=True, config=tiny(o, use_dot))
    xs, ts = (x[rows], t[rows]) if gather else (x, t)
    r = xs.double() @ w.double().t() + b.double() - ts.double()
    sums = p.buffer.double().sum(0)
    block_n = tiny(o, use_dot).block_n
    assert p.buffer.shape == (min(3, -(-r.shape[0] // block_n)), o * d + o + 1)
    tol = TOLERANCE[torch.float32]
    start, count = p.weight_columns
    assert_close(sums[start : start + count].view(o, d), r.t() @ xs.double(), tol, "Σ RᵀX")
    start, count = p.bias_columns
    assert_close(sums[start : start + count], r.sum(0), tol, "Σ R")
    assert_close(sums[p.loss_column], (r * r).sum(), tol, "Σ R²")
    assert_close(p.residual, r, tol, "R")


def test_reduce_is_deterministic_and_scaled(kernels, poisoned):
    """Two gradient targets and the loss in one launch; bitwise the same twice."""
    _, reduce_update, _, _ = kernels
    # Positive sums (like Σ R²): no cancellation, so the fp32 bound holds per column.
    partials = torch.rand(37, 300, device=DEVICE) + 0.5
    grad_output = torch.tensor(0.5, device=DEVICE)
    cfg = ReduceConfig(block_p=4, block_cols=64)
    runs = []
    for _ in range(2):
        a, b, loss = torch.empty(250, device=DEVICE), torch.empty(30, device=DEVICE), torch.empty((), device=DEVICE)
        reduce_update.reduce_update_(partials, [ColumnTarget(13, a), ColumnTarget(263, b)], scale=3.0,
                                     grad_output=grad_output, loss_out=loss, loss_column=299, loss_scale=0.25,
                                     config=cfg)
        runs.append((a, b, loss))
    assert all(torch.equal(u, v) for u, v in zip(*runs))
    a, b, loss = runs[0]
    ref = partials.double()
    assert_close(a, ref[:, 13:263].sum(0) * 1.5, TOLERANCE[torch.float32], "first target")
    assert_close(b, ref[:, 263:293].sum(0) * 1.5, TOLERANCE[torch.float32], "second target")
    assert_close(loss, ref[:, 299].sum() * 0.25, TOLERANCE[torch.float32], "loss column")
    single = reduce_update.sum_column(partials, 7, 0.25, torch.empty((), device=DEVICE))
    assert_close(single, ref[:, 7].sum() * 0.25, TOLERANCE[torch.float32], "sum_column")
    with pytest.raises(ValueError, match="one or two targets"):
        reduce_update.reduce_update_(partials, [], scale=1.0)


def _sgd_group(param: torch.Tensor, h: SGDHyper) -> dict:
    return dict(params=[param], lr=h.lr, momentum=h.momentum, dampening=h.dampening, weight_decay=h.weight_decay,
                nesterov=h.nesterov, maximize=h.maximize)


HYPERS = [
    SGDHyper(lr=0.1),
    SGDHyper(lr=0.1, momentum=0.9, dampening=0.2),
    SGDHyper(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    SGDHyper(lr=0.05, momentum=0.5, weight_decay=0.1, maximize=True),
]


@pytest.mark.parametrize("hyper", HYPERS, ids=["plain", "dampening", "nesterov-wd", "maximize-wd"])
@pytest.mark.parametrize("init_buffer", [True, False])
def test_sgd_update_matches_torch_sgd(hyper, init_buffer, kernels):
    """Weight-like and bias-like targets with different hyper-parameters, one
    launch, against torch.optim.SGD in float64 given the summed gradient."""
    _, reduce_update, _, _ = kernels
    partials = torch.randn(5, 77, device=DEVICE)
    params = [torch.randn(11, 6, device=DEVICE), torch.randn(4, device=DEVICE)]
    hypers = [hyper, SGDHyper(lr=0.2, momentum=0.3, dampening=0.6)]
    bufs = [torch.zeros_like(p) if init_buffer else torch.randn_like(p) for p in params]
    grad_output = torch.tensor(2.0, device=DEVICE)

    refs = [p.double().clone().requires_grad_() for p in params]
    sums = partials.double().sum(0) * 0.5 * 2.0
    for ref, col in zip(refs, (3, 69)):
        ref.grad = sums[col : col + ref.numel()].view_as(ref)
    ref_opt = torch.optim.SGD([_sgd_group(r, h) for r, h in zip(refs, hypers)], lr=0.1)
    for ref, buf, h in zip(refs, bufs, hypers):
        if h.momentum and not init_buffer:
            ref_opt.state[ref]["momentum_buffer"] = buf.double().clone()
    ref_opt.step()

    targets = [ColumnTarget(col, p, h, b if h.momentum else None, init_buffer)
               for col, p, b, h in zip((3, 69), params, bufs, hypers)]
    reduce_update.reduce_update_(partials, targets, scale=0.5, grad_output=grad_output,
                                 config=ReduceConfig(block_p=2, block_cols=16))
    for i, (param, buf, ref, h) in enumerate(zip(params, bufs, refs, hypers)):
        assert_close(param, ref, TOLERANCE[torch.float32], f"param {i}")
        if h.momentum:
            assert_close(buf, ref_opt.state[ref]["momentum_buffer"], TOLERANCE[torch.float32], f"momentum buffer {i}")


@pytest.mark.parametrize("shape", [(9, 70, 1), (33, 5, 70)], ids=str)
@PRODUCTS
def test_inference_kernel_multi_block(shape, use_dot, kernels, poisoned):
    _, _, linear_forward, _ = kernels
    n, d, o = shape
    x, w, b, _ = random_problem(n, d, o, device=DEVICE)
    cfg = TileConfig(16, 16, 16, True) if use_dot else TileConfig(8, 4, 4, False)  # O in several blocks
    y = linear_forward.linear_forward(x, w, b, out_dtype=torch.float32, config=cfg)
    assert_close(y, x.double() @ w.double().t() + b.double(), TOLERANCE[torch.float32], "Y")


FIT_CASES = {
    "tutorial": dict(n=15, d=3, o=2, batch=5, bias=True, mean=True, w=SGDHyper(lr=1e-2), b=SGDHyper(lr=1e-2)),
    "ragged-momentum": dict(n=23, d=4, o=3, batch=6, bias=True, mean=True,
                            w=SGDHyper(lr=0.02, momentum=0.9, weight_decay=0.01, nesterov=True),
                            b=SGDHyper(lr=0.05, momentum=0.5, dampening=0.1)),
    "dampening-maximize": dict(n=13, d=5, o=2, batch=4, bias=True, mean=True,
                               w=SGDHyper(lr=0.03, momentum=0.8, dampening=0.4, weight_decay=0.05, maximize=True),
                               b=SGDHyper(lr=0.02, momentum=0.7, dampening=0.25, weight_decay=0.2, maximize=True)),
    "bias-momentum-only": dict(n=11, d=3, o=4, batch=3, bias=True, mean=True,
                               w=SGDHyper(lr=0.02), b=SGDHyper(lr=0.03, momentum=0.9, dampening=0.3)),
    "no-bias-sum": dict(n=10, d=1, o=1, batch=3, bias=False, mean=False,
                        w=SGDHyper(lr=0.005, momentum=0.9, dampening=0.2), b=SGDHyper(lr=0.0)),
    "single-row": dict(n=1, d=2, o=1, batch=1, bias=True, mean=True, w=SGDHyper(lr=0.1), b=SGDHyper(lr=0.1)),
}


def _eager_fit_float64(x, t, weight, bias, buffers, perms, batch_size, mean, hypers):
    """The epochs of fit_small written as the tutorial's loop in float64: nn.Linear,
    F.mse_loss and torch.optim.SGD (one param group per parameter), over the given
    row orders. buffers: the momentum buffers to start from (None: SGD makes them).
    Returns ((weight, bias), (weight buffer, bias buffer), history): each
    epoch's (mean batch loss, last batch loss), as fit_small records them.
    Runs on the CPU whatever device the inputs are on (copy_ and .cpu() bring them over)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    params = [linear.weight] + ([linear.bias] if bias is not None else [])
    opt = torch.optim.SGD([_sgd_group(p, h) for p, h in zip(params, hypers)], lr=hypers[0].lr)
    for p, h, buf in zip(params, hypers, buffers):
        if h.momentum and buf is not None:
            opt.state[p]["momentum_buffer"] = buf.double().cpu().clone()
    x, t, perms = x.double().cpu(), t.double().cpu(), perms.cpu()
    history = []
    for perm in perms:
        losses = []
        for start in range(0, x.shape[0], batch_size):
            rows = perm[start : start + batch_size]
            loss = F.mse_loss(linear(x[rows]), t[rows], reduction="mean" if mean else "sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append((sum(losses) / len(losses), losses[-1]))
    bufs = [opt.state[p].get("momentum_buffer") for p in params] + [None] * (2 - len(params))
    return (linear.weight, linear.bias), bufs, torch.tensor(history, dtype=torch.float64)


@pytest.mark.parametrize("init", [True, False], ids=["new-buffers", "old-buffers"])
@pytest.mark.parametrize("case", list(FIT_CASES))
def test_persistent_fit_matches_eager_sgd(case, init, kernels):
    """The one-launch fit against the tutorial's loop in float64 (nn.Linear +
    F.mse_loss + optim.SGD) over the same row orders: weight, bias, both
    momentum buffers and the loss history. Buffers of parameters without
    momentum are left untouched."""
    fused_fit = kernels[3]
    c = FIT_CASES[case]
    n, d, o = c["n"], c["d"], c["o"]
    x, w, b, t = random_problem(n, d, o, device=DEVICE, bias=c["bias"])
    if not init:  # the same values in column-major storage: the kernel must follow the strides
        x, t = x.t().contiguous().t(), t.t().contiguous().t()
    epochs = 7
    perms = torch.stack([torch.randperm(n, device=DEVICE) for _ in range(epochs)])
    hypers = (c["w"], c["b"])
    start_bufs = (torch.randn_like(w), torch.randn_like(b) if b is not None else None)
    if init:  # new buffers: zero-filled by FusedSGD; SGD's first step sets them to the gradient
        start_bufs = (torch.zeros_like(w), torch.zeros_like(b) if b is not None else None)
    wk, bk = w.clone(), (b.clone() if b is not None else None)
    bufk = [v.clone() if v is not None else None for v in start_bufs]
    history = torch.full((epochs, 2), float("nan"), device=DEVICE)  # mean and last batch loss per epoch
    fused_fit.fit_small(x, t, wk, bk, bufk[0], bufk[1], perms, history, batch_size=c["batch"], mean=c["mean"],
                        weight_hyper=hypers[0], bias_hyper=hypers[1], init_weight_buffer=init,
                        init_bias_buffer=init)

    (wr, br), bufr, hr = _eager_fit_float64(x, t, w, b, [None, None] if init else start_bufs, perms.cpu(),
                                            c["batch"], c["mean"], hypers)
    tol = 2e-5  # float32 steps against float64 ones, a few dozen steps
    assert_close(history, hr, tol, "history")
    assert_close(wk, wr, tol, "weight")
    if c["bias"]:
        assert_close(bk, br, tol, "bias")
    for i, (name, h) in enumerate(zip(("weight", "bias"), hypers)):
        if bufk[i] is None:
            continue
        if h.momentum:
            assert_close(bufk[i], bufr[i], tol, f"{name} momentum buffer")
        else:
            assert torch.equal(bufk[i], start_bufs[i]), f"{name} has no momentum, yet its buffer changed"


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
def test_persistent_fit_keeps_last_finite_epoch(kernels):
    """A run that diverges writes back the weight, bias and both momentum
    buffers as they were at the end of the last finite epoch: exactly what a
    run of only those epochs writes."""
    fused_fit = kernels[3]
    x, w, b, t = random_problem(12, 3, 2, device=DEVICE, scale=30.0)
    perms = torch.stack([torch.randperm(12, device=DEVICE) for _ in range(40)])
    w_hyper = SGDHyper(lr=0.01, momentum=0.5, dampening=0.1)  # diverges on this scale of x after a few epochs
    b_hyper = SGDHyper(lr=0.02, momentum=0.3)
    runs = []
    for n_epochs in (40, None):
        if n_epochs is None:  # the second run: only the finite epochs of the first
            finite = torch.isfinite(runs[0][-1][:, 0])
            n_epochs = int((~finite).nonzero()[0, 0])
            assert n_epochs > 1 and finite[:n_epochs].all()
        state = [w.clone(), b.clone(), torch.zeros_like(w), torch.zeros_like(b)]
        history = torch.full((n_epochs, 2), float("nan"), device=DEVICE)
        fused_fit.fit_small(x, t, *state, perms[:n_epochs], history, batch_size=4, mean=True, weight_hyper=w_hyper,
                            bias_hyper=b_hyper, init_weight_buffer=True, init_bias_buffer=True)
        runs.append((*state, history))
    for name, diverged, finite_only in zip(("weight", "bias", "weight buffer", "bias buffer"), runs[0], runs[1]):
        assert torch.isfinite(finite_only).all() and torch.equal(diverged, finite_only), name
    assert torch.equal(runs[0][-1][: len(runs[1][-1])], runs[1][-1])


def test_config_must_cover_out_features(kernels):
    x, w, b, t = random_problem(4, 3, 17, device=DEVICE)
    with pytest.raises(ValueError, match="block_o"):
        kernels[0].linear_mse_partials(x, w, b, t, config=tiny(4, True))
