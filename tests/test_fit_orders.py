"""fit's row orders: DataLoader's exactly (drawn in bulk where that is cheaper,
with the generator left where DataLoader leaves it), and shuffle="device"."""

import copy

import pytest
import torch
from conftest import DEVICE
from oracle import assert_close, eager_fit
from torch.utils.data import DataLoader, TensorDataset

import linreg_fused.fit_orders as fit_orders
from linreg_fused import FusedLinearRegressor
from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields


def _loader(n_rows, epochs, generator, shuffle=True):
    loader = DataLoader(TensorDataset(torch.arange(n_rows)), batch_size=n_rows, shuffle=shuffle, generator=generator)
    return torch.stack([torch.cat([rows for (rows,) in loader]) for _ in range(epochs)])


@pytest.mark.parametrize("n_rows, epochs", [(1, 4), (2, 3), (15, 100), (37, 40), (300, 5), (1000, 3)])
@pytest.mark.parametrize("seed", [0, 2**40 + 7])
def test_dataloader_orders_are_dataloaders(n_rows, epochs, seed):
    """Both ways of drawing (the bulk draw where N <= epochs, PyTorch's calls otherwise), a generator and
    the global RNG, shuffled or not: DataLoader's orders, and the RNG left where DataLoader leaves it."""
    for shuffle in (True, False):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got = fit_orders.dataloader_orders(n_rows, epochs, shuffle, ours, torch.device("cpu"))
        assert torch.equal(got, _loader(n_rows, epochs, theirs, shuffle)), shuffle
        assert torch.equal(ours.get_state(), theirs.get_state())
        torch.manual_seed(seed)
        got = fit_orders.dataloader_orders(n_rows, epochs, shuffle, None, torch.device("cpu"))
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(got, _loader(n_rows, epochs, None, shuffle)) and torch.equal(torch.get_rng_state(), after)


def test_the_tutorial_draws_in_bulk(monkeypatch):
    """The bulk draw matches PyTorch's own on this build, and the tutorial's shape takes it (15 rows, here 20
    epochs: N <= epochs)."""
    assert fit_orders._bulk_draws_match()
    calls = []
    real = fit_orders._bulk_orders
    monkeypatch.setattr(fit_orders, "_bulk_orders", lambda *args: calls.append(args[1:]) or real(*args))
    x, y = crop_yields(device=DEVICE)
    FusedLinearRegressor(3, 2, backend="torch").to(DEVICE).fit(x, y, epochs=20, batch_size=5, lr=1e-5, seed=0)
    assert calls == [(15, 20)]


@pytest.mark.parametrize("path", ["one-launch", "per-batch"])
def test_device_shuffle_is_seeded_and_trains_on_its_orders(path, backend, monkeypatch):
    """shuffle="device": the same seed gives the same run, another seed another one; the run is the
    tutorial's loop in float64 over the orders device_orders draws from that seed; the global RNG is
    not touched."""
    if path == "per-batch":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    x, y = crop_yields(device=DEVICE)
    torch.manual_seed(0)
    base = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    rng = torch.get_rng_state()
    runs = [copy.deepcopy(base) for _ in range(3)]
    histories = [m.fit(x, y, epochs=4, batch_size=5, lr=1e-5, shuffle="device", seed=seed)
                 for m, seed in zip(runs, (5, 5, 6))]
    assert torch.equal(torch.get_rng_state(), rng)
    assert histories[0] == histories[1] and torch.equal(runs[0].weight, runs[1].weight)
    assert histories[0] != histories[2]

    generator = torch.Generator(DEVICE).manual_seed(5)
    orders = fit_orders.device_orders(15, 4, generator, DEVICE)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(15, device=DEVICE).expand(4, -1))
    linear = torch.nn.Linear(3, 2).to(DEVICE)
    with torch.no_grad():
        linear.weight.copy_(base.weight)
        linear.bias.copy_(base.bias)
    ref, _, ref_history = eager_fit(linear, x, y, orders.cpu(), 5, dict(lr=1e-5))
    assert_close(torch.tensor(histories[0]), torch.tensor(ref_history), 5e-5, "history")
    assert_close(runs[0].weight, ref.weight, 5e-5, "weight")


def test_device_shuffle_without_a_seed_draws_one_number_from_the_rng():
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2, backend="torch").to(DEVICE)
    torch.manual_seed(3)
    a = model.fit(x, y, epochs=2, batch_size=5, lr=0.0, shuffle="device")
    after = torch.get_rng_state()
    torch.manual_seed(3)
    torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(torch.get_rng_state(), after)
    torch.manual_seed(3)
    assert model.fit(x, y, epochs=2, batch_size=5, lr=0.0, shuffle="device") == a
    with pytest.raises(ValueError, match="shuffle must be"):
        model.fit(x, y, epochs=1, lr=0.0, shuffle="host")
    with pytest.raises(ValueError, match="shuffle='device' applies to tensor inputs"):
        model.fit([(x, y)], epochs=1, lr=0.0, shuffle="device")
