"""fit: the tutorial's training loop on the device, against the eager loop
(nn.Linear + F.mse_loss + optim.SGD over the same shuffled batches)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import TOLERANCE, assert_close
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from linreg_fused import FusedLinearRegressor, FusedSGD, TrainingDivergedError
from linreg_fused.backend import select_ops
from linreg_fused.cli import main
from linreg_fused.data import crop_yields

TRAJECTORY_TOL = 5e-5  # fp32 fit vs float64 eager, a few hundred steps


def _eager_fit(linear, x, y, perms, batch_size, options, dtype=torch.float64):
    """The tutorial's fit, in float64, over the given per-epoch row orders.
    Returns the model, the optimizer and each epoch's mean batch loss."""
    ref = copy.deepcopy(linear).to(dtype)
    opt = torch.optim.SGD(ref.parameters(), **options)
    history = []
    for perm in perms:
        losses = []
        for s in range(0, x.shape[0], batch_size):
            rows = perm[s : s + batch_size]
            loss = F.mse_loss(ref(x[rows].to(dtype)), y[rows].to(dtype))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
    return ref, opt, history


def _loader_orders(n_rows, epochs, seed):
    """Each epoch's row order as DataLoader(shuffle=True) draws it from a generator seeded with ``seed``."""
    loader = DataLoader(TensorDataset(torch.arange(n_rows)), batch_size=n_rows, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return torch.stack([torch.cat([rows for (rows,) in loader]) for _ in range(epochs)]).to(DEVICE)


def _problem(n=37, d=4, o=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(o, d, generator=g).t() + 0.1 * torch.randn(n, o, generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _per_step_only(monkeypatch, backend):
    """Force the one-step-per-batch path (no persistent kernel)."""
    monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)


OPTIONS = [dict(lr=0.02), dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01),
           dict(lr=0.01, momentum=0.9, dampening=0.2, maximize=True)]


@pytest.mark.parametrize("path", ["persistent", "per-step"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "nesterov-wd", "dampening-maximize"])
def test_fit_trajectory_matches_eager_loop(options, path, backend, monkeypatch):
    if path == "per-step":
        _per_step_only(monkeypatch, backend)
    x, y = _problem()
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = FusedSGD(model.parameters(), backend=backend, **options)
    epochs, batch_size = 12, 8  # 37 rows: the last batch of each epoch has 5
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, optimizer=opt, seed=3, progress=False)
    perms = _loader_orders(37, epochs, 3)
    ref, ref_opt, ref_history = _eager_fit(linear, x, y, perms, batch_size, options)
    assert len(history) == epochs and all(isinstance(v, float) for v in history)
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "loss history")
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")
    if options.get("momentum"):
        assert_close(opt.state[model.weight]["momentum_buffer"], ref_opt.state[ref.weight]["momentum_buffer"],
                     TRAJECTORY_TOL, "momentum buffer")


def test_tutorial_fit(backend):
    """The tutorial: 15 crop-yield rows, batch 5, lr 1e-5, 100 epochs (report every 10)."""
    x, y = crop_yields(device=DEVICE)
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    history = model.fit(x, y, epochs=100, batch_size=5, lr=1e-5, seed=0, log_every=10, print_fn=lambda s: None)
    perms = _loader_orders(15, 100, 0)
    ref, _, ref_history = _eager_fit(linear, x, y, perms, 5, dict(lr=1e-5))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "loss history")
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert history[-1] < history[0] / 5  # it learned


def test_fit_on_a_dataloader(backend):
    x, y = crop_yields(device="cpu")
    linear = nn.Linear(3, 2)
    model = FusedLinearRegressor.from_linear(linear, backend=backend).to(DEVICE)
    dl = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    history = model.fit(dl, epochs=6, optimizer=FusedSGD(model.parameters(), lr=1e-5, backend=backend))

    ref = copy.deepcopy(linear).double()
    opt = torch.optim.SGD(ref.parameters(), lr=1e-5)
    dl_ref = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    ref_history = []
    for _ in range(6):  # the tutorial's fit, verbatim
        losses = []
        for xb, yb in dl_ref:
            loss = F.mse_loss(ref(xb.double()), yb.double())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        ref_history.append(sum(losses) / len(losses))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")


def test_fit_with_a_torch_optimizer(backend):
    x, y = _problem(seed=1)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.fit(x, y, epochs=5, batch_size=10, optimizer=opt, seed=2)
    perms = _loader_orders(37, 5, 2)
    ref, _, _ = _eager_fit(linear, x, y, perms, 10, dict(lr=0.02, momentum=0.9))
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")


def test_paths_agree_and_seed_reproduces(backend, monkeypatch):
    x, y = _problem(seed=2)
    base = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    runs = []
    for per_step in (False, False, True):
        if per_step:
            _per_step_only(monkeypatch, backend)
        model = copy.deepcopy(base)
        history = model.fit(x, y, epochs=4, batch_size=6, lr=0.01, seed=11)
        runs.append((history, model.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])  # same seed, same run
    assert_close(torch.tensor(runs[2][0]), torch.tensor(runs[0][0]), TOLERANCE[torch.float32] * 10, "paths")
    other = copy.deepcopy(base).fit(x, y, epochs=4, batch_size=6, lr=0.01, seed=12)
    assert other != runs[0][0]


@pytest.mark.parametrize("path", ["persistent", "per-step"])
def test_no_shuffle_and_full_batch(path, backend, monkeypatch):
    if path == "per-step":
        _per_step_only(monkeypatch, backend)
    x, y = _problem(seed=3)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    model.fit(x, y, epochs=3, lr=0.05, shuffle=False)  # full batch by default
    perms = [torch.arange(37, device=DEVICE)] * 3
    ref, _, _ = _eager_fit(linear, x, y, perms, 37, dict(lr=0.05))
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
@pytest.mark.parametrize("path", ["persistent", "per-step"])
def test_divergence_is_reported_and_parameters_restored(path, backend, monkeypatch):
    """lr 5e-4 with momentum 0.9 on the raw crop data blows up after a few epochs."""
    if path == "per-step":
        _per_step_only(monkeypatch, backend)
    x, y = crop_yields(device=DEVICE)
    start = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    model = copy.deepcopy(start)
    opt = FusedSGD(model.parameters(), lr=5e-4, momentum=0.9, backend=backend)
    with pytest.raises(TrainingDivergedError, match="smaller learning rate") as info:
        model.fit(x, y, epochs=60, batch_size=5, optimizer=opt, seed=0)
    err = info.value
    assert 1 < err.epoch < 60 and f"epoch {err.epoch}/60" in str(err)
    assert f"end of epoch {err.epoch - 1}" in str(err)
    assert not math.isfinite(err.history[-1]) and all(math.isfinite(v) for v in err.history[:-1])

    # The parameters and buffers are those at the end of the last finite epoch: replay it.
    perms = _loader_orders(15, 60, 0)
    ref = copy.deepcopy(start)
    ref_opt = FusedSGD(ref.parameters(), lr=5e-4, momentum=0.9, backend="torch")
    for perm in perms[: err.epoch - 1]:
        for s in range(0, 15, 5):
            ref.train_step(x[perm[s : s + 5]], y[perm[s : s + 5]], ref_opt)
    # Loose: the run is chaotic just before it diverges, so rounding grows fast.
    assert_close(model.weight, ref.weight, 1e-3, "weight at the last finite epoch")
    assert_close(opt.state[model.weight]["momentum_buffer"], ref_opt.state[ref.weight]["momentum_buffer"], 1e-3,
                 "momentum buffer at the last finite epoch")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
def test_divergence_in_the_first_epoch_restores_the_start(backend):
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    start = copy.deepcopy(model.state_dict())
    opt = FusedSGD(model.parameters(), lr=1e6, momentum=0.5, backend=backend)  # inf within 3 steps
    with pytest.raises(TrainingDivergedError, match="at epoch 1/") as info:
        model.fit(x, y, epochs=5, batch_size=5, optimizer=opt)
    assert "values before fit" in str(info.value)
    for k, v in start.items():
        assert torch.equal(model.state_dict()[k], v)
    assert "momentum_buffer" not in opt.state[model.weight]


def test_log_every_prints_like_the_tutorial(backend, capsys):
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    history = model.fit(x, y, epochs=30, batch_size=5, lr=1e-5, log_every=10, seed=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Epoch [{e}/30], Loss: {history[e - 1]:.4f}" for e in (10, 20, 30)]


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


def test_main_job(capsys):
    assert main(["--seed", "0", "--epochs", "20"]) == 0
    out = capsys.readouterr().out
    assert "Epoch [10/20], Loss:" in out and "Epoch [20/20], Loss:" in out
    assert "new region (temp 75, rainfall 63, humidity 44)" in out
    assert ("Triton kernels" in out) or ("PyTorch reference" in out)
    assert len([line for line in out.splitlines() if line.startswith("   ")]) == 15  # predictions vs targets


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
def test_main_job_reports_divergence(capsys):
    assert main(["--lr", "1.0", "--epochs", "5"]) == 1
    assert "smaller learning rate" in capsys.readouterr().out


class _ReplayStandIn:
    """Stands in for a CUDA graph on machines without CUDA: 'capture' runs
    nothing, a 'replay' runs the captured function on the static row buffer."""

    made = 0

    def __init__(self, run, n_rows, device):
        type(self).made += 1
        self.run, self.rows = run, torch.empty(n_rows, dtype=torch.int64, device=device)
        self.replays = 0

    def __call__(self, perm):
        self.rows.copy_(perm)
        self.replays += 1
        return self.run(self.rows)


def test_graphed_epochs_are_wired_like_eager_ones(backend, monkeypatch):
    """The CUDA-graph path's control flow (capture after the first epoch, the
    permutation copied into the static buffer before each replay) gives the
    eager per-batch run exactly; the graph itself is checked on a GPU."""
    import linreg_fused.train as train

    _per_step_only(monkeypatch, backend)
    x, y = _problem(seed=4)
    base = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(epochs=5, batch_size=8, seed=5, progress=False)
    h_eager = eager.fit(x, y, optimizer=FusedSGD(eager.parameters(), lr=0.01, momentum=0.9, backend=backend),
                        cuda_graph=False, **opts)
    monkeypatch.setattr(train, "_graph_capture_possible", lambda *args: True)
    monkeypatch.setattr(train, "graphed_epoch", _ReplayStandIn)
    _ReplayStandIn.made = 0
    h_graphed = graphed.fit(x, y, optimizer=FusedSGD(graphed.parameters(), lr=0.01, momentum=0.9, backend=backend),
                            **opts)
    assert _ReplayStandIn.made == 1
    assert h_graphed == h_eager
    assert torch.equal(graphed.weight, eager.weight) and torch.equal(graphed.bias, eager.bias)


def test_failed_capture_warns_and_stays_eager(backend, monkeypatch):
    import linreg_fused.train as train

    def failing(*args):
        raise RuntimeError("capture not supported here")

    _per_step_only(monkeypatch, backend)
    monkeypatch.setattr(train, "_graph_capture_possible", lambda *args: True)
    monkeypatch.setattr(train, "graphed_epoch", failing)
    x, y = _problem(seed=6)
    model = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        history = model.fit(x, y, epochs=3, batch_size=8, lr=0.01, seed=0)
    assert len(history) == 3 and all(math.isfinite(v) for v in history)


def test_permutations_drawn_in_bounded_chunks(backend, monkeypatch):
    """Row orders are drawn per chunk of epochs, capped in memory; the batches
    are still each epoch's permutation from the seeded generator."""
    import linreg_fused.train as train

    monkeypatch.setattr(train, "_PERMUTATION_BUDGET", 80)  # 2 epochs of 37 rows per draw
    x, y = _problem(seed=7)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    model.fit(x, y, epochs=5, batch_size=8, lr=0.02, seed=9)
    perms = _loader_orders(37, 5, 9)
    ref, _, _ = _eager_fit(linear, x, y, perms, 8, dict(lr=0.02))
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
