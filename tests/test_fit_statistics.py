"""fit's full-batch statistics path (linreg_fused.fit_statistics.StatisticsPath): the same
history and parameters as a pass per epoch and as the float64 eager loop, on
every SGD option, both backends; divergence; the chooser and its errors."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import assert_close
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD, TrainingDivergedError
from linreg_fused.fit_statistics import StatisticsPath, statistics_cost
from linreg_fused.train import TensorSource, choose_path

# fp32 fit vs float64 eager, 15 full-batch epochs: the pass per epoch sums fp32 products of the
# residuals; the statistics path forms the loss from fp32-accurate statistics (LinearStats).
TRAJECTORY_TOL = 5e-5

OPTIONS = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.02, momentum=0.9),
    "nesterov-wd": dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05),
    "dampening-maximize": dict(lr=0.01, momentum=0.8, dampening=0.3, maximize=True),  # ascends, stays finite
}


def _problem(n=150, d=7, o=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + 0.5
    y = x @ torch.randn(o, d, generator=g).t() + 0.2 * torch.randn(n, o, generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _eager(linear, x, y, epochs, options, reduction="mean", frozen=()):
    """Full-batch nn.Linear + F.mse_loss + torch.optim.SGD in float64."""
    ref = copy.deepcopy(linear).double()
    for name in frozen:
        getattr(ref, name).requires_grad_(False)
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], **options)
    history = []
    for _ in range(epochs):
        loss = F.mse_loss(ref(x.double()), y.double(), reduction=reduction)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return ref, opt, history


def _fit(linear, x, y, epochs, options, backend, statistics, reduction="mean", frozen=(), **kwargs):
    model = FusedLinearRegressor.from_linear(linear, backend=backend).to(DEVICE)
    for name in frozen:
        getattr(model, name).requires_grad_(False)
    opt = FusedSGD(model.parameters(), backend=backend, **options)
    history = model.fit(x, y, epochs=epochs, optimizer=opt, reduction=reduction, statistics=statistics,
                        progress=False, **kwargs)
    return model, opt, history


@pytest.mark.parametrize("case", list(OPTIONS))
def test_same_trajectory_as_a_pass_per_epoch_and_eager(case, backend):
    options = OPTIONS[case]
    x, y = _problem()
    linear = nn.Linear(7, 3).to(DEVICE)
    epochs = 15
    stats_model, stats_opt, stats_history = _fit(linear, x, y, epochs, options, backend, True)
    pass_model, pass_opt, pass_history = _fit(linear, x, y, epochs, options, backend, False)
    ref, ref_opt, ref_history = _eager(linear, x, y, epochs, options)
    for history in (stats_history, pass_history):
        assert len(history) == epochs and all(isinstance(v, float) for v in history)
        assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "loss history")
    for model, opt in ((stats_model, stats_opt), (pass_model, pass_opt)):
        assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
        assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")
        if options.get("momentum"):
            assert_close(opt.state[model.weight]["momentum_buffer"], ref_opt.state[ref.weight]["momentum_buffer"],
                         TRAJECTORY_TOL, "weight momentum buffer")
            assert_close(opt.state[model.bias]["momentum_buffer"], ref_opt.state[ref.bias]["momentum_buffer"],
                         TRAJECTORY_TOL, "bias momentum buffer")
    assert_close(torch.tensor(stats_history), torch.tensor(pass_history), TRAJECTORY_TOL, "statistics vs pass")


@pytest.mark.parametrize("frozen", [("weight",), ("bias",)], ids=["frozen-weight", "frozen-bias"])
def test_frozen_parameters_and_sum_reduction(frozen, backend):
    options = dict(lr=2e-4, momentum=0.5, weight_decay=0.01)
    x, y = _problem(n=90, d=4, o=2, seed=1)
    linear = nn.Linear(4, 2).to(DEVICE)
    model, _, history = _fit(linear, x, y, 12, options, backend, True, reduction="sum", frozen=frozen)
    ref, _, ref_history = _eager(linear, x, y, 12, options, reduction="sum", frozen=frozen)
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "loss history")
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")
    assert_close(model.bias, ref.bias, TRAJECTORY_TOL, "bias")
    assert torch.equal(getattr(model, frozen[0]), getattr(linear, frozen[0])), "a frozen parameter does not move"


def test_no_bias_and_report_chunks(backend, capsys):
    """log_every splits the epochs into launches: the buffers carry over between them."""
    options = dict(lr=0.03, momentum=0.9, nesterov=True)
    x, y = _problem(n=64, d=5, o=1, seed=2)
    linear = nn.Linear(5, 1, bias=False).to(DEVICE)
    model, opt, history = _fit(linear, x, y, 12, options, backend, True, log_every=5)
    whole, _, whole_history = _fit(linear, x, y, 12, options, backend, True)
    assert capsys.readouterr().out.count("Epoch [") == 2
    assert_close(torch.tensor(history), torch.tensor(whole_history), 1e-12, "chunked vs one launch")
    assert torch.equal(model.weight, whole.weight)
    ref, _, ref_history = _eager(linear, x, y, 12, options)
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
def test_divergence_restores_the_last_finite_epoch(backend):
    x, y = _problem(n=80, d=4, o=2, seed=3)
    x = x * 10
    linear = nn.Linear(4, 2).to(DEVICE)
    options = dict(lr=0.05, momentum=0.9)  # diverges after a few epochs on this scale of x
    runs = {}
    for statistics in (True, False):
        model = FusedLinearRegressor.from_linear(linear, backend=backend).to(DEVICE)
        opt = FusedSGD(model.parameters(), backend=backend, **options)
        with pytest.raises(TrainingDivergedError) as info:
            model.fit(x, y, epochs=40, optimizer=opt, statistics=statistics, progress=False)
        runs[statistics] = (info.value, model, opt)
    # The same trajectory while it is finite. Where it overflows depends on the arithmetic (a pass
    # per epoch squares and sums fp32 residuals, the statistics path forms the mean in fp64 and
    # rounds it to fp32), so the two may call the divergence an epoch or two apart; each restores
    # its own last finite epoch, replayed here in float64.
    common = min(err.epoch for err, _, _ in runs.values()) - 1
    assert_close(torch.tensor(runs[True][0].history[:common]), torch.tensor(runs[False][0].history[:common]), 1e-3,
                 "finite prefix of the history")
    for err, model, opt in runs.values():
        assert err.epoch > 1 and f"end of epoch {err.epoch - 1}" in str(err)
        ref, ref_opt, _ = _eager(linear, x, y, err.epoch - 1, options)
        # Loose: the run is growing geometrically just before it diverges, so rounding grows fast.
        assert_close(model.weight, ref.weight, 1e-3, "weight at the last finite epoch")
        assert_close(opt.state[model.weight]["momentum_buffer"], ref_opt.state[ref.weight]["momentum_buffer"], 1e-3,
                     "momentum buffer at the last finite epoch")


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
def test_divergence_in_the_first_epoch_restores_the_start(backend):
    x, y = _problem(n=30, d=3, o=2)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    start = copy.deepcopy(model.state_dict())
    opt = FusedSGD(model.parameters(), lr=float("inf"), momentum=0.5, backend=backend)
    # Epoch 1's loss is finite; its step is not: epoch 1 diverged, and fit goes back to before it.
    with pytest.raises(TrainingDivergedError, match="non-finite parameters .* at epoch 1/4") as info:
        model.fit(x, y, epochs=4, optimizer=opt, statistics=True)
    assert "values before fit" in str(info.value) and len(info.value.history) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), f"{name} not restored"
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())
    x = x.clone()
    x[0, 0] = float("nan")
    start = copy.deepcopy(model.state_dict())
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.5, backend=backend)
    with pytest.raises(TrainingDivergedError, match="at epoch 1/") as info:
        model.fit(x, y, epochs=4, optimizer=opt, statistics=True, check_finite=False)
    assert "values before fit" in str(info.value)
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), f"{name} not restored"
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())  # made in the failed epoch


def test_cost_model():
    """statistics_cost on the benchmark regimes (nominal H100 figures): one pass and small epochs
    beat 100 passes; a single epoch does not pay for the statistics' pass, nor do tiny problems
    that a pass-per-epoch kernel runs in one launch."""
    for n, d, o in ((4_194_304, 64, 4), (1_048_576, 256, 16), (262_144, 1024, 8)):
        stats, passes = statistics_cost(n, d, o, 100, 4, one_launch=False, epochs_in_one_launch=d <= 256)
        assert stats < passes / 1.5, (n, d, o, stats, passes)
        stats, passes = statistics_cost(n, d, o, 1, 4, one_launch=False, epochs_in_one_launch=d <= 256)
        assert stats > passes
    stats, passes = statistics_cost(15, 3, 2, 100, 4, one_launch=True)
    assert stats > passes


def test_chooser(backend):
    model = FusedLinearRegressor(16, 4, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1)
    x, t = torch.randn(100_000, 16, device=DEVICE), torch.randn(100_000, 4, device=DEVICE)
    full = TensorSource(x, t, batch_size=100_000, shuffle=True, generator=None)
    mini = TensorSource(x, t, batch_size=1000, shuffle=True, generator=None)
    if backend == "triton":  # the model's figures are a GPU's: one launch of epochs against 2 launches an epoch
        assert isinstance(choose_path(model, opt, full, "mean", 100, True), StatisticsPath)
    # One epoch: the statistics' pass costs more than a plain one.
    assert not isinstance(choose_path(model, opt, full, "mean", 1, True), StatisticsPath)
    assert not isinstance(choose_path(model, opt, full, "mean", 100, True, statistics=False), StatisticsPath)
    assert isinstance(choose_path(model, opt, full, "mean", 1, True, statistics=True), StatisticsPath)
    assert not isinstance(choose_path(model, opt, mini, "mean", 100, True), StatisticsPath)


def test_statistics_true_errors(backend):
    x, y = _problem(n=20, d=3, o=2)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    with pytest.raises(ValueError, match="batch_size=5 < 20 rows"):
        model.fit(x, y, epochs=2, batch_size=5, lr=0.1, statistics=True)
    with pytest.raises(ValueError, match="SGD"):
        model.fit(x, y, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), statistics=True)
    with pytest.raises(ValueError, match="iterable of batches"):
        model.fit([(x, y)], epochs=2, lr=0.1, statistics=True)
    hooked = FusedSGD(model.parameters(), lr=0.1, backend=backend)
    hooked.register_step_post_hook(lambda *args: None)  # one launch of many steps cannot call it per step
    with pytest.raises(ValueError, match="without step hooks; this fit has step hooks"):
        model.fit(x, y, epochs=2, optimizer=hooked, statistics=True)
    with pytest.raises(TypeError, match="statistics must be"):
        model.fit(x, y, epochs=2, lr=0.1, statistics="yes")
    wide = FusedLinearRegressor(300_000, 1, backend=backend).to(DEVICE)  # (D+1)² float64: ~700 GB
    with pytest.raises(ValueError, match=r"statistics=True: the statistics of in_features=300000 need .* GiB"):
        wide.fit(torch.randn(2, 300_000, device=DEVICE), torch.randn(2, 1, device=DEVICE), epochs=2, lr=0.1,
                 statistics=True)


def test_the_logged_last_batch_loss_is_the_epoch_loss(backend, capsys, poisoned):
    """One batch per epoch: the log line's last-batch loss is the epoch's loss, as on a pass per
    epoch (the history's second column is written, not left as allocated: here NaN)."""
    x, y = _problem()
    linear = nn.Linear(7, 3).to(DEVICE)
    _, _, ref_history = _eager(linear, x, y, 4, dict(lr=0.05))
    _fit(linear, x, y, 4, dict(lr=0.05), backend, True, log_every=1)
    logged = re.findall(r"^Epoch \[\d+/4\], Loss: (\S+), Epoch mean loss: (\S+)$", capsys.readouterr().out,
                        re.MULTILINE)
    assert len(logged) == 4
    assert_close(torch.tensor([float(last) for last, _ in logged]), torch.tensor(ref_history), 1e-4, "last batch")
    assert_close(torch.tensor([float(mean) for _, mean in logged]), torch.tensor(ref_history), 1e-4, "mean")
