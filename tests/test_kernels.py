"""The kernels' launch helpers directly: small block configs that force every
loop (D chunks, several tiles per program, several programs), row gathers,
outputs poisoned with NaN before each launch, and the persistent fit kernel
against its pure-PyTorch reference. Runs wherever the Triton backend can."""

import pytest
import torch
from conftest import DEVICE
from oracle import TOLERANCE, assert_close, random_problem

from linreg_fused.backend import select_ops
from linreg_fused.kernels.config import TileConfig, ReduceConfig
from linreg_fused.kernels.specs import ColumnTarget, SGDHyper
from linreg_fused.reference import TORCH_OPS


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


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty returns NaN-filled memory, so an unwritten output shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


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


HYPERS = [
    SGDHyper(lr=0.1),
    SGDHyper(lr=0.1, momentum=0.9, dampening=0.2),
    SGDHyper(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    SGDHyper(lr=0.05, momentum=0.5, weight_decay=0.1, maximize=True),
]


@pytest.mark.parametrize("hyper", HYPERS, ids=["plain", "dampening", "nesterov-wd", "maximize-wd"])
@pytest.mark.parametrize("init_buffer", [True, False])
def test_sgd_update_matches_reference(hyper, init_buffer, kernels):
    """Weight-like and bias-like targets with different hyper-parameters, one launch."""
    _, reduce_update, _, _ = kernels
    partials = torch.randn(5, 77, device=DEVICE)
    params = [torch.randn(11, 6, device=DEVICE), torch.randn(4, device=DEVICE)]
    hypers = [hyper, SGDHyper(lr=0.2, momentum=0.3)]
    bufs = [torch.zeros_like(p) if init_buffer else torch.randn_like(p) for p in params]
    grad_output = torch.tensor(2.0, device=DEVICE)
    refs = [(p.double(), b.double()) for p, b in zip(params, bufs)]
    ref_targets = [ColumnTarget(col, p, h, b if h.momentum else None, init_buffer)
                   for col, (p, b), h in zip((3, 69), refs, hypers)]
    TORCH_OPS.reduce_update_(partials.double(), ref_targets, scale=0.5, grad_output=grad_output.double())
    targets = [ColumnTarget(col, p, h, b if h.momentum else None, init_buffer)
               for col, p, b, h in zip((3, 69), params, bufs, hypers)]
    reduce_update.reduce_update_(partials, targets, scale=0.5, grad_output=grad_output,
                                 config=ReduceConfig(block_p=2, block_cols=16))
    for i, ((param, buf), (ref_param, ref_buf), h) in enumerate(zip(zip(params, bufs), refs, hypers)):
        assert_close(param, ref_param, TOLERANCE[torch.float32], f"param {i}")
        if h.momentum:
            assert_close(buf, ref_buf, TOLERANCE[torch.float32], f"momentum buffer {i}")


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
    "tutorial": dict(n=15, d=3, o=2, batch=5, bias=True, mean=True, w=SGDHyper(lr=1e-5), b=SGDHyper(lr=1e-5)),
    "ragged-momentum": dict(n=23, d=4, o=3, batch=6, bias=True, mean=True,
                            w=SGDHyper(lr=0.02, momentum=0.9, weight_decay=0.01, nesterov=True),
                            b=SGDHyper(lr=0.05, momentum=0.5, dampening=0.1)),
    "no-bias-sum": dict(n=10, d=1, o=1, batch=3, bias=False, mean=False,
                        w=SGDHyper(lr=0.005, momentum=0.9, maximize=False), b=SGDHyper(lr=0.0)),
    "single-row": dict(n=1, d=2, o=1, batch=1, bias=True, mean=True, w=SGDHyper(lr=0.1), b=SGDHyper(lr=0.1)),
}


@pytest.mark.parametrize("init", [True, False], ids=["new-buffers", "old-buffers"])
@pytest.mark.parametrize("case", list(FIT_CASES))
def test_persistent_fit_matches_reference(case, init, kernels):
    """The one-launch fit against TorchOps.fit_small (the same steps, one at a time)."""
    fused_fit = kernels[3]
    c = FIT_CASES[case]
    n, d, o = c["n"], c["d"], c["o"]
    x, w, b, t = random_problem(n, d, o, device=DEVICE, bias=c["bias"])
    epochs = 7
    perms = torch.stack([torch.randperm(n, device=DEVICE) for _ in range(epochs)])
    results = []
    for impl in ("kernel", "reference"):
        wi, bi = w.clone(), (b.clone() if b is not None else None)
        bufs = [torch.zeros_like(wi) if init else torch.full_like(wi, 0.1),
                (torch.zeros_like(bi) if init else torch.full_like(bi, -0.2)) if bi is not None else None]
        history = torch.empty(epochs, 2, device=DEVICE)  # mean and last batch loss per epoch
        kwargs = dict(batch_size=c["batch"], mean=c["mean"], weight_hyper=c["w"], bias_hyper=c["b"],
                      init_weight_buffer=init, init_bias_buffer=init)
        run = fused_fit.fit_small if impl == "kernel" else TORCH_OPS.fit_small
        run(x, t, wi, bi, bufs[0], bufs[1], perms, history, **kwargs)
        results.append((history, wi, bi, bufs))
    (hk, wk, bk, bufk), (hr, wr, br, bufr) = results
    tol = 1e-5
    assert_close(hk, hr, tol, "history")
    assert_close(wk, wr, tol, "weight")
    if c["bias"]:
        assert_close(bk, br, tol, "bias")
    if c["w"].momentum:
        assert_close(bufk[0], bufr[0], tol, "weight buffer")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
def test_persistent_fit_keeps_last_finite_epoch(kernels):
    fused_fit = kernels[3]
    x, w, b, t = random_problem(12, 3, 2, device=DEVICE, scale=30.0)
    perms = torch.stack([torch.randperm(12, device=DEVICE) for _ in range(40)])
    hyper = SGDHyper(lr=0.02)  # diverges on this scale of x after a few epochs
    history = torch.empty(40, 2, device=DEVICE)
    w1, b1 = w.clone(), b.clone()
    fused_fit.fit_small(x, t, w1, b1, None, None, perms, history, batch_size=4, mean=True, weight_hyper=hyper,
                        bias_hyper=hyper, init_weight_buffer=False, init_bias_buffer=False)
    finite = torch.isfinite(history[:, 0])
    bad = int((~finite).nonzero()[0, 0])
    assert bad > 0 and finite[:bad].all()
    w2, b2 = w.clone(), b.clone()
    fused_fit.fit_small(x, t, w2, b2, None, None, perms[:bad], torch.empty(bad, 2, device=DEVICE), batch_size=4,
                        mean=True, weight_hyper=hyper, bias_hyper=hyper, init_weight_buffer=False,
                        init_bias_buffer=False)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_config_must_cover_out_features(kernels):
    x, w, b, t = random_problem(4, 3, 17, device=DEVICE)
    with pytest.raises(ValueError, match="block_o"):
        kernels[0].linear_mse_partials(x, w, b, t, config=tiny(4, True))
