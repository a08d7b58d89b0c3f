"""fit's side of the user: DataLoader's exact batches, what it accepts, and
the one clear error it gives for what it does not."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import assert_close
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from linreg_fused import FusedLinearRegressor, FusedSGD, TrainingDivergedError
from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields


def _tutorial_loop(linear, x, y, epochs, loader_generator, log_every=None, dtype=torch.float64):
    """The tutorial's fit, verbatim, over a real DataLoader; returns the model and what its
    print shows every ``log_every`` epochs (the last batch's loss)."""
    ref = copy.deepcopy(linear).to(dtype)
    opt = torch.optim.SGD(ref.parameters(), lr=1e-5)
    loader = DataLoader(TensorDataset(x.cpu().to(dtype), y.cpu().to(dtype)), batch_size=5, shuffle=True,
                        generator=loader_generator)
    printed = []
    for epoch in range(epochs):
        for xb, yb in loader:
            loss = F.mse_loss(ref(xb.to(DEVICE)), yb.to(DEVICE))
            loss.backward()
            opt.step()
            opt.zero_grad()
        if log_every and (epoch + 1) % log_every == 0:
            printed.append(loss.item())
    return ref, printed


@pytest.mark.parametrize("path", ["one-launch", "per-batch"])
def test_fit_draws_dataloaders_batches(path, backend, monkeypatch):
    """fit(..., generator=g) trains on exactly the batches DataLoader(shuffle=True, generator=g) draws:
    same parameters to fp32 rounding, the generator left in the same state; another seed is far off."""
    if path == "per-batch":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    x, y = crop_yields(device=DEVICE)
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    g_fit, g_loader = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    model.fit(x, y, epochs=20, batch_size=5, lr=1e-5, generator=g_fit)
    ref, _ = _tutorial_loop(linear, x, y, 20, g_loader)
    assert_close(model.weight, ref.weight, 2e-6, "weight")
    assert_close(model.bias, ref.bias, 2e-6, "bias")
    assert torch.equal(g_fit.get_state(), g_loader.get_state())
    other, _ = _tutorial_loop(linear, x, y, 20, torch.Generator().manual_seed(43))
    assert (other.weight - ref.weight).norm() / ref.weight.norm() > 1e-3  # the order matters at this tolerance


def test_fit_without_a_seed_draws_from_the_global_rng_like_dataloader(backend):
    x, y = crop_yields(device=DEVICE)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    torch.manual_seed(7)
    model.fit(x, y, epochs=5, batch_size=5, lr=1e-5)
    after_fit = torch.rand(3)
    torch.manual_seed(7)
    ref, _ = _tutorial_loop(linear, x, y, 5, None)
    assert torch.equal(torch.rand(3), after_fit)  # the global RNG moved exactly as the loader moved it
    assert_close(model.weight, ref.weight, 2e-6, "weight")


def test_fit_takes_numpy_arrays(backend):
    x, y = crop_yields()
    a = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    b = copy.deepcopy(a)
    ha = a.fit(x.numpy(), y.numpy(), epochs=3, batch_size=5, lr=1e-5, seed=1)
    hb = b.fit(x.to(DEVICE), y.to(DEVICE), epochs=3, batch_size=5, lr=1e-5, seed=1)
    assert ha == hb and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("path", ["one-launch", "per-batch"])
def test_log_prints_what_the_tutorial_prints_and_progress_uses_tqdm(path, backend, capsys, monkeypatch):
    """"Loss" is the last batch's loss, as the tutorial's print(loss.item()); the epoch mean has its own label."""
    if path == "per-batch":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    x, y = crop_yields(device=DEVICE)
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    lines = []
    history = model.fit(x, y, epochs=4, batch_size=5, lr=1e-5, seed=0, log_every=2, print_fn=lines.append,
                        progress=True)
    assert "4/4" in capsys.readouterr().err  # tqdm's bar, on stderr

    _, printed = _tutorial_loop(linear, x, y, 4, torch.Generator().manual_seed(0), log_every=2)
    assert [line.split(",")[0] for line in lines] == ["Epoch [2/4]", "Epoch [4/4]"]
    for line, last, mean in zip(lines, printed, (history[1], history[3])):
        assert abs(float(line.split("Loss: ")[1].split(",")[0]) - last) <= 1e-4 * abs(last) + 5e-5, line
        assert line.endswith(f"Epoch mean loss: {mean:.4f}"), line


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(epochs=True), ValueError, "epochs must be a positive integer"),
    (dict(epochs=2.0), ValueError, "epochs must be a positive integer"),
    (dict(epochs=2, log_every=0), ValueError, "log_every"),
    (dict(epochs=2, reduction="max"), ValueError, "reduction"),
    (dict(epochs=2, batch_size=0), ValueError, "batch_size"),
    (dict(epochs=2, seed=1, generator=torch.Generator()), ValueError, "either seed= or generator="),
    (dict(epochs=2, optimizer="sgd"), TypeError, "torch.optim.Optimizer"),
])
def test_bad_fit_arguments_get_one_clear_error(kwargs, error, match):
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2).to(DEVICE)
    kwargs.setdefault("lr", None if "optimizer" in kwargs else 1e-5)
    with pytest.raises(error, match=match):
        model.fit(x, y, **kwargs)


def test_bad_fit_data_gets_one_clear_error():
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2).to(DEVICE)
    with pytest.raises(TypeError, match="re-iterable"):
        model.fit(((x[i : i + 5], y[i : i + 5]) for i in range(0, 15, 5)), epochs=2, lr=1e-5)
    with pytest.raises(TypeError, match="got list and list"):
        model.fit(x.tolist(), y.tolist(), epochs=2, lr=1e-5)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        model.fit([x, y], epochs=1, lr=1e-5)
    with pytest.raises(ValueError, match="meta tensors"):
        FusedLinearRegressor(3, 2, device="meta").fit(x, y, epochs=1, lr=1e-5)
    with pytest.raises(ValueError, match="targets are missing"):
        model.fit(x, epochs=1, lr=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        model.fit([], epochs=1, lr=1e-5)
    with pytest.raises(ValueError, match="shuffle=False applies to tensor inputs"):  # it was ignored
        model.fit(DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True), epochs=1, lr=1e-5, shuffle=False)


def test_a_one_shot_iterator_is_fine_for_one_epoch(backend):
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    history = model.fit(iter([(x[:8], y[:8]), (x[8:], y[8:])]), epochs=1, lr=1e-5)
    assert len(history) == 1 and np.isfinite(history[0])


def test_lr_scheduler_sees_the_steps_of_a_one_launch_fit(backend):
    x, y = crop_yields(device=DEVICE)
    model = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=1e-5, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model.fit(x, y, epochs=1, batch_size=5, optimizer=opt, seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise here
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.5e-5


@pytest.mark.parametrize("path", ["one-launch", "per-batch"])
def test_a_full_batch_draws_nothing_on_every_path(path, backend, monkeypatch):
    """batch_size >= N: the row order cannot change the step, so no path draws one (the generator and the
    global RNG stay where they were), and both paths train alike."""
    if path == "per-batch":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    x, y = crop_yields(device=DEVICE)
    torch.manual_seed(0)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    g = torch.Generator().manual_seed(5)
    before, rng_before = g.get_state(), torch.get_rng_state()
    model.fit(x, y, epochs=3, lr=1e-5, generator=g, statistics=False)
    model.fit(x, y, epochs=2, lr=1e-5, statistics=False)
    assert torch.equal(g.get_state(), before) and torch.equal(torch.get_rng_state(), rng_before)
    ref = copy.deepcopy(linear).double()
    opt = torch.optim.SGD(ref.parameters(), lr=1e-5)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(ref(x.double()), y.double()).backward()
        opt.step()
    assert_close(model.weight, ref.weight, 2e-6, "weight")


class _Epochs:
    """An iterable whose k-th pass gives ``passes[k]`` (a list of batches), then nothing."""

    def __init__(self, *passes):
        self.passes, self.n = passes, 0

    def __iter__(self):
        self.n += 1
        return iter(self.passes[self.n - 1] if self.n <= len(self.passes) else [])


def test_an_iterables_bad_batch_or_exhaustion_is_named_as_such(backend):
    """A NaN in an iterable's batch (not scanned: that would cost host time per batch) ends fit as a
    divergence whose message names unchecked data as a cause (it used to blame the learning rate only),
    the parameters restored; an iterable with no batches on its second pass names the epoch (it used to
    say only "an epoch had no batches")."""
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    bad = x.clone()
    bad[7, 1] = float("nan")
    clean, dirty = [(x[:6], y[:6]), (x[6:], y[6:])], [(bad[:6], y[:6]), (bad[6:], y[6:])]
    model = FusedLinearRegressor(3, 2, backend=backend, dtype=torch.float64).to(DEVICE)
    ref = nn.Linear(3, 2).double()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xb, yb in clean:  # the one finite epoch, in float64
        opt.zero_grad()
        F.mse_loss(ref(xb), yb).backward()
        opt.step()
    with pytest.raises(TrainingDivergedError, match="epoch 2/3.*end of epoch 1.*did not scan them for NaN or inf"):
        model.fit(_Epochs(clean, dirty, clean), epochs=3, lr=0.1)
    assert_close(model.weight.detach().cpu(), ref.weight.detach(), 1e-12, "weight")
    assert_close(model.bias.detach().cpu(), ref.bias.detach(), 1e-12, "bias")
    with pytest.raises(TrainingDivergedError) as scanned:  # scanned tensors: a divergence is the step size's
        model.fit(x, y, epochs=3, lr=1e150)
    assert "NaN or inf" not in str(scanned.value)
    with pytest.raises(ValueError, match="epoch 2 had no batches.*end of epoch 1"):
        model.fit(_Epochs(clean), epochs=3, lr=0.1)


class _AsyncCopiesToHost(TorchFunctionMode):
    """Counts Tensor.to(<the CPU>, non_blocking=True): from a GPU, such a copy lands after the host has read it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and kwargs.get("non_blocking"):
            to = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (torch.device, str))]
            self.count += any(torch.device(d).type == "cpu" for d in to)
        return func(*args, **kwargs)


def test_data_on_another_device_is_copied_to_the_host_before_it_is_read():
    """A model on the CPU and data (tensors or batches) on a GPU: the copy to the host must be a blocking one
    (it was non_blocking=True: the host could read the batch before it arrived). On the CPU this checks the
    copies fit asks for; on a GPU, the numbers."""
    model = FusedLinearRegressor(3, 2, backend="torch", dtype=torch.float64)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    with _AsyncCopiesToHost() as copies:
        model.fit(x, y, epochs=1, lr=0.1)
        model.fit([(x[:5], y[:5]), (x[5:], y[5:])], epochs=1, lr=0.1)
    assert copies.count == 0
    if torch.cuda.is_available():
        xg, yg = torch.randn(1 << 16, 3, device="cuda") * 7 + 3, torch.randn(1 << 16, 2, device="cuda")
        host = FusedLinearRegressor(3, 2, backend="torch")
        twin = copy.deepcopy(host)
        host.fit([(xg, yg)] * 3, epochs=2, lr=1e-3)
        twin.fit([(xg.cpu(), yg.cpu())] * 3, epochs=2, lr=1e-3)
        assert torch.equal(host.weight, twin.weight) and torch.equal(host.bias, twin.bias)


@pytest.mark.parametrize("optimizer", ["fused", "sgd"])
def test_data_of_samples_of_several_rows_is_batched_by_sample_as_dataloader_does(optimizer, backend):
    """(N, S, D) data: DataLoader(TensorDataset(x, y), batch_size) draws batch_size of the N samples (S rows
    each) per step; fit did batch_size of the N·S rows, a different trajectory from the loop it replaces."""
    x, y = torch.randn(7, 2, 3, dtype=torch.float64), torch.randn(7, 2, 2, dtype=torch.float64)
    model = FusedLinearRegressor(3, 2, backend=backend, dtype=torch.float64).to(DEVICE)
    ref = nn.Linear(3, 2).double()
    ref.load_state_dict(model.state_dict())
    opt = (FusedSGD(model.parameters(), lr=0.05, momentum=0.5) if optimizer == "fused"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5))
    g, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    history = model.fit(x.to(DEVICE), y.to(DEVICE), epochs=3, batch_size=3, optimizer=opt, generator=g)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5)
    expected = []
    for _ in range(3):
        losses = []
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, generator=g_ref):
            ref_opt.zero_grad()
            loss = F.mse_loss(ref(xb), yb)
            loss.backward()
            ref_opt.step()
            losses.append(loss.item())
        expected.append(sum(losses) / len(losses))
    assert_close(torch.tensor(history), torch.tensor(expected), 1e-12, "history")
    assert_close(model.weight.detach(), ref.weight.detach(), 1e-12, "weight")
    assert_close(model.bias.detach(), ref.bias.detach(), 1e-12, "bias")
    assert torch.equal(g.get_state(), g_ref.get_state())


class _Stream(IterableDataset):
    """A stream of (x_i, y_i) rows without a length, as a DataLoader over a data pipe sees it."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return zip(self.x, self.y)


def test_a_dataloader_over_an_iterable_dataset_trains(backend):
    """len() of such a DataLoader raises TypeError; fit called it (to decide on a progress bar) and crashed."""
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    model = FusedLinearRegressor(3, 2, backend=backend, dtype=torch.float64).to(DEVICE)
    ref = nn.Linear(3, 2).double()
    ref.load_state_dict(model.state_dict())
    history = model.fit(DataLoader(_Stream(x, y), batch_size=5), epochs=2, lr=0.1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=5):
            opt.zero_grad()
            F.mse_loss(ref(xb), yb).backward()
            opt.step()
    assert len(history) == 2
    assert_close(model.weight.detach(), ref.weight.detach(), 1e-12, "weight")
    assert_close(model.bias.detach(), ref.bias.detach(), 1e-12, "bias")


@pytest.mark.parametrize("path", ["one-launch", "per-batch", "eager"])
def test_fit_batches_samples_of_higher_dimensional_data_as_dataloader(path, backend, monkeypatch):
    """Data (n, L, D): DataLoader batches n samples of L rows each; fit takes the same batches."""
    if path == "per-batch":
        monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)
    x, y = torch.randn(7, 2, 3, device=DEVICE), torch.randn(7, 2, 2, device=DEVICE)
    linear = nn.Linear(3, 2).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if path == "eager" else FusedSGD(model.parameters(), lr=0.1)
    g_fit, g_loader = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    losses = model.fit(x, y, epochs=3, batch_size=3, optimizer=opt, generator=g_fit)
    ref = copy.deepcopy(linear).double()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_losses = []
    for _ in range(3):
        batch_losses = []
        for xb, yb in DataLoader(TensorDataset(x.double(), y.double()), batch_size=3, shuffle=True,
                                 generator=g_loader):
            loss = F.mse_loss(ref(xb), yb)
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
            batch_losses.append(loss.item())
        ref_losses.append(sum(batch_losses) / len(batch_losses))
    assert_close(model.weight, ref.weight, 2e-6, "weight")
    assert_close(model.bias, ref.bias, 2e-6, "bias")
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), 2e-6, "epoch losses")
    assert torch.equal(g_fit.get_state(), g_loader.get_state())
