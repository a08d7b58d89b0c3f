"""pytest-benchmark: whole training steps of linreg-fused against PyTorch peers.

Every regime of bench/regimes.py is one benchmark group, with the peers
listed there (the eager baseline first). On a GPU the regimes are the
performance brief's shapes. Without one, only tiny shapes run, through the
pure-PyTorch reference backend ("[torch]") and Triton's interpreter
("[triton-interp]"); their extra_info says cpu=True, and those figures say
nothing about GPU performance. Data, runners and the float64 check are shared
with the GPU check through bench/harness.py and bench/runners.py.

Timing: one benchmark call runs ``steps_per_call`` steps and ends with
torch.cuda.synchronize() on a GPU, so queued launches are not mistaken for
finished work; report.py divides the median call by steps_per_call. Every
peer is warmed up before timing on a GPU (JIT, autotuning, graph capture,
compile), then checked against float64 over one shuffled epoch
(bench/harness.py; on the CPU that epoch is the warm-up): a broken kernel
fails the run. When one input set is smaller than three times
the last-level cache (the GPU's L2; on the CPU a nominal 32 MiB), up to 8
sets are made and successive calls cycle through them, so a call does not
read what the previous one left in cache (on a GPU this applies to the
mini-batch datasets: 71 MB fp32, 36 MB bf16; the ~0.5-1.1 GB full-batch
inputs get one set, and the launch-bound tutorial keeps its one real
dataset). On the CPU, bench/conftest.py runs torch single-threaded (see there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch

from harness import check_against_reference, data_for, peak_extra_bytes, unavailable_reason
from regimes import REGIMES, Peer, Regime, peers_for, skip_reason
from runners import make_runner

if TYPE_CHECKING:  # bench/conftest.py; not imported at run time (pytest owns the "conftest" module name)
    from conftest import BenchEnv

ON_GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    regime: Regime
    peer: Peer

    @property
    def id(self) -> str:
        return f"{self.regime.group} :: {self.peer.name}".replace(" ", "_")


CASES = [Case(r, p) for r in REGIMES for p in peers_for(r, ON_GPU)]


def _rounds(env: BenchEnv, peer: Peer) -> int:
    if "LINREG_BENCH_ROUNDS" in os.environ:
        return int(os.environ["LINREG_BENCH_ROUNDS"])
    if env.on_gpu:
        return 30
    return 3 if "interp" in peer.name else 10


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bench(benchmark, case: Case, bench_env: BenchEnv, copy_gbps: float,
               baseline_times: dict[str, float]) -> None:
    regime, peer = case.regime, case.peer
    reason = skip_reason(regime, peer, bench_env.on_gpu) or unavailable_reason(peer, bench_env.device)
    if reason:
        pytest.skip(reason)
    benchmark.group = regime.group
    data = data_for(regime, bench_env.device)
    runner = make_runner(data, peer)

    if bench_env.on_gpu:
        runner.call()  # warm-up: JIT and compile, cuBLAS handles, allocator (on the CPU the check epoch is)
    check = check_against_reference(runner)
    peak, peak_extra = peak_extra_bytes(runner)

    benchmark.extra_info.update(
        bench_env.labels(),
        regime=regime.name, kind=regime.kind, peer=peer.name, baseline=peer.baseline,
        backend=peer.backend if peer.is_fused else "torch-eager",
        input_precision=peer.precision if peer.is_fused else None,
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
