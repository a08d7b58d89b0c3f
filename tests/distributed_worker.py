"""Scenarios for tests/test_distributed.py, run by every rank of a gloo
process group (spawned processes on this machine) and, with process_group=False,
by rank 0 after it has left the group, as the one-process reference on the
concatenated batches. Each scenario returns a dict of tensors.

Shapes are tiny and most scenarios use the PyTorch reference backend: each
spawned process pays for importing torch, and the Triton interpreter is
slow; one scenario runs the Triton kernels through the interpreter.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from linreg_fused import FusedLinearRegressor, FusedSGD, LinearStats, TrainingDivergedError
from linreg_fused.backend import triton_unavailable_reason
from linreg_fused.distributed import all_reduce_sum_, rank_slice

D, O = 3, 2
TIMEOUT = timedelta(seconds=60)  # a rank left waiting in a collective gives up after this


def data(n: int, seed: int, *, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh inputs and targets; ``exact``: small integers, so every sum below is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        return (torch.randint(-3, 4, (n, D), generator=g).float(), torch.randint(-3, 4, (n, O), generator=g).float())
    x = torch.randn(n, D, generator=g)
    return x, x @ torch.randn(O, D, generator=g).t() + 0.1 * torch.randn(n, O, generator=g)


def model(backend: str = "torch", *, exact: bool = False) -> FusedLinearRegressor:
    torch.manual_seed(7)
    m = FusedLinearRegressor(D, O, backend=backend)
    if exact:
        with torch.no_grad():
            m.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [1.0, 0.0, -0.5]]))
            m.bias.copy_(torch.tensor([0.25, -0.75]))
    return m


def state(m: FusedLinearRegressor, opt: torch.optim.Optimizer | None = None, **extra) -> dict[str, torch.Tensor]:
    out = {"weight": m.weight.detach().clone(), "bias": m.bias.detach().clone(), **extra}
    if opt is not None:
        out["weight_buffer"] = opt.state[m.weight]["momentum_buffer"].clone()
    return out


class Shard:
    """This process's view of a world of ``world`` ranks: its rank, and the
    process_group it passes. The one-process reference passes False and
    trains on every rank's rows."""

    def __init__(self, rank: int, world: int, process_group) -> None:
        self.rank, self.world, self.process_group = rank, world, process_group
        self.reference = process_group is False

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (shares differ by up to a row), or all of it."""
        return x if self.reference else x[rank_slice(x.shape[0], self.rank, self.world)]


# ---------------------------------------------------------------- scenarios
def train_step(s: Shard, *, backend: str = "torch", reduction: str = "mean", exact: bool = False, steps: int = 3):
    m = model(backend, exact=exact)
    opt = FusedSGD(m.parameters(), lr=2.0 ** -5 if exact else 0.05, momentum=0.5, backend=backend)
    losses = []
    for step in range(steps):
        x, t = data(8 if exact else 7 + step, seed=step, exact=exact)  # 7, 8, 9 rows: uneven shares
        losses.append(m.train_step(s.rows(x), s.rows(t), opt, reduction, process_group=s.process_group))
    return state(m, opt, losses=torch.stack(losses))


def loss_with_optimizer(s: Shard):
    m = model()
    opt = FusedSGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    for step in range(3):
        x, t = data(9, seed=10 + step)
        m.loss(s.rows(x), s.rows(t), optimizer=opt, process_group=s.process_group).backward()
    return state(m, opt)


def fit(s: Shard, *, batch_size: int | None, seed: int | None = 0, rng_seed: int = 0, n: int = 25,
        perturb: bool = False, statistics: bool | None = None):
    """Every rank passes the whole data; with world ranks each step takes world·batch_size rows.
    perturb: the ranks start from different parameters (fit broadcasts the first rank's)."""
    m = model()
    if perturb:
        with torch.no_grad():
            m.weight.add_(0.1 * s.rank)
    opt = FusedSGD(m.parameters(), lr=0.05, momentum=0.9)
    x, t = data(n, seed=20)
    if batch_size is not None and s.reference:
        batch_size *= s.world  # one process takes the rows of all ranks' batches at once
    torch.manual_seed(rng_seed)  # the global RNG, drawn from when seed is None
    history = m.fit(x, t, epochs=3, batch_size=batch_size, seed=seed, optimizer=opt, process_group=s.process_group,
                    statistics=statistics)
    return state(m, opt, history=torch.tensor(history))


def fit_diverges(s: Shard, *, statistics: bool):
    """lr 1e36 on data scaled by 1e3: epoch 1's loss is finite, its step overflows the parameters;
    every rank raises at epoch 1 and goes back to the parameters fit started from."""
    m = model()
    x, t = data(13, seed=60)
    try:
        m.fit(x * 1e3, t, epochs=2, optimizer=FusedSGD(m.parameters(), lr=1e36), process_group=s.process_group,
              statistics=statistics)
    except TrainingDivergedError as err:
        return state(m, epoch=torch.tensor(err.epoch))
    return state(m, epoch=torch.tensor(0))


def statistics_all_reduce(s: Shard):
    """LinearStats of each rank's rows, merged over the ranks: the statistics of all rows."""
    x, t = data(23, seed=50)
    stats = LinearStats.from_tensors(s.rows(x), s.rows(t), backend="torch")
    stats.all_reduce_(s.process_group)
    return {k: (torch.tensor(v) if k == "n_rows" else v) for k, v in stats.state_dict().items() if k != "precision"}


def ddp(s: Shard):
    """DistributedDataParallel on the autograd path: equal shares (DDP averages the ranks' gradients)."""
    m = model()
    net = m if s.reference else torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        x, t = data(12, seed=30 + step)
        opt.zero_grad()
        F.mse_loss(net(s.rows(x)), s.rows(t)).backward()
        opt.step()
    return state(m)


SCENARIOS = {
    "train_step": train_step,
    "train_step_sum": lambda s: train_step(s, reduction="sum"),
    "train_step_exact": lambda s: train_step(s, exact=True, steps=2),
    # None where this Triton's interpreter cannot run the kernels (the test then skips, saying why).
    "train_step_triton": lambda s: None if triton_unavailable_reason(torch.device("cpu")) else train_step(
        s, backend="triton", steps=2),
    "loss_with_optimizer": loss_with_optimizer,
    "fit_batches": lambda s: fit(s, batch_size=2),
    "fit_full_batch": lambda s: fit(s, batch_size=None),
    "fit_global_rng": lambda s: fit(s, batch_size=3, seed=None, rng_seed=s.rank),  # ranks' RNGs differ
    "fit_different_starts": lambda s: fit(s, batch_size=3, perturb=True),
    "fit_statistics": lambda s: fit(s, batch_size=None, statistics=True, perturb=True),
    "fit_diverges": lambda s: fit_diverges(s, statistics=False),
    "fit_statistics_diverges": lambda s: fit_diverges(s, statistics=True),
    "statistics_all_reduce": statistics_all_reduce,
    "ddp": ddp,
}


def checks_only_distributed(s: Shard) -> dict[str, torch.Tensor]:
    """What needs several ranks: the all-reduce helper, local training, and clear errors."""
    out = {}
    parts = [torch.full((2, 2), float(s.rank + 1), dtype=torch.float64), torch.arange(3, dtype=torch.float64) * s.rank]
    out["all_reduce_sum"] = torch.cat([p.reshape(-1) for p in parts]) if all_reduce_sum_(parts) else torch.empty(0)
    m = model()
    x, t = data(6, seed=40 + s.rank)
    out["local_loss"] = m.train_step(x, t, FusedSGD(m.parameters(), lr=0.05), process_group=False)
    out["local_weight"] = m.weight.detach().clone()
    try:
        n = 10 + s.rank  # the ranks disagree on the data: every rank must raise, none may hang
        m.fit(torch.randn(n, D), torch.randn(n, O), epochs=1, batch_size=2, seed=0, lr=0.1)
        out["mismatch_error"] = torch.tensor(0)
    except ValueError as err:
        out["mismatch_error"] = torch.tensor(int("differs across the ranks" in str(err)))
    try:  # statistics of another width on each rank: every rank raises before the gather
        d = 2 + s.rank
        LinearStats.from_tensors(torch.randn(5, d, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64),
                                 backend="torch").all_reduce_()
        out["stats_mismatch_error"] = torch.tensor(0)
    except ValueError as err:
        out["stats_mismatch_error"] = torch.tensor(int("in_features differs across the ranks" in str(err)))
    return out


def run(rank: int, world: int, init_file: str, out_dir: str, fail_rank: int = -1) -> None:
    """One rank: join the gloo group over loopback, run every scenario, save the results; rank 0
    then leaves the group and runs every scenario as the one process on all rows (reference.pt)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        if rank == fail_rank:
            raise RuntimeError(f"rank {rank} fails on purpose")
        shard = Shard(rank, world, None)  # None: the default (world) group, as users call it under torchrun
        results = {name: scenario(shard) for name, scenario in SCENARIOS.items()}
        results["distributed"] = checks_only_distributed(shard)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    if rank == 0:  # the one-process reference on every rank's rows, outside any process group
        reference = {name: scenario(Shard(0, world, False)) for name, scenario in SCENARIOS.items()}
        torch.save(reference, Path(out_dir) / "reference.pt")
