"""fit's per-batch path with CUDA graphs, wired on the CPU: a stand-in
'captures' nothing and 'replays' the captured function, so the control flow
(the eager first epoch, capture, the graph kept from one fit to the next and
dropped when anything it holds changes) is checked here against the eager
per-batch run, bitwise; the graphs themselves are checked on a GPU
(tests/test_gpu.py)."""

import copy

import pytest
import torch
from conftest import DEVICE
from oracle import assert_close, eager_fit, loader_orders
from torch import nn

import linreg_fused.fit_per_batch as fit_per_batch
import linreg_fused.train as train
from linreg_fused import FusedLinearRegressor, FusedSGD, TrainingDivergedError
from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields

TRAJECTORY_TOL = 5e-5  # fp32 fit vs float64 eager, a few dozen steps


class _ReplayStandIn:
    """Stands in for a CUDA graph on machines without CUDA: 'capture' runs
    nothing, a 'replay' runs the captured function."""

    made = 0
    replays = 0

    def __init__(self, fn):
        type(self).made += 1
        self.fn = fn

    def replay(self):
        type(self).replays += 1
        self.fn()


@pytest.fixture
def graphs(monkeypatch):
    """Graphs on (through the stand-in), a fresh cache and no kernel known compiled; returns the stand-in."""
    monkeypatch.setattr(fit_per_batch, "graph_capture_possible", lambda *args: True)
    monkeypatch.setattr(fit_per_batch, "graphed_epoch", _ReplayStandIn)
    monkeypatch.setattr(fit_per_batch, "_GRAPHS", fit_per_batch.weakref.WeakKeyDictionary())
    monkeypatch.setattr(fit_per_batch, "_WARM", set())
    _ReplayStandIn.made = _ReplayStandIn.replays = 0
    return _ReplayStandIn


def _per_batch(backend, monkeypatch):
    monkeypatch.setattr(type(select_ops(backend, DEVICE)), "fit_small_supported", lambda self, *args: False)


def _problem(n=37, d=4, o=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(o, d, generator=g).t() + 0.1 * torch.randn(n, o, generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def _same(a, b):
    return torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_graphed_epochs_are_wired_like_eager_ones(backend, monkeypatch, graphs):
    """Capture after the first epoch (it makes the momentum buffers), every later epoch a replay
    whose row order is picked on the device: the eager per-batch run exactly."""
    _per_batch(backend, monkeypatch)
    x, y = _problem(seed=4)
    base = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(epochs=5, batch_size=8, seed=5, progress=False)
    h_eager = eager.fit(x, y, optimizer=FusedSGD(eager.parameters(), lr=0.01, momentum=0.9, backend=backend),
                        cuda_graph=False, **opts)
    assert graphs.made == 0
    h_graphed = graphed.fit(x, y, optimizer=FusedSGD(graphed.parameters(), lr=0.01, momentum=0.9, backend=backend),
                            **opts)
    assert (graphs.made, graphs.replays) == (1, 4)
    assert h_graphed == h_eager and _same(graphed, eager)


def test_failed_capture_warns_and_stays_eager(backend, monkeypatch, graphs):
    """A capture that fails warns once; the run goes on eagerly and is the
    run without graphs, bitwise, and the tutorial's loop in float64."""

    def failing(*args):
        raise RuntimeError("capture not supported here")

    _per_batch(backend, monkeypatch)
    monkeypatch.setattr(fit_per_batch, "graphed_epoch", failing)
    x, y = _problem(seed=6)
    linear = nn.Linear(4, 3).to(DEVICE)
    plain, failed = (FusedLinearRegressor.from_linear(linear, backend=backend) for _ in range(2))
    h_plain = plain.fit(x, y, epochs=3, batch_size=8, lr=0.01, seed=0, cuda_graph=False)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        h_failed = failed.fit(x, y, epochs=3, batch_size=8, lr=0.01, seed=0)
    assert h_failed == h_plain and _same(failed, plain)
    ref, _, ref_history = eager_fit(linear, x, y, loader_orders(37, 3, 0), 8, dict(lr=0.01))
    assert_close(torch.tensor(h_failed), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_close(failed.weight, ref.weight, TRAJECTORY_TOL, "weight")


def test_the_graph_is_kept_across_fits_and_dropped_when_what_it_holds_changes(monkeypatch, graphs):
    """A repeat fit replays the kept graph from its first epoch (no eager epoch, no capture); a new
    learning rate, batch size, reduction, data tensor, parameter storage, input precision or optimizer
    makes a new one. Every fit equals a twin run without graphs, bitwise (the reference backend: the
    wiring is what is tested)."""
    backend = "torch"
    _per_batch(backend, monkeypatch)
    x, y = _problem(n=21, seed=3)
    graphed = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    eager = copy.deepcopy(graphed)
    opts = {m: FusedSGD(m.parameters(), lr=0.01, momentum=0.5, backend=backend) for m in (graphed, eager)}
    calls = dict(epochs=3, batch_size=8, seed=1, progress=False)

    def both(expect_made, expect_replays, **changes):
        made, replays = graphs.made, graphs.replays
        kwargs = {**calls, **changes}
        data = kwargs.pop("x", x)
        h_graphed = graphed.fit(data, y, optimizer=opts[graphed], **kwargs)
        h_eager = eager.fit(x, y, optimizer=opts[eager], cuda_graph=False, **kwargs)
        assert h_graphed == h_eager and _same(graphed, eager), changes
        assert (graphs.made - made, graphs.replays - replays) == (expect_made, expect_replays), changes

    both(1, 2)  # the first epoch makes the momentum buffers, then capture
    both(0, 3)  # kept: all three epochs replayed
    both(0, 5, epochs=5)  # more epochs: the same graph, its chunk of orders refilled
    for group in (opts[graphed], opts[eager]):
        group.param_groups[0]["lr"] = 0.02
    both(1, 3)  # a new learning rate: captured again, no eager epoch (its kernels ran before)
    both(1, 2, batch_size=6)  # new shapes: their kernels run eagerly first
    both(0, 3, batch_size=6)
    both(1, 2, reduction="sum")
    both(1, 3, x=x.clone())  # another tensor of the same layout
    with torch.no_grad():  # new storage for the weight: the graph holds the old address
        for m in (graphed, eager):
            m.weight.set_(m.weight.clone())
    both(1, 3)
    for m in (graphed, eager):
        m.input_precision = "ieee"
    both(1, 2)
    opts = {m: FusedSGD(m.parameters(), lr=0.01, momentum=0.5, backend=backend) for m in (graphed, eager)}
    both(1, 2)  # a new optimizer: its buffers are new again, so its first epoch is eager


def test_a_new_lr_tensor_of_the_same_value_is_a_new_graph(monkeypatch, graphs):
    """A graph reads a tensor lr at its address. A group given another tensor of the same value (an
    lr re-made for each fit) must not replay the old one's address: once that tensor is freed, its
    memory holds other numbers. (The key held the value alone: the graph was replayed.)"""
    backend = "torch"
    _per_batch(backend, monkeypatch)
    x, y = _problem(n=21, seed=7)
    model = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=torch.tensor(0.01, device=DEVICE), backend=backend)
    calls = dict(epochs=3, batch_size=8, seed=1, progress=False)
    model.fit(x, y, optimizer=opt, **calls)
    made = graphs.made
    model.fit(x, y, optimizer=opt, **calls)
    assert graphs.made == made  # the same tensor: kept
    opt.param_groups[0]["lr"] = torch.tensor(0.01, device=DEVICE)
    model.fit(x, y, optimizer=opt, **calls)
    assert graphs.made == made + 1


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the interpreter's NumPy
def test_kept_graph_on_a_divergence(monkeypatch, graphs):
    """A replayed fit that diverges restores what the eager run restores, bitwise (the reference
    backend: the wiring is what is tested; the interpreter would take 20 s here)."""
    backend = "torch"
    _per_batch(backend, monkeypatch)
    x, y = crop_yields(device=DEVICE)
    base = FusedLinearRegressor(3, 2, backend=backend).to(DEVICE)
    runs = []
    for graph in (False, True):
        model = copy.deepcopy(base)
        opt = FusedSGD(model.parameters(), lr=5e-4, momentum=0.9, backend=backend)
        model.fit(x, y, epochs=2, batch_size=5, optimizer=opt, seed=0, cuda_graph=graph)  # finite; captures
        with pytest.raises(TrainingDivergedError) as info:
            model.fit(x, y, epochs=60, batch_size=5, optimizer=opt, seed=1, cuda_graph=graph)
        runs.append((info.value.epoch, info.value.history, model.weight.clone(), opt.state[model.weight]
                     ["momentum_buffer"].clone()))
    assert graphs.made == 1 and graphs.replays > 2
    (e0, h0, w0, b0), (e1, h1, w1, b1) = runs
    assert e0 == e1 and h0[:-1] == h1[:-1] and torch.equal(w0, w1) and torch.equal(b0, b1)
    assert torch.isfinite(w1).all()


def test_permutations_drawn_in_bounded_chunks(backend, monkeypatch):
    """Row orders are drawn per chunk of epochs, capped in memory; the batches
    are still DataLoader's, epoch after epoch."""
    monkeypatch.setattr(train, "_PERMUTATION_BUDGET", 80)  # 2 epochs of 37 rows per draw
    x, y = _problem(seed=7)
    linear = nn.Linear(4, 3).to(DEVICE)
    model = FusedLinearRegressor.from_linear(linear, backend=backend)
    history = model.fit(x, y, epochs=5, batch_size=8, lr=0.02, seed=9)
    ref, _, ref_history = eager_fit(linear, x, y, loader_orders(37, 5, 9), 8, dict(lr=0.02))
    assert_close(torch.tensor(history), torch.tensor(ref_history), TRAJECTORY_TOL, "history")
    assert_close(model.weight, ref.weight, TRAJECTORY_TOL, "weight")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")


@needs_cuda
def test_kept_graph_on_a_gpu_replays_what_eager_epochs_do():
    """Three fits in a row with the same optimizer: the first captures, the others replay the kept graph
    from their first epoch; histories, parameters and buffers stay bitwise those of eager epochs.
    (Written without a GPU to run it on, 2026-12-04.)"""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8192, 256, generator=g).cuda(), torch.randn(8192, 16, generator=g).cuda()
    torch.manual_seed(0)
    graphed = FusedLinearRegressor(256, 16, device="cuda")
    eager = copy.deepcopy(graphed)
    opts = {m: FusedSGD(m.parameters(), lr=0.01, momentum=0.9) for m in (graphed, eager)}
    kept = None
    for call in range(3):
        h_graphed = graphed.fit(x, y, epochs=3, batch_size=1024, optimizer=opts[graphed], seed=call)
        h_eager = eager.fit(x, y, epochs=3, batch_size=1024, optimizer=opts[eager], seed=call, cuda_graph=False)
        assert h_graphed == h_eager and _same(graphed, eager), call
        for p, q in zip(graphed.parameters(), eager.parameters()):
            assert torch.equal(opts[graphed].state[p]["momentum_buffer"], opts[eager].state[q]["momentum_buffer"])
        if call:
            assert fit_per_batch._GRAPHS[opts[graphed]] is kept, "a repeat fit captured again"
        kept = fit_per_batch._GRAPHS[opts[graphed]]


@needs_cuda
@pytest.mark.parametrize("shuffle", [True, "device"])
def test_a_repeat_fit_on_a_gpu_syncs_once(shuffle):
    """A repeat mini-batch fit without the data check and without log lines: one sync, the report point
    at the end (torch.cuda's sync debug mode warns at each). (Written without a GPU, 2026-12-04.)"""
    import warnings

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 64, generator=g).cuda(), torch.randn(4096, 8, generator=g).cuda()
    model = FusedLinearRegressor(64, 8, device="cuda")
    opt = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
    kwargs = dict(epochs=4, batch_size=512, optimizer=opt, seed=0, shuffle=shuffle, check_finite=False)
    model.fit(x, y, **kwargs)  # captures
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model.fit(x, y, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
