"""pytest-benchmark: whole training steps of linreg-fused against PyTorch peers.

Every regime of the project's performance brief is one benchmark group; its peers are

    eager            nn.Linear + F.mse_loss + backward + torch.optim.SGD (the baseline)
    eager-sgd-fused  the same with optim.SGD(fused=True)
    eager-cudagraph  the eager step captured in a CUDA graph and replayed (GPU only)
    eager-compile    the eager step under torch.compile (GPU only)
    fused            FusedLinearRegressor.train_step with FusedSGD (one fused step)
    fused-tf32       the same with input_precision="tf32" (GPU, fp32 only)
    fused-fit        FusedLinearRegressor.fit (the persistent kernel where it applies)

bf16 groups use fp32 master weights: the baseline is eager under
torch.autocast(bf16) ("eager-autocast"), with pure-bf16 eager
("eager-pure-bf16") as a further peer. Inference groups compare
``model(x)`` with nn.Linear.

On a GPU the regimes are the performance brief's shapes. Without one, only tiny
shapes run, through the pure-PyTorch reference backend ("fused[torch]") and
Triton's interpreter ("fused[triton-interp]"); their extra_info says
cpu=True, and those figures say nothing about GPU performance.

Timing: one benchmark call runs ``steps_per_call`` steps and ends with
torch.cuda.synchronize() on a GPU, so queued launches are not mistaken for
finished work; report.py divides the median call by steps_per_call. Every
peer is warmed up before timing (JIT, autotuning, graph capture, compile).
Inputs are random (targets from a linear map plus noise), never zeros, except
the tutorial's real crop-yield data. When one input set is smaller than three
times the last-level cache (the GPU's L2; on the CPU a nominal 32 MiB), up to
8 sets are made and successive calls cycle through them, so a call does not
read what the previous one left in cache (on a GPU this applies to the
mini-batch datasets: 71 MB fp32, 36 MB bf16; the ~0.5-1.1 GB full-batch
inputs get one set, and the launch-bound tutorial keeps its one real dataset).
On the CPU, bench/conftest.py runs torch single-threaded (see there).

Correctness: before timing, each peer is reset to the same initial weights
and runs one epoch over the batches in a fixed order; its mean loss and its
parameter update are compared with a float64 reference of the same SGD
steps, within the tolerances in TOLERANCES. A broken kernel fails the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD
from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields

if TYPE_CHECKING:  # bench/conftest.py; not imported at run time (pytest owns the "conftest" module name)
    from conftest import BenchEnv

ON_GPU = torch.cuda.is_available()


from regimes import BF16, FP32, REGIMES, TUTORIAL, Regime  # noqa: E402  (bench/ is on sys.path)


# Tolerances of the pre-timing check against float64, per numerics:
# (relative error of the epoch's mean loss, relative norm error of the parameter update).
TOLERANCES: dict[str, tuple[float, float | None]] = {
    "fp32": (2e-5, 1e-4),          # IEEE fp32 products, fp32 accumulation (honest errors ~1e-7)
    "bf16-in-fp32": (2e-5, 1e-4),  # bf16 X/T upcast on chip, fp32 master weights: exact products
    "tf32": (1e-2, 5e-2),         # 10-bit mantissa products
    "autocast": (3e-2, 1.5e-1),   # bf16 GEMMs with bf16 outputs
    "pure-bf16": (5e-2, None),    # bf16 parameters: the update itself is rounded to bf16; loss only
}


# ------------------------------------------------------------------ peers
@dataclass(frozen=True)
class Peer:
    name: str
    family: str  # "eager" | "graph" | "compile" | "fused" | "fused-fit" | "nn.Linear" | "fused-forward"
    baseline: bool = False
    gpu_only: bool = False
    backend: str = "triton"  # fused peers: linreg_fused backend
    precision: str = "ieee"  # fused peers: input_precision
    numerics: str = "fp32"  # key of TOLERANCES
    sgd_fused: bool = False
    eager_mode: str = "fp32"  # "fp32" | "autocast" | "pure-bf16"


def _fused_variants(family: str, name: str, numerics: str) -> list[Peer]:
    """On a GPU the Triton kernels; on the CPU the reference backend and the interpreter."""
    if ON_GPU:
        return [Peer(name, family, numerics=numerics)]
    return [Peer(f"{name}[torch]", family, backend="torch", numerics=numerics),
            Peer(f"{name}[triton-interp]", family, backend="triton", numerics=numerics)]


def peers_for(regime: Regime) -> list[Peer]:
    """The peers of one group, the eager baseline first (speedups are computed against it)."""
    if regime.kind == "inference":
        return [Peer("nn.Linear", "nn.Linear", baseline=True), *_fused_variants("fused-forward", "fused-forward", "fp32")]
    if regime.dtype == BF16:
        eager = [Peer("eager-autocast", "eager", baseline=True, eager_mode="autocast", numerics="autocast"),
                 Peer("eager-autocast-sgd-fused", "eager", sgd_fused=True, eager_mode="autocast", numerics="autocast"),
                 Peer("eager-pure-bf16", "eager", eager_mode="pure-bf16", numerics="pure-bf16"),
                 Peer("eager-autocast-cudagraph", "graph", gpu_only=True, eager_mode="autocast", numerics="autocast"),
                 Peer("eager-autocast-compile", "compile", gpu_only=True, eager_mode="autocast", numerics="autocast")]
        fused_numerics = "bf16-in-fp32"
    else:
        eager = [Peer("eager", "eager", baseline=True),
                 Peer("eager-sgd-fused", "eager", sgd_fused=True),
                 Peer("eager-cudagraph", "graph", gpu_only=True),
                 Peer("eager-compile", "compile", gpu_only=True)]
        fused_numerics = "fp32"
    if regime.kind == "fit":
        return [*eager, *_fused_variants("fused-fit", "fused-fit", "fp32"),
                *_fused_variants("fused", "fused-step-loop", "fp32")]
    fused = _fused_variants("fused", "fused", fused_numerics)
    if regime.dtype == FP32:
        # TF32 exists on GPUs only; the interpreter would run the same IEEE products as "fused".
        fused.append(Peer("fused-tf32", "fused", gpu_only=True, precision="tf32", numerics="tf32"))
    if regime.batch_size is not None:
        fused += _fused_variants("fused-fit", "fused-fit", fused_numerics)
    return [*eager, *fused]


@dataclass(frozen=True)
class Case:
    regime: Regime
    peer: Peer

    @property
    def id(self) -> str:
        return f"{self.regime.group} :: {self.peer.name}".replace(" ", "_")


CASES = [Case(r, p) for r in REGIMES for p in peers_for(r)]


# ------------------------------------------------------------------ data
@dataclass
class Data:
    """A regime's inputs and the shared initial weights, made once per group."""

    regime: Regime
    sets: list[tuple[torch.Tensor, torch.Tensor]]  # (X, T) input sets; successive calls cycle through them
    w0: torch.Tensor  # fp32 (O, D)
    b0: torch.Tensor  # fp32 (O,)
    reference: dict = field(default_factory=dict)  # float64 check results, computed once

    @property
    def x(self) -> torch.Tensor:
        return self.sets[0][0]

    @property
    def t(self) -> torch.Tensor:
        return self.sets[0][1]

    def call_batches(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of a "step" regime's call on input set k: one epoch in row order (views)."""
        r = self.regime
        x, t = self.sets[k]
        bs = r.batch_size or r.n_rows
        return [(x[s : s + bs], t[s : s + bs]) for s in range(0, r.n_rows, bs)]

    def ordered_epoch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of the correctness check: one epoch of set 0 in row order."""
        return self.call_batches(0)


_DATA: dict[Regime, Data] = {}
_CPU_CACHE_BYTES = 32 << 20  # nominal last-level cache for the CPU runs


def n_input_sets(regime: Regime, device: torch.device) -> int:
    """How many input sets to rotate through so that one call's data is not in cache from the last."""
    if regime.kind == "fit":
        return 1
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    else:
        cache = _CPU_CACHE_BYTES
    if regime.set_bytes >= 3 * cache:
        return 1
    return min(8, math.ceil(3 * cache / regime.set_bytes))


def get_data(regime: Regime, device: torch.device) -> Data:
    """Random inputs (never zeros), targets from a known linear map plus noise; one group at a time
    is kept alive, so the GPU holds a single 1 GB problem."""
    if regime in _DATA:
        return _DATA[regime]
    _DATA.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gen = torch.Generator(device=device).manual_seed(1234)
    n, d, o = regime.n_rows, regime.in_features, regime.out_features
    bound = 1 / math.sqrt(d)  # nn.Linear's init range
    w0 = (torch.rand((o, d), generator=gen, device=device) * 2 - 1) * bound
    b0 = (torch.rand((o,), generator=gen, device=device) * 2 - 1) * bound
    if regime.name == "tutorial":
        x, t = crop_yields(device=device)
        sets = [(x, t)]
    else:
        w_true = torch.randn((o, d), generator=gen, device=device) * bound
        b_true = torch.randn((o,), generator=gen, device=device)
        sets = []
        for _ in range(n_input_sets(regime, device)):
            x = torch.randn((n, d), generator=gen, device=device)
            t = torch.addmm(b_true, x, w_true.t()) + 0.1 * torch.randn((n, o), generator=gen, device=device)
            sets.append((x.to(regime.dtype), t.to(regime.dtype)))
    _DATA[regime] = data = Data(regime, sets, w0, b0)
    return data


def reference_epoch(data: Data) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Float64 SGD over the check epoch from (w0, b0): (mean batch loss, W, b)."""
    if "epoch" not in data.reference:
        w, b = data.w0.double(), data.b0.double()
        losses = []
        for xb, yb in data.ordered_epoch():
            x64 = xb.double()
            r = torch.addmm(b, x64, w.t()) - yb.double()
            scale = 1.0 / r.numel()
            losses.append(float((r * r).sum()) * scale)
            w = w - data.regime.lr * (2 * scale) * (r.t() @ x64)
            b = b - data.regime.lr * (2 * scale) * r.sum(0)
        data.reference["epoch"] = (sum(losses) / len(losses), w, b)
    return data.reference["epoch"]


def reference_forward(data: Data) -> torch.Tensor:
    if "forward" not in data.reference:
        data.reference["forward"] = torch.addmm(data.b0.double(), data.x.double(), data.w0.double().t())
    return data.reference["forward"]


# ------------------------------------------------------------------ runners
def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


class Runner:
    """One peer set up on one regime: reset to (w0, b0), a checked epoch, and the timed call."""

    def __init__(self, data: Data, peer: Peer) -> None:
        self.data, self.peer, self.regime = data, peer, data.regime
        self.last_loss: torch.Tensor | None = None
        self._calls = 0

    def _next_set(self) -> int:
        """The input set of this call: successive calls cycle through data.sets."""
        k = self._calls % len(self.data.sets)
        self._calls += 1
        return k

    # the parameters the peer trains (in place)
    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        w, b = self.parameters()
        with torch.no_grad():
            w.copy_(self.data.w0)
            b.copy_(self.data.b0)

    def check_epoch(self) -> float:
        """One epoch in row order from the current parameters; returns the mean batch loss."""
        raise NotImplementedError

    def call(self) -> None:
        """The timed function: steps_per_call steps, then a device sync."""
        raise NotImplementedError

    def _epoch_orders(self) -> Iterator[torch.Tensor]:
        """A fresh random row order per epoch, on the device (as DataLoader(shuffle=True) would)."""
        for _ in range(self.regime.epochs):
            yield torch.randperm(self.regime.n_rows, device=self.data.x.device)

    def _fit_batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.regime.batch_size
        for s in range(0, self.regime.n_rows, bs):
            idx = order[s : s + bs]
            yield self.data.x[idx], self.data.t[idx]


def eager_step(module: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor, mode: str,
               zero_grad: bool = True) -> torch.Tensor:
    """The step a user writes: nn.Linear + F.mse_loss + backward + optim.SGD (under autocast in "autocast" mode)."""
    if zero_grad:
        opt.zero_grad(set_to_none=True)
    if mode == "autocast":
        with torch.autocast(xb.device.type, dtype=BF16, cache_enabled=False):  # caching is unsafe in graph capture
            loss = F.mse_loss(module(xb), yb)
    else:
        loss = F.mse_loss(module(xb), yb)
    loss.backward()
    opt.step()
    return loss.detach()


class StepLoopRunner(Runner):
    """Any per-batch step function: eager variants, compiled eager, and the fused train_step."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o, device = self.regime.in_features, self.regime.out_features, data.x.device
        if peer.family in ("eager", "compile"):
            dtype = BF16 if peer.eager_mode == "pure-bf16" else FP32
            self.module = nn.Linear(d, o, device=device, dtype=dtype)
            self.opt = torch.optim.SGD(self.module.parameters(), lr=self.regime.lr,
                                       fused=True if peer.sgd_fused else None)
            self.step = self._eager_step
            if peer.family == "compile":
                self.step = torch.compile(self._eager_step)
        else:
            self.module = FusedLinearRegressor(d, o, device=device, dtype=FP32, backend=peer.backend,
                                               input_precision=peer.precision)
            self.opt = FusedSGD(self.module.parameters(), lr=self.regime.lr, backend=peer.backend)
            self.step = self._fused_step
        self.reset()

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.weight, self.module.bias

    def _eager_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return eager_step(self.module, self.opt, xb, yb, self.peer.eager_mode)

    def _fused_step(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.module.train_step(xb, yb, self.opt)

    def check_epoch(self) -> float:
        losses = [self.step(xb, yb) for xb, yb in self.data.ordered_epoch()]
        return float(torch.stack(losses).float().mean())

    def call(self) -> None:
        if self.regime.kind == "fit":
            for order in self._epoch_orders():
                for xb, yb in self._fit_batches(order):
                    self.last_loss = self.step(xb, yb)
        else:
            for xb, yb in self.data.call_batches(self._next_set()):
                self.last_loss = self.step(xb, yb)
        _sync()


class GraphRunner(Runner):
    """The eager step captured in CUDA graphs. "step" regimes: one graph per batch of each
    input set (each reads its batch in place, no copies), all sharing one memory pool
    (safe: they are replayed in the order they were captured, one at a time). "fit": one
    graph that gathers its rows through a static index buffer, refilled from each
    epoch's permutation."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o, device = self.regime.in_features, self.regime.out_features, data.x.device
        self.module = nn.Linear(d, o, device=device)
        self.opt = torch.optim.SGD(self.module.parameters(), lr=self.regime.lr)
        if self.regime.kind == "fit":
            self.index = torch.arange(self.regime.batch_size, device=device)
            steps = [lambda: (data.x.index_select(0, self.index), data.t.index_select(0, self.index))]
        else:
            steps = [lambda xb=xb, yb=yb: (xb, yb) for k in range(len(data.sets)) for xb, yb in data.call_batches(k)]
        # Warm up on a side stream (cuBLAS workspaces, optimizer state) before capture, as the
        # CUDA-graphs docs require.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for batch in steps:
                    self._step(*batch())
        torch.cuda.current_stream().wait_stream(side)
        self.graphs, self.losses = [], []
        pool = None
        for batch in steps:
            graph = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
            with torch.cuda.graph(graph, pool=pool):
                loss = self._step(*batch(), zero_grad=False)
            pool = graph.pool() if pool is None else pool
            self.graphs.append(graph)
            self.losses.append(loss)
        self.per_set = 1 if self.regime.kind == "fit" else len(self.graphs) // len(data.sets)
        self.reset()

    def _step(self, xb: torch.Tensor, yb: torch.Tensor, zero_grad: bool = True) -> torch.Tensor:
        return eager_step(self.module, self.opt, xb, yb, self.peer.eager_mode, zero_grad)

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.weight, self.module.bias

    def check_epoch(self) -> float:
        losses = []
        if self.regime.kind == "fit":
            for s in range(0, self.regime.n_rows, self.regime.batch_size):
                self.index.copy_(torch.arange(s, s + self.regime.batch_size, device=self.index.device))
                self.graphs[0].replay()
                losses.append(self.losses[0].clone())
        else:  # set 0's graphs; then the next call starts at set 1, keeping the capture order
            for graph, loss in zip(self.graphs[: self.per_set], self.losses[: self.per_set]):
                graph.replay()
                losses.append(loss.clone())
            self._calls = 1
        return float(torch.stack(losses).float().mean())

    def call(self) -> None:
        if self.regime.kind == "fit":
            bs = self.regime.batch_size
            for order in self._epoch_orders():
                for s in range(0, self.regime.n_rows, bs):
                    self.index.copy_(order[s : s + bs])
                    self.graphs[0].replay()
        else:
            k = self._next_set()
            for graph in self.graphs[k * self.per_set : (k + 1) * self.per_set]:
                graph.replay()
            self.last_loss = self.losses[(k + 1) * self.per_set - 1]
        if self.regime.kind == "fit":
            self.last_loss = self.losses[0]
        _sync()


class FusedFitRunner(Runner):
    """FusedLinearRegressor.fit: the persistent one-launch kernel when the problem fits one
    program (the tutorial), else one fused step per batch with rows gathered in the kernel."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o = self.regime.in_features, self.regime.out_features
        self.module = FusedLinearRegressor(d, o, device=data.x.device, backend=peer.backend)
        self.opt = FusedSGD(self.module.parameters(), lr=self.regime.lr, backend=peer.backend)
        self.reset()

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.weight, self.module.bias

    def _fit(self, k: int, epochs: int, shuffle: bool) -> list[float]:
        x, t = self.data.sets[k]
        return self.module.fit(x, t, epochs=epochs, batch_size=self.regime.batch_size,
                               optimizer=self.opt, shuffle=shuffle, progress=False)

    def check_epoch(self) -> float:
        return self._fit(0, 1, shuffle=False)[0]

    def call(self) -> None:
        history = self._fit(self._next_set(), self.regime.epochs, shuffle=True)  # ends with a host read: synced
        self.last_loss = torch.tensor(history[-1])


class ForwardRunner(Runner):
    """Inference: one forward per call, on the next input set, under no_grad."""

    def __init__(self, data: Data, peer: Peer) -> None:
        super().__init__(data, peer)
        d, o, device = self.regime.in_features, self.regime.out_features, data.x.device
        if peer.family == "nn.Linear":
            self.module = nn.Linear(d, o, device=device)
        else:
            self.module = FusedLinearRegressor(d, o, device=device, backend=peer.backend)
        self.reset()

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.weight, self.module.bias

    @torch.no_grad()
    def forward_check(self) -> float:
        """Norm-relative error of the first set's output against float64."""
        ref = reference_forward(self.data)
        y = self.module(self.data.x)
        return float((y.double() - ref).norm() / ref.norm())

    @torch.no_grad()
    def call(self) -> None:
        self.last_loss = self.module(self.data.sets[self._next_set()][0])
        _sync()


def make_runner(data: Data, peer: Peer) -> Runner:
    if peer.family in ("nn.Linear", "fused-forward"):
        return ForwardRunner(data, peer)
    if peer.family == "graph":
        return GraphRunner(data, peer)
    if peer.family == "fused-fit":
        return FusedFitRunner(data, peer)
    return StepLoopRunner(data, peer)


# ------------------------------------------------------------------ checks
def check_against_reference(runner: Runner) -> dict[str, float | None]:
    """Reset, run the check epoch, compare with float64; asserts within TOLERANCES."""
    data, peer = runner.data, runner.peer
    if runner.regime.kind == "inference":
        err = runner.forward_check()
        tol = 1e-4
        assert err <= tol, f"{peer.name}: forward differs from float64 by {err:.3g} (norm-relative), tolerance {tol}"
        return {"check_output_rel_err": err, "check_tol": tol}
    runner.reset()
    loss = runner.check_epoch()
    ref_loss, ref_w, ref_b = reference_epoch(data)
    loss_tol, delta_tol = TOLERANCES[peer.numerics]
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    assert math.isfinite(loss) and loss_err <= loss_tol, (
        f"{peer.name}: epoch loss {loss!r} vs float64 {ref_loss!r} (rel err {loss_err:.3g} > {loss_tol})")
    w, b = (p.detach().double() for p in runner.parameters())
    assert torch.isfinite(w).all() and torch.isfinite(b).all(), f"{peer.name}: non-finite parameters"
    ref_delta = torch.cat([(ref_w - data.w0.double()).flatten(), ref_b - data.b0.double()])
    delta = torch.cat([(w - data.w0.double()).flatten(), b - data.b0.double()])
    delta_err = float((delta - ref_delta).norm() / ref_delta.norm())
    if delta_tol is not None:
        assert delta_err <= delta_tol, (
            f"{peer.name}: parameter update differs from float64 by {delta_err:.3g} (norm-relative) > {delta_tol}")
    else:  # bf16 parameters: at least the step must have moved them
        assert float(delta.norm()) > 0, f"{peer.name}: the step did not change the parameters"
    return {"check_loss_rel_err": loss_err, "check_update_rel_err": delta_err,
            "check_loss_tol": loss_tol, "check_update_tol": delta_tol}


# ------------------------------------------------------------------ the benchmark
def _rounds(env: BenchEnv, peer: Peer) -> int:
    if "LINREG_BENCH_ROUNDS" in os.environ:
        return int(os.environ["LINREG_BENCH_ROUNDS"])
    if env.on_gpu:
        return 30
    return 3 if "interp" in peer.name else 10


def _skip_reason(case: Case, env: BenchEnv) -> str | None:
    if case.regime.gpu and not env.on_gpu:
        return f"GPU regime ({case.regime.shape}): needs CUDA; this run has the tiny CPU regimes"
    if not case.regime.gpu and env.on_gpu:
        return "CPU-only tiny regime; the GPU run has the full-size regimes"
    if case.peer.gpu_only and not env.on_gpu:
        what = {"graph": "CUDA graphs", "compile": "torch.compile peers (timed against GPU kernels only)",
                "fused": "TF32 (a GPU tensor-core mode)"}[case.peer.family]
        return f"{case.peer.name} is GPU-only: {what}"
    if case.peer.backend == "triton" and case.peer.family.startswith("fused"):
        try:
            select_ops("triton", env.device)
        except RuntimeError as err:
            return str(err)
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bench(benchmark, case: Case, bench_env: BenchEnv, copy_gbps: float,
               baseline_times: dict[str, float]) -> None:
    reason = _skip_reason(case, bench_env)
    if reason:
        pytest.skip(reason)
    regime, peer = case.regime, case.peer
    benchmark.group = regime.group
    data = get_data(regime, bench_env.device)
    runner = make_runner(data, peer)

    runner.call()  # warm-up: JIT and compile, cuBLAS handles, allocator
    check = check_against_reference(runner)

    peak = peak_extra = None
    if bench_env.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.call()
        peak = torch.cuda.max_memory_allocated()
        peak_extra = peak - before

    benchmark.extra_info.update(
        bench_env.labels(),
        regime=regime.name, kind=regime.kind, peer=peer.name, baseline=peer.baseline,
        backend=peer.backend if peer.family.startswith("fused") else "torch-eager",
        input_precision=peer.precision if peer.family.startswith("fused") else None,
        dtype=regime.dtype_name, shape=regime.shape, n_rows=regime.n_rows,
        in_features=regime.in_features, out_features=regime.out_features, batch_size=regime.batch_size,
        steps_per_call=regime.steps_per_call, bytes_per_step=regime.bytes_per_step, copy_gbps=copy_gbps,
        peak_mem_bytes=peak, peak_extra_bytes=peak_extra, **check)

    benchmark.pedantic(runner.call, rounds=_rounds(bench_env, peer), iterations=1,
                       warmup_rounds=1 if bench_env.on_gpu else 0)

    last = runner.last_loss
    assert last is not None and bool(torch.isfinite(last).all()), f"{peer.name}: non-finite output after timing"
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    per_step = benchmark.stats.stats.median / regime.steps_per_call
    gbps = regime.bytes_per_step / per_step / 1e9
    if peer.baseline:
        baseline_times[regime.group] = per_step
    base = baseline_times.get(regime.group)
    benchmark.extra_info.update(
        time_per_step_s=per_step, gbps=gbps, frac_copy=gbps / copy_gbps,
        speedup_vs_eager=None if base is None else base / per_step)
