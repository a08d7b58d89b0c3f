"""Grouped statistics under torch.distributed: 2 gloo ranks (spawned here, loopback, a file
store), each with its share of the rows, all_reduce_ to the statistics of every row: the same
bits on both ranks, and those of one process on all rows to fp64 rounding. One spawn of two
processes (~5-10 s of torch imports on a 2-core machine)."""

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _join  # waits for every rank, bounded; ends them on failure

from linreg_fused.distributed import rank_slice
from linreg_fused.grouped_stats import GroupedLinearStats

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD, G = 2, 5


def data():
    gen = torch.Generator().manual_seed(60)
    x = torch.randn(41, 3, generator=gen, dtype=torch.float64) + 10.0
    g = torch.randint(0, G - 1, (41,), generator=gen)  # group G − 1 stays empty
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + torch.randn(41, 1, generator=gen,
                                                                                         dtype=torch.float64), g


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        x, t, g = data()
        share = rank_slice(x.shape[0], rank, WORLD)
        stats = GroupedLinearStats.from_tensors(x[share], t[share], g[share], G, backend="torch")
        torch.save(stats.all_reduce_().state_dict(), Path(out_dir) / f"rank{rank}.pt")
        try:  # a different number of groups on each rank: every rank raises before the gather
            GroupedLinearStats.from_tensors(x[:4], t[:4], g[:4] % 2, G + rank, backend="torch").all_reduce_()
            refused = ""
        except ValueError as err:
            refused = str(err)
        (Path(out_dir) / f"refused{rank}.txt").write_text(refused)
    finally:
        dist.destroy_process_group()


def test_ranks_all_reduce_to_the_statistics_of_every_row(tmp_path):
    _join(mp.start_processes(rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, t, g = data()
    expected = GroupedLinearStats.from_tensors(x, t, g, G, backend="torch").state_dict()
    for key, value in expected.items():
        if key == "precision":
            continue
        assert torch.equal(ranks[1][key], ranks[0][key]), f"rank 1 differs from rank 0 in {key}"
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-12, atol=1e-10, msg=key)
    assert ranks[0]["n_rows"].tolist()[-1] == 0 and ranks[0]["n_rows"].sum() == 41
    for r in range(WORLD):
        assert "n_groups differs across the ranks" in (tmp_path / f"refused{r}.txt").read_text(), r
