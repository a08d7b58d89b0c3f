"""fit's arguments as scikit-learn and NumPy users pass them, and the host
syncs fit makes: one up front (the data check) and one per report point."""

import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE

import linreg_fused.fit_per_batch as fit_per_batch
from linreg_fused import FusedLinearRegressor, FusedSGD, fit
from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields


def _model(dtype=torch.float32, backend="torch"):
    torch.manual_seed(0)
    return FusedLinearRegressor(3, 2, backend=backend).to(device=DEVICE, dtype=dtype)


def test_numpy_scalars_are_taken_as_their_values(backend):
    """np.int64 epochs/batch_size/log_every/seed and an np.float32 lr train as the Python numbers do
    (scikit-learn's searches pass array elements); bools are refused as before."""
    x, y = crop_yields(device=DEVICE)
    a, b = _model(backend=backend), _model(backend=backend)
    lines = []
    ha = a.fit(x, y, epochs=np.int64(4), batch_size=np.int64(5), lr=np.float32(2e-5), log_every=np.int64(2),
               seed=np.int64(3), print_fn=lines.append)
    hb = b.fit(x, y, epochs=4, batch_size=5, lr=float(np.float32(2e-5)), log_every=2, seed=3, print_fn=lambda s: None)
    assert ha == hb and torch.equal(a.weight, b.weight) and len(lines) == 2
    for bad, error in ((dict(epochs=np.bool_(True)), ValueError), (dict(batch_size=True), ValueError),
                       (dict(log_every=np.bool_(True)), ValueError), (dict(seed=np.bool_(True)), TypeError),
                       (dict(lr=True), TypeError), (dict(lr="0.1"), TypeError), (dict(seed=1.5), TypeError)):
        with pytest.raises(error):
            a.fit(x, y, **{"epochs": 1, "lr": 1e-5, **bad})


def test_a_tensor_lr_is_kept_as_a_tensor():
    x, y = crop_yields(device=DEVICE)
    m = _model()
    m.fit(x, y, epochs=1, lr=torch.tensor(1e-5))
    assert torch.isfinite(m.weight).all()


def test_float64_arrays_take_the_models_dtype_with_one_warning(backend):
    """model.fit(X, y) with NumPy float64 arrays for a float32 model: converted (not a dtype error),
    the same run as with the float32 arrays, and one warning when the conversion changed a value; none
    for float64 values that float32 holds exactly (the crop data), nor for float32 arrays widened for a
    float64 model."""
    x, y = crop_yields()
    rng = np.random.default_rng(0)
    x64 = x.numpy().astype(np.float64) + rng.normal(size=(15, 3)) * 1e-3  # not representable in float32
    y64 = y.numpy().astype(np.float64)
    a, b = _model(backend=backend), _model(backend=backend)
    with pytest.warns(UserWarning, match="changed some values") as caught:
        ha = a.fit(x64, y64, epochs=3, batch_size=5, lr=1e-5, seed=1)
    assert len([w for w in caught if "changed some values" in str(w.message)]) == 1
    hb = b.fit(x64.astype(np.float32), y64.astype(np.float32), epochs=3, batch_size=5, lr=1e-5, seed=1)
    assert ha == hb and torch.equal(a.weight, b.weight)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _model(backend=backend).fit(x.numpy().astype(np.float64), y64, epochs=1, lr=1e-5)  # exact in float32
        _model(backend=backend).fit(x.numpy().astype(np.int64), y64.astype(np.int32), epochs=1, lr=1e-5)
        wide = _model(torch.float64, backend=backend)
        h64 = wide.fit(x.numpy(), y.numpy(), epochs=2, batch_size=5, lr=1e-5, seed=1)  # float32 → float64
    ref = _model(torch.float64, backend=backend)
    assert h64 == ref.fit(x.double().to(DEVICE), y.double().to(DEVICE), epochs=2, batch_size=5, lr=1e-5, seed=1)
    with pytest.raises(TypeError, match="numeric arrays"):
        _model().fit(np.array([["a"] * 3] * 15), y64, epochs=1, lr=1e-5)


def test_numpy_batches_take_the_models_dtype():
    x, y = crop_yields()
    loader = [(x.numpy()[i : i + 5].astype(np.float64), y.numpy()[i : i + 5].astype(np.float64))
              for i in range(0, 15, 5)]
    a, b = _model(), _model()
    ha = a.fit(loader, epochs=2, lr=1e-5)
    hb = b.fit([(x[i : i + 5].to(DEVICE), y[i : i + 5].to(DEVICE)) for i in range(0, 15, 5)], epochs=2, lr=1e-5)
    assert ha == hb and torch.equal(a.weight, b.weight)


class _Reads:
    """Counts reads of tensor values on the host (item, tolist, bool, int, float, numpy) made by the
    library, except by fit_orders (it draws from host generators: no device work to wait for). The
    reference backend counts: with backend="torch" it is fit's path on a GPU too."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(real))

    def _counting(self, real):
        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "linreg_fused" in caller and not caller.endswith("fit_orders.py"):
                self.count += 1
            return real(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("path", ["one-launch", "per-batch", "graphed", "eager", "statistics"])
def test_one_sync_up_front_and_one_per_report_point(path, monkeypatch):
    """The tutorial, 12 epochs, a report every 4 (3 report points): 1 + 3 reads of the device on every
    path, 3 without the up-front data check."""
    x, y = crop_yields(device=DEVICE)
    ops_type = type(select_ops("torch", DEVICE))
    if path in ("per-batch", "graphed"):
        monkeypatch.setattr(ops_type, "fit_small_supported", lambda self, *args: False)
    if path == "graphed":
        monkeypatch.setattr(fit_per_batch, "graph_capture_possible", lambda *args: True)
        replay = type("Replay", (), {"__init__": lambda self, fn: setattr(self, "replay", fn)})
        monkeypatch.setattr(fit_per_batch, "graphed_epoch", replay)
    reads = _Reads(monkeypatch)
    for check_finite, expected in ((True, 4), (False, 3)):
        model = _model()
        opt = (torch.optim.SGD if path == "eager" else FusedSGD)(model.parameters(), lr=1e-5, momentum=0.5)
        reads.count = 0
        model.fit(x, y, epochs=12, batch_size=None if path == "statistics" else 5, optimizer=opt, seed=0,
                  log_every=4, print_fn=lambda s: None, check_finite=check_finite, statistics=path == "statistics")
        assert reads.count == expected, (path, check_finite, reads.count)


@pytest.mark.parametrize("batch_size, statistics", [(None, True), (None, False), (2, None)],
                         ids=["statistics", "full-batch", "mini-batches"])
def test_fused_sgd_without_the_models_parameters_raises_on_every_path(backend, batch_size, statistics):
    """A FusedSGD holding none of the parameters that require grad (another model's) is refused up
    front, as train_step refuses it, whichever path fit takes (the one-launch and statistics paths
    trained nothing and returned a history)."""
    model, other = FusedLinearRegressor(2, 1, backend=backend).to(DEVICE), FusedLinearRegressor(2, 1).to(DEVICE)
    x, t = torch.randn(6, 2, device=DEVICE), torch.randn(6, 1, device=DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="not in the optimizer"):
        fit(model, x, t, epochs=2, optimizer=FusedSGD(other.parameters(), lr=0.1), batch_size=batch_size,
            statistics=statistics)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
