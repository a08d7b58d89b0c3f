"""fit: the tutorial's training loop on the device, against the tutorial's
loop itself (nn.Linear + F.mse_loss + optim.SGD in float64) over the batches
a real DataLoader draws. Every way through fit is walked: the one-launch
kernel, one fused step per batch, and the eager path of other optimizers."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close, assert_state_close, eager_fit, loader_orders
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from linreg_fused import FusedLinearRegressor, FusedSGD, TrainingDivergedError
from linreg_fused.backend import select_ops
from linreg_fused.cli import main
from linreg_fused.data import crop_yields

TRAJECTORY_TOL = 5e-5  # fp32 fit vs float64 eager, a few hundred steps


def _problem(n=37, d=4, o=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(o, d, generator=g).t() + 0.1 * torch.randn(n, o, generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _walk(path, backend, monkeypatch):
    """Make fit take ``path`` ("one-launch" or "per-batch" with FusedSGD);
    returns a list that records every one-launch kernel call, so the test
    can check that the path it meant to walk is the one that ran."""
    ops_type = type(select_ops(backend, DEVICE))
    if path == "per-batch":
        monkeypatch.setattr(ops_type, "fit_small_supported", lambda self, *args: False)
    calls, real = [], ops_type.fit_small

    def spy(self, *args, **kwargs):
        calls.append(True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ops_type, "fit_small", spy)
    return calls


def _optimizer(path, params, backend, **options):
    """FusedSGD for the fused paths; torch.optim.SGD walks the eager path."""
    return torch.optim.SGD(params, **options) if path == "eager" else FusedSGD(params, backend=backend, **options)


PATHS = ["one-launch", "per-batch"]
ALL_PATHS = ["one-launch", "per-batch", "eager"]
OPTIONS = [dict(lr=0.02), dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01),
           dict(lr=0.01, momentum=0.9, dampening=0.2, maximize=True)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "nesterov-wd", "dampening-maximize"])
def test_fit_trajectory_matches_eager_loop(options, path, backend, monkeypatch):
    one_launch = _walk(path, backend, monkeypatch)
    x, y = _problem()
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = FusedSGD(model.parameters(), backend=backend, **options)
    epochs, batch_size = 12, 8  # 37 rows: the last batch of each epoch has 5
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, optimizer=opt, seed=3, progress=False)
    assert bool(one_launch) == (path == "one-launch")
    ref, ref_opt, ref_history = eager_fit(linear, x, y, loader_orders(37, epochs, 3), batch_size, options)
    assert len(history) == epochs and all(isinstance(v, float) for v in history)
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "loss history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_each_epoch_draws_a_new_row_order(path, backend, monkeypatch):
    """With lr=0 nothing moves, so each epoch's loss is the mean over its batches
    at fixed parameters: it depends only on how the rows were split (the last
    batch of 37 rows in 8s has 5). Each epoch must give DataLoader's split, and
    a new one."""
    _walk(path, backend, monkeypatch)
    x, y = _problem(seed=5)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    history = model.fit(x, y, epochs=6, batch_size=8, optimizer=_optimizer(path, model.parameters(), backend, lr=0.0),
                        seed=8)
    _, _, ref_history = eager_fit(linear, x, y, loader_orders(37, 6, 8), 8, dict(lr=0.0))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TOLERANCE[torch.float32], "per-epoch loss")
    assert len(set(history)) == 6, f"epochs repeat a split: {history}"


def test_crop_yields_are_the_tutorials_data():
    inputs, targets = crop_yields()
    assert inputs.dtype == targets.dtype == torch.float32
    assert inputs.tolist() == [[73, 67, 43], [91, 88, 64], [87, 134, 58], [102, 43, 37], [69, 96, 70],
                               [74, 66, 43], [91, 87, 65], [88, 134, 59], [101, 44, 37], [68, 96, 71],
                               [73, 66, 44], [92, 87, 64], [87, 135, 57], [103, 43, 36], [68, 97, 70]]
    assert targets.tolist() == [[56, 70], [81, 101], [119, 133], [22, 37], [103, 119], [57, 69], [80, 102],
                                [118, 132], [21, 38], [104, 118], [57, 69], [82, 100], [118, 134], [20, 38],
                                [102, 120]]


def test_tutorial_fit(backend):
    """The tutorial: 15 crop-yield rows, batch 5, lr 1e-5, 100 epochs (report every 10)."""
    x, y = crop_yields(device=DEVICE)
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    history = model.fit(x, y, epochs=100, batch_size=5, lr=1e-5, seed=0, log_every=10, print_fn=lambda s: None)
    ref, _, ref_history = eager_fit(linear, x, y, loader_orders(15, 100, 0), 5, dict(lr=1e-5))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "loss history")
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")
    assert history[-1] < history[0] / 5  # it learned


def test_fit_on_a_dataloader(backend):
    x, y = crop_yields(device="cpu")
    linear = nn.Linear(3, 2)
    model = FusedLinearRegressor.from_linear(linear, backend=backend).to(DEVICE)
    dl = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    opt = FusedSGD(model.parameters(), lr=1e-5, momentum=0.5, backend=backend)
    history = model.fit(dl, epochs=6, optimizer=opt)

    ref = copy.deepcopy(linear).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-5, momentum=0.5)
    dl_ref = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    ref_history = []
    for _ in range(6):  # the tutorial's fit, verbatim
        losses = []
        for xb, yb in dl_ref:
            loss = F.mse_loss(ref(xb.double()), yb.double())
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            losses.append(loss.item())
        ref_history.append(sum(losses) / len(losses))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


def test_fit_with_a_torch_optimizer(backend):
    x, y = _problem(seed=1)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    history = model.fit(x, y, epochs=5, batch_size=10, optimizer=opt, seed=2)
    ref, ref_opt, ref_history = eager_fit(linear, x, y, loader_orders(37, 5, 2), 10, dict(lr=0.02, momentum=0.9))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_fit_dtypes(path, dtype, backend, monkeypatch):
    """float64 end to end (the kernels accumulate in float64: a float64 bound
    holds), and bfloat16 data with float32 weights (computed in float32)."""
    one_launch = _walk(path, backend, monkeypatch)
    x, y = _problem(n=21, seed=9)
    x, y = x.to(dtype), y.to(dtype)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    start = nn.Linear(4, 3).to(device=DEVICE, dtype=param_dtype)
    model = FusedLinearRegressor.from_linear(start, backend=backend)
    options = dict(lr=0.02, momentum=0.5)
    opt = FusedSGD(model.parameters(), backend=backend, **options)
    history = model.fit(x, y, epochs=4, batch_size=5, optimizer=opt, seed=2)
    assert bool(one_launch) == (path == "one-launch")
    ref, ref_opt, ref_history = eager_fit(start, x, y, loader_orders(21, 4, 2), 5, options)
    tol = 1e-12 if dtype == torch.float64 else TRAJECTORY_TOL
    assert_close(torch.tensor(history, dtype=torch.float64), torch.tensor(ref_history, dtype=torch.float64), tol,
                 "history")
    assert_state_close(model, opt, ref, ref_opt, tol)


@pytest.mark.parametrize("path", ALL_PATHS + ["batches"])
def test_reduction_sum(path, backend, monkeypatch):
    """reduction="sum" trains on F.mse_loss(..., reduction="sum") on every path
    (batches: an iterable of (xb, yb), here a DataLoader)."""
    one_launch = _walk(path, backend, monkeypatch)
    x, y = _problem(n=23, seed=6)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    options = dict(lr=0.002, momentum=0.5)
    opt = _optimizer(path, model.parameters(), backend, **options)
    if path == "batches":
        loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=6, shuffle=True,
                            generator=torch.Generator().manual_seed(4))
        history = model.fit(loader, epochs=4, optimizer=opt, reduction="sum")
    else:
        history = model.fit(x, y, epochs=4, batch_size=6, optimizer=opt, seed=4, reduction="sum")
    assert bool(one_launch) == (path == "one-launch")
    ref, ref_opt, ref_history = eager_fit(linear, x, y, loader_orders(23, 4, 4), 6, options, reduction="sum")
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_non_contiguous_inputs(path, backend, monkeypatch):
    """x = (D, N) tensor transposed, targets likewise: the kernels read them
    through their strides (no copy), and train exactly as on contiguous data."""
    one_launch = _walk(path, backend, monkeypatch)
    g = torch.Generator().manual_seed(7)
    xt = torch.randn(4, 29, generator=g)  # (D, N)
    yt = torch.randn(2, 4, generator=g) @ xt + 0.1 * torch.randn(2, 29, generator=g)  # (O, N)
    x, y = xt.to(DEVICE).t(), yt.to(DEVICE).t()
    assert x.stride() == (1, 29) and not y.is_contiguous()
    linear = nn.Linear(4, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    options = dict(lr=0.03, momentum=0.5)
    opt = _optimizer(path, model.parameters(), backend, **options)
    history = model.fit(x, y, epochs=5, batch_size=7, optimizer=opt, seed=1)
    assert bool(one_launch) == (path == "one-launch")
    ref, ref_opt, ref_history = eager_fit(linear, x, y, loader_orders(29, 5, 1), 7, options)
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


def test_paths_agree_and_seed_reproduces(backend, monkeypatch):
    x, y = _problem(seed=2)
    base = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    runs = []
    for path in PATHS:
        for _ in range(2 if path == "one-launch" else 1):
            _walk(path, backend, monkeypatch)
            model = copy.deepcopy(base)
            history = model.fit(x, y, epochs=4, batch_size=6, lr=0.01, seed=11)
            runs.append((history, model.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])  # same seed, same run
    assert_close(torch.tensor(runs[2][0]), torch.tensor(runs[0][0]), TOLERANCE[torch.float32] * 10, "paths")
    other = copy.deepcopy(base).fit(x, y, epochs=4, batch_size=6, lr=0.01, seed=12)
    assert other != runs[2][0]


@pytest.mark.parametrize("batch_size", [8, None], ids=["batch-8", "full-batch"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_no_shuffle(path, batch_size, backend, monkeypatch):
    """shuffle=False: the batches are the rows in storage order, every epoch."""
    one_launch = _walk(path, backend, monkeypatch)
    x, y = _problem(seed=3)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    options = dict(lr=0.05, momentum=0.5)
    opt = _optimizer(path, model.parameters(), backend, **options)
    history = model.fit(x, y, epochs=3, batch_size=batch_size, optimizer=opt, shuffle=False)  # default: full batch
    assert bool(one_launch) == (path == "one-launch")
    orders = loader_orders(37, 3, shuffle=False)
    assert torch.equal(orders[-1], torch.arange(37))
    ref, ref_opt, ref_history = eager_fit(linear, x, y, orders, batch_size or 37, options)
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_state_close(model, opt, ref, ref_opt, TRAJECTORY_TOL)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize("path", ALL_PATHS)
def test_divergence_is_reported_and_parameters_restored(path, backend, monkeypatch):
    """lr 5e-4 with momentum 0.9 on the raw crop data blows up after a few
    epochs; the parameters and both momentum buffers are left as they were at
    the end of the last finite epoch."""
    _walk(path, backend, monkeypatch)
    x, y = crop_yields(device=DEVICE)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    options = dict(lr=5e-4, momentum=0.9)
    opt = _optimizer(path, model.parameters(), backend, **options)
    with pytest.raises(TrainingDivergedError, match="smaller learning rate") as info:
        model.fit(x, y, epochs=60, batch_size=5, optimizer=opt, seed=0)
    err = info.value
    assert 1 < err.epoch < 60 and f"epoch {err.epoch}/60" in str(err)
    assert f"end of epoch {err.epoch - 1}" in str(err)
    assert not math.isfinite(err.history[-1]) and all(math.isfinite(v) for v in err.history[:-1])

    # The tutorial's loop over the finite epochs only.
    ref, ref_opt, ref_history = eager_fit(linear, x, y, loader_orders(15, 60, 0)[: err.epoch - 1], 5, options)
    # Loose: the run is chaotic just before it diverges (the loss grows ~10x an epoch), so rounding grows fast.
    assert_close(torch.tensor(err.history[:-1]), torch.tensor(ref_history), 1e-3, "history")
    assert_state_close(model, opt, ref, ref_opt, 1e-3, "at the last finite epoch: ")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize("buffers", ["new", "kept"])
@pytest.mark.parametrize("path", ALL_PATHS)
def test_divergence_in_the_first_epoch_restores_the_start(path, buffers, backend, monkeypatch):
    """Parameters and momentum buffers as they were before fit, bitwise: a
    buffer that fit created is removed, one that existed keeps its value."""
    one_launch = _walk(path, backend, monkeypatch)
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    start = copy.deepcopy(model.state_dict())
    opt = _optimizer(path, model.parameters(), backend, lr=1e6, momentum=0.5)  # inf within 3 steps
    if buffers == "kept":
        for p in model.parameters():
            opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    before = {name: opt.state[p].get("momentum_buffer") for name, p in model.named_parameters()}
    before = {name: b.clone() if b is not None else None for name, b in before.items()}
    with pytest.raises(TrainingDivergedError, match="at epoch 1/") as info:
        model.fit(x, y, epochs=5, batch_size=5, optimizer=opt)
    assert bool(one_launch) == (path == "one-launch")
    assert "values before fit" in str(info.value)
    for k, v in start.items():
        assert torch.equal(model.state_dict()[k], v), k
    for name, p in model.named_parameters():
        if before[name] is None:
            assert "momentum_buffer" not in opt.state[p], f"{name}: the buffer made in the diverged epoch is left"
        else:
            assert torch.equal(opt.state[p]["momentum_buffer"], before[name]), f"{name}: buffer not restored"


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize("path", ALL_PATHS)
def test_a_nan_epoch_is_a_divergence_too(path, backend, monkeypatch):
    """A NaN loss that never overflowed (a NaN in unchecked data) is not finite either: fit
    raises at that epoch and leaves the parameters as they were before it, not NaN."""
    _walk(path, backend, monkeypatch)
    x, y = crop_yields(device=DEVICE)
    x = x.clone()
    x[7, 1] = float("nan")
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    start = copy.deepcopy(model.state_dict())
    opt = _optimizer(path, model.parameters(), backend, lr=1e-5, momentum=0.5)
    with pytest.raises(TrainingDivergedError, match="at epoch 1/"):
        model.fit(x, y, epochs=4, batch_size=5, optimizer=opt, seed=0, check_finite=False)
    for k, v in start.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_log_every_prints_like_the_tutorial(backend, capsys):
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    history = model.fit(x, y, epochs=30, batch_size=5, lr=1e-5, log_every=10, seed=0)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(", Loss: ")[0] for line in lines] == [f"Epoch [{e}/30]" for e in (10, 20, 30)]
    assert [line.split("Epoch mean loss: ")[1] for line in lines] == [f"{history[e - 1]:.4f}" for e in (10, 20, 30)]


def test_fit_bad_arguments():
    model = FusedLinearRegressor(3, 2)
    x, y = crop_yields()
    with pytest.raises(ValueError, match="optimizer"):
        model.fit(x, y, epochs=1)
    with pytest.raises(ValueError, match="not both"):
        model.fit(x, y, epochs=1, lr=0.1, optimizer=FusedSGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="epochs"):
        model.fit(x, y, epochs=0, lr=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        model.fit(x, y, epochs=1, lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match="targets"):
        model.fit(x, epochs=1, lr=0.1)
    with pytest.raises(TypeError, match="targets must be a torch.Tensor"):
        model.fit(x, y.tolist(), epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="target has shape"):
        model.fit(x, y[:, :1], epochs=1, lr=0.1)
    bad = x.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="row 4"):
        model.fit(bad, y, epochs=1, lr=0.1)
    # Unchecked, the NaN reaches the loss and is reported as a divergence instead.
    with pytest.raises(TrainingDivergedError, match="epoch 1/1"):
        model.fit(bad, y, epochs=1, lr=0.1, check_finite=False)


@pytest.mark.parametrize("backend_arg", ["triton", "torch", "auto"])
def test_main_job(backend_arg, capsys):
    """The command line trains what the tutorial's loop trains with the same
    options: its printed losses, predictions and new-region forecast against
    the loop in float64 (nn.Linear initialised from the seed, DataLoader batches)."""
    args = dict(seed=0, epochs=20, lr=2e-5, momentum=0.5, batch_size=4, log_every=5)
    assert main([f"--{k.replace('_', '-')}={v}" for k, v in args.items()] + [f"--backend={backend_arg}"]) == 0
    out = capsys.readouterr().out
    triton = backend_arg == "triton" or (backend_arg == "auto" and select_ops("auto", DEVICE).name == "triton")
    assert out.startswith("linreg-fused: Triton kernels" if triton else "linreg-fused: PyTorch reference")

    torch.manual_seed(0)
    x, y = crop_yields()
    last = []
    ref, _, ref_history = eager_fit(nn.Linear(3, 2), x, y, loader_orders(15, 20, 0), 4,
                                     dict(lr=2e-5, momentum=0.5), last_losses=last)
    logged = re.findall(r"^Epoch \[(\d+)/20\], Loss: (\S+), Epoch mean loss: (\S+)$", out, re.MULTILINE)
    assert [int(e) for e, _, _ in logged] == [5, 10, 15, 20]
    # Loss: the epoch's last batch loss, as the tutorial prints loss.item(); then the epoch's mean.
    assert_close(torch.tensor([float(v) for _, v, _ in logged]), torch.tensor(last[4::5]), 1e-4, "logged losses")
    assert_close(torch.tensor([float(v) for _, _, v in logged]), torch.tensor(ref_history[4::5]), 1e-4,
                 "logged mean losses")
    with torch.no_grad():
        preds, new = ref(x.double()), ref(torch.tensor([[75.0, 63.0, 44.0]], dtype=torch.float64))
    rows = [line.split() for line in out.splitlines() if re.fullmatch(r" +-?\d+\.\d\d +-?\d+\.\d\d +\d+ +\d+", line)]
    assert len(rows) == 15
    printed = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    assert torch.allclose(printed[:, :2], preds, rtol=1e-4, atol=0.006), "predictions"
    assert torch.equal(printed[:, 2:], y.double()), "targets"
    forecast = re.search(r"new region \(temp 75, rainfall 63, humidity 44\): apples (\S+), oranges (\S+)$", out,
                         re.MULTILINE)
    assert forecast is not None
    assert torch.allclose(torch.tensor([float(v) for v in forecast.groups()], dtype=torch.float64), new[0],
                          rtol=1e-4, atol=0.006), "new-region forecast"


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
def test_main_job_reports_divergence(capsys):
    assert main(["--lr", "1.0", "--epochs", "5"]) == 1
    captured = capsys.readouterr()
    assert "error: non-finite loss" in captured.err and "smaller learning rate" in captured.err
    assert "new region" not in captured.out
