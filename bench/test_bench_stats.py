"""pytest-benchmark: the statistics path (linreg_fused.stats) against a pass per
epoch and eager PyTorch, exact solutions against torch.linalg.lstsq and
scikit-learn, and streamed statistics against the pinned host-to-device
bandwidth.

Groups, per statistics regime of bench/regimes.py (STATS_REGIMES):

    "<regime> :: epochs"   `epochs` full-batch SGD epochs from (w0, b0):
        eager                nn.Linear + F.mse_loss + backward + torch.optim.SGD (the baseline;
                             bf16 data under torch.autocast, as the main suite's baseline)
        fit-pass-per-epoch   FusedLinearRegressor.fit(statistics=False): one fused pass per epoch
        fit-statistics       FusedLinearRegressor.fit(statistics=True): one pass, then the epochs
                             on the statistics
    "<regime> :: solve"    the least-squares solution:
        lstsq                torch.linalg.lstsq on [X 1] on the device (the baseline)
        solve                FusedLinearRegressor.solve (one statistics pass + Cholesky)
        scikit-learn         LinearRegression().fit on the CPU (the data copied there untimed)
    "<regime> :: pass-<backend>"  one statistics pass over the same data:
        moments              the co-moments pass fit's statistics path runs (the baseline; what
                             LinearStats held before it kept the R factor)
        factor               LinearStats.from_tensors: the one-pass R factor (TSQR), fp64
    "<regime> :: stream"   statistics of host (NumPy) data, GPU only:
        h2d-copy             one pinned host-to-device copy of the same bytes (the baseline: the link)
        from_arrays          LinearStats.from_arrays(x, t, device="cuda"): pinned double buffers

Without a GPU only the tiny CPU regime runs, on the reference backend ("[torch]")
and Triton's interpreter ("[triton-interp]"), labelled cpu=True: those figures say
nothing about GPU speed. Each call ends synchronised. Before timing, each peer's
result is checked: the statistics path against the pass per epoch, solve against
float64 least squares, streaming against the in-memory statistics.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD, LinearStats
from linreg_fused.backend import select_ops
from regimes import STATS_REGIMES, Regime  # bench/ is on sys.path

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
STREAM_CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class Case:
    regime: Regime
    task: str  # "epochs" | "solve" | "pass-<backend>" | "stream"
    peer: str
    backend: str | None = None  # linreg_fused backend of the fused peers
    baseline: bool = False

    @property
    def group(self) -> str:
        return f"{self.regime.group} :: {self.task}"

    @property
    def name(self) -> str:
        if self.backend is None:
            return self.peer
        return self.peer if ON_GPU else f"{self.peer}[{'triton-interp' if self.backend == 'triton' else 'torch'}]"

    @property
    def id(self) -> str:
        return f"{self.group} :: {self.name}".replace(" ", "_")


def _cases() -> list[Case]:
    backends = ["triton"] if ON_GPU else ["torch", "triton"]
    cases = []
    for r in STATS_REGIMES:
        cases.append(Case(r, "epochs", "eager", baseline=True))
        cases += [Case(r, "epochs", p, b) for p in ("fit-pass-per-epoch", "fit-statistics") for b in backends]
        if r.dtype == torch.float32:
            cases += [Case(r, "solve", "lstsq", baseline=True), *(Case(r, "solve", "solve", b) for b in backends),
                      Case(r, "solve", "scikit-learn")]
            cases += [Case(r, "stream", "h2d-copy", baseline=True), Case(r, "stream", "from_arrays", "triton")]
        for b in backends:
            cases += [Case(r, f"pass-{b}", "moments", b, baseline=True), Case(r, f"pass-{b}", "factor", b)]
    return cases


CASES = _cases()


def _skip_reason(case: Case) -> str | None:
    if case.regime.gpu and not ON_GPU:
        return f"GPU regime ({case.regime.shape}): needs CUDA; this run has the tiny CPU regime"
    if not case.regime.gpu and ON_GPU:
        return "CPU-only tiny regime; the GPU run has the full-size regimes"
    if case.task == "stream" and not ON_GPU:
        return "streaming is timed against the pinned host-to-device link: needs CUDA"
    if case.backend == "triton":
        try:
            select_ops("triton", DEVICE)
        except RuntimeError as err:
            return str(err)
    if case.peer == "scikit-learn":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return "scikit-learn is not installed (pip install -e '.[test]')"
    return None


# ------------------------------------------------------------------ data
_DATA: dict[Regime, tuple] = {}


def get_data(regime: Regime):
    """(x, t, w0, b0): random rows, targets from a linear map plus noise; one regime kept at a time."""
    if regime not in _DATA:
        _DATA.clear()
        if ON_GPU:
            torch.cuda.empty_cache()
        g = torch.Generator(device=DEVICE).manual_seed(1234)
        n, d, o = regime.n_rows, regime.in_features, regime.out_features
        bound = 1 / math.sqrt(d)
        w0 = (torch.rand((o, d), generator=g, device=DEVICE) * 2 - 1) * bound
        b0 = (torch.rand((o,), generator=g, device=DEVICE) * 2 - 1) * bound
        x = torch.randn((n, d), generator=g, device=DEVICE)
        t = x @ (torch.randn((o, d), generator=g, device=DEVICE) * bound).t() + 0.1 * torch.randn(
            (n, o), generator=g, device=DEVICE)
        _DATA[regime] = (x.to(regime.dtype), t.to(regime.dtype), w0, b0)
    return _DATA[regime]


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


# ------------------------------------------------------------------ peers
class Peer:
    """setup() is untimed (reset to w0, b0); call() is timed and ends synchronised."""

    def __init__(self, case: Case) -> None:
        self.case, self.regime = case, case.regime
        self.x, self.t, self.w0, self.b0 = get_data(case.regime)
        self.result = None

    def setup(self) -> None:
        pass

    def check(self) -> dict:
        return {}


class EagerEpochs(Peer):
    def __init__(self, case: Case) -> None:
        super().__init__(case)
        self.linear = nn.Linear(self.regime.in_features, self.regime.out_features, device=DEVICE)
        self.opt = torch.optim.SGD(self.linear.parameters(), lr=self.regime.lr)

    def setup(self) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(self.w0)
            self.linear.bias.copy_(self.b0)

    def call(self) -> None:
        autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.x.dtype == torch.bfloat16)
        for _ in range(self.regime.epochs):
            with autocast:
                loss = F.mse_loss(self.linear(self.x), self.t)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        self.result = loss.detach()
        _sync()


class FitEpochs(Peer):
    def __init__(self, case: Case) -> None:
        super().__init__(case)
        r = self.regime
        self.model = FusedLinearRegressor(r.in_features, r.out_features, device=DEVICE, backend=case.backend)
        self.opt = FusedSGD(self.model.parameters(), lr=r.lr, backend=case.backend)
        self.statistics = case.peer == "fit-statistics"

    def setup(self) -> None:
        with torch.no_grad():
            self.model.weight.copy_(self.w0)
            self.model.bias.copy_(self.b0)

    def call(self) -> None:  # fit ends with a host read of the history: synchronised
        self.result = self.model.fit(self.x, self.t, epochs=self.regime.epochs, optimizer=self.opt,
                                     statistics=self.statistics, progress=False, check_finite=False)

    def check(self) -> dict:
        """The statistics path against a pass per epoch (float64 parameters are not needed: both
        are checked against float64 in tests/test_fit_statistics.py)."""
        self.setup()
        self.call()
        mine = (torch.tensor(self.result), self.model.weight.detach().clone())
        other = FitEpochs(Case(self.regime, "epochs", "fit-pass-per-epoch" if self.statistics else "fit-statistics",
                               self.case.backend))
        other.setup()
        other.call()
        tol = 1e-3 if self.x.dtype == torch.bfloat16 else 1e-4
        history_err = float((mine[0] - torch.tensor(other.result)).norm() / torch.tensor(other.result).norm())
        other_weight = other.model.weight.detach()
        weight_err = float((mine[1] - other_weight).norm() / other_weight.norm())
        assert history_err <= tol and weight_err <= tol, (history_err, weight_err)
        return {"check_history_rel_err": history_err, "check_weight_rel_err": weight_err, "check_tol": tol}


def _lstsq_reference(x, t) -> torch.Tensor:
    z = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
    return torch.linalg.lstsq(z.cpu(), t.double().cpu()).solution.t()  # [W b], (O, D + 1)


class Solve(Peer):
    def __init__(self, case: Case) -> None:
        super().__init__(case)
        r = self.regime
        if case.peer == "solve":
            self.model = FusedLinearRegressor(r.in_features, r.out_features, device=DEVICE, backend=case.backend)
        elif case.peer == "lstsq":
            self.z = torch.cat([self.x.float(), torch.ones(len(self.x), 1, device=DEVICE)], 1)
        else:
            self.x_np, self.t_np = self.x.float().cpu().numpy(), self.t.float().cpu().numpy()

    def call(self) -> None:
        if self.case.peer == "solve":
            self.model.solve(self.x, self.t)
            self.result = torch.cat([self.model.weight, self.model.bias[:, None]], 1).detach()
        elif self.case.peer == "lstsq":
            self.result = torch.linalg.lstsq(self.z, self.t.float()).solution.t()
        else:
            from sklearn.linear_model import LinearRegression

            fitted = LinearRegression().fit(self.x_np, self.t_np)
            self.result = torch.from_numpy(np.hstack([np.atleast_2d(fitted.coef_), fitted.intercept_[:, None]]))
        _sync()

    def check(self) -> dict:
        self.call()
        ref = _lstsq_reference(self.x, self.t)
        err = float((self.result.double().cpu() - ref).norm() / ref.norm())
        tol = 1e-4  # fp32 data and statistics, random well-conditioned features
        assert err <= tol, f"{self.case.name}: [W b] differs from float64 least squares by {err:.3g}"
        return {"check_solution_rel_err": err, "check_tol": tol}


class Pass(Peer):
    """One pass over (x, t): the co-moments (fit's statistics path) or the R factor (LinearStats)."""

    def call(self) -> None:
        if self.case.peer == "moments":
            self.result = select_ops(self.case.backend, DEVICE).linear_moments(
                self.x, self.t, fp64=self.x.dtype == torch.float64)
        else:
            self.result = LinearStats.from_tensors(self.x, self.t, backend=self.case.backend)
        _sync()

    def check(self) -> dict:
        """Both against the float64 Gram of the centred data."""
        self.call()
        x, t = self.x.double(), self.t.double()
        z = torch.cat([x - x.mean(0), t - t.mean(0)], 1)
        gram = z.t() @ z
        d = x.shape[1]
        m = self.result[3] if self.case.peer == "moments" else self.result.m_xx
        err = float((m - gram[:d, :d]).norm() / gram[:d, :d].norm())
        tol = 1e-12 if self.case.peer == "factor" or self.x.dtype == torch.float64 else 1e-5
        assert err <= tol, f"{self.case.name}: M_xx differs from float64 by {err:.3g}"
        return {"check_gram_rel_err": err, "check_tol": tol}


class Stream(Peer):
    def __init__(self, case: Case) -> None:
        super().__init__(case)
        self.x_np, self.t_np = self.x.cpu().numpy(), self.t.cpu().numpy()
        if case.peer == "h2d-copy":
            self.host = torch.empty(self.x.numel() + self.t.numel(), dtype=self.x.dtype, pin_memory=True)
            self.dev = torch.empty_like(self.host, device=DEVICE)

    def call(self) -> None:
        if self.case.peer == "h2d-copy":
            self.dev.copy_(self.host, non_blocking=True)
        else:
            self.result = LinearStats.from_arrays(self.x_np, self.t_np, chunk_rows=STREAM_CHUNK_ROWS, device=DEVICE,
                                                  backend=self.case.backend)
        _sync()

    def check(self) -> dict:
        if self.case.peer == "h2d-copy":
            return {}
        self.call()
        whole = LinearStats.from_tensors(self.x, self.t, backend=self.case.backend)
        err = float((self.result.m_xx - whole.m_xx).norm() / whole.m_xx.norm())
        tol = 1e-5
        assert err <= tol, f"streamed statistics differ from the in-memory ones by {err:.3g}"
        return {"check_moments_rel_err": err, "check_tol": tol}


def make_peer(case: Case) -> Peer:
    if case.task == "epochs":
        return EagerEpochs(case) if case.peer == "eager" else FitEpochs(case)
    if case.task.startswith("pass"):
        return Pass(case)
    return Solve(case) if case.task == "solve" else Stream(case)


# ------------------------------------------------------------------ the benchmark
_BASELINES: dict[str, float] = {}


def _labels() -> dict:
    name = torch.cuda.get_device_name(DEVICE) if ON_GPU else f"CPU ({platform.processor() or platform.machine()})"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": name, "cpu": not ON_GPU, "torch": torch.__version__, "triton": triton_version,
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bench_stats(benchmark, case: Case) -> None:
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    r = case.regime
    benchmark.group = case.group
    peer = make_peer(case)
    peer.setup()
    peer.call()  # warm-up: JIT, cuBLAS/cuSOLVER handles, allocator
    check = peer.check()
    data_bytes = r.n_rows * (r.in_features + r.out_features) * torch.finfo(r.dtype).bits // 8
    benchmark.extra_info.update(_labels(), regime=r.name, task=case.task, peer=case.name, baseline=case.baseline,
                                backend=case.backend, dtype=r.dtype_name, shape=r.shape, n_rows=r.n_rows,
                                in_features=r.in_features, out_features=r.out_features, epochs=r.epochs,
                                data_bytes=data_bytes, **check)
    rounds = int(os.environ.get("LINREG_BENCH_ROUNDS", 10 if ON_GPU else 3))
    benchmark.pedantic(peer.call, setup=peer.setup, rounds=rounds, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    if case.baseline:
        _BASELINES[case.group] = seconds
    base = _BASELINES.get(case.group)
    benchmark.extra_info.update(seconds=seconds, gbps=data_bytes / seconds / 1e9,
                                speedup_vs_baseline=None if base is None else base / seconds)
    if case.task == "stream" and base is not None:  # the goal: >= 80% of the host-to-device link
        benchmark.extra_info["frac_h2d"] = base / seconds
