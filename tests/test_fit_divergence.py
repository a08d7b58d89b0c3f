"""A step that makes the parameters non-finite is a divergence even when every
loss fit saw was finite (each loss is taken before its step): fit raises
TrainingDivergedError and restores the parameters, on every path."""

import copy

import pytest
import torch
from conftest import DEVICE

import linreg_fused.fit_per_batch as fit_per_batch
from linreg_fused import FusedLinearRegressor, FusedSGD, TrainingDivergedError
from linreg_fused.backend import select_ops

pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")

# Full batch: the case, one step per epoch. Mini-batches: the rows are in storage order and
# only the last batch has non-zero rows (no bias), so only an epoch's last step moves the weights.
PATHS = ["one-launch", "statistics", "full-batch-eager", "one-launch-batches", "per-batch", "graphed", "eager",
         "batches"]
MINI_BATCH = {"one-launch-batches", "per-batch", "graphed", "eager", "batches"}


class _Replay:
    """The CUDA-graph stand-in of test_fit_graphs: a replay runs the captured function."""

    def __init__(self, fn):
        self.replay = fn


def _fit(path, backend, monkeypatch, epochs, lr, nan=False):
    """fit on 13 rows scaled by 1e3 along ``path`` (nan: one NaN in the last row, unchecked); returns
    (start state, model, error)."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(13, 3, generator=g) * 1e3).to(DEVICE), torch.randn(13, 2, generator=g).to(DEVICE)
    if path in MINI_BATCH:
        x[:10], y[:10] = 0.0, 0.0
    if nan:
        x[12, 1] = float("nan")
    ops_type = type(select_ops(backend, DEVICE))
    calls = []
    real = ops_type.fit_small
    monkeypatch.setattr(ops_type, "fit_small", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    if path in ("per-batch", "graphed"):
        monkeypatch.setattr(ops_type, "fit_small_supported", lambda self, *args: False)
    if path == "graphed":
        monkeypatch.setattr(fit_per_batch, "graph_capture_possible", lambda *args: True)
        monkeypatch.setattr(fit_per_batch, "graphed_epoch", _Replay)
        monkeypatch.setattr(fit_per_batch, "_WARM", set())
    model = FusedLinearRegressor(3, 2, bias=path not in MINI_BATCH, backend=backend).to(DEVICE)
    start = copy.deepcopy(model.state_dict())
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if "eager" in path
           else FusedSGD(model.parameters(), lr=lr, backend=backend))
    kwargs = dict(epochs=epochs, optimizer=opt, statistics=path == "statistics", check_finite=not nan)
    if path == "batches":
        data = ([(x[i : i + 5], y[i : i + 5]) for i in range(0, 13, 5)],)  # check_finite applies to batches too
    else:
        data = (x, y)
        kwargs.update(shuffle=False, batch_size=5 if path in MINI_BATCH else None)
    with pytest.raises(TrainingDivergedError) as info:
        model.fit(*data, **kwargs)
    assert bool(calls) == path.startswith("one-launch"), "the path meant to be walked is not the one that ran"
    return start, model, info.value


@pytest.mark.parametrize("epochs", [1, 3])
@pytest.mark.parametrize("path", PATHS)
def test_an_overflowing_last_step_is_a_divergence(path, epochs, backend, monkeypatch):
    """The issue's case: fit(randn(13, 3)·1e3, randn(13, 2), epochs=1, lr=1e36) returned normally with
    infinite weights. Epoch 1's losses are finite, its last step is not: epoch 1 diverged, whatever
    follows it (with 3 epochs, the statistics path finds it by replaying its launch: the first
    non-finite loss is epoch 2's), and the parameters go back to their values before fit."""
    start, model, err = _fit(path, backend, monkeypatch, epochs, lr=1e36)
    assert err.epoch == 1 and len(err.history) == 1 and torch.isfinite(torch.tensor(err.history)).all()
    assert f"at epoch 1/{epochs}" in str(err) and "non-finite parameters" in str(err)
    assert "values before fit" in str(err)
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), f"{name} not restored"


@pytest.mark.parametrize("path", PATHS)
def test_a_nan_loss_is_a_divergence_though_the_parameters_stay_finite(path, backend, monkeypatch):
    """lr=0 and a NaN in the unchecked data: every loss is NaN, nothing moves, so only the loss says it."""
    start, model, err = _fit(path, backend, monkeypatch, 2, lr=0.0, nan=True)
    assert err.epoch == 1 and "non-finite loss (nan)" in str(err)
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name
