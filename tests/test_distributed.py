"""Data parallel on torch.distributed: worlds of 2 and 3 processes with the
gloo backend on this machine (spawned here, loopback only, a file store,
bounded waits) against one process training on the concatenated batches.

Each world runs every scenario of tests/distributed_worker.py once (the
PyTorch reference backend, and the Triton interpreter for one), so the cost
is two process-group start-ups: about 5 spawned imports of torch, 10-30 s
of wall time on a 2-core machine. Every rank must end with bitwise the
same parameters; against one process they agree to float32 tolerance (the
sums are added in another order), and bitwise on data whose sums are exact.

The ranks hold CPU tensors (gloo), so they always run Triton's interpreter,
also on a machine with CUDA (where this process runs the compiled kernels and
cannot interpret): the one-process reference therefore comes from rank 0,
which runs every scenario again once it has left the group.
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import TOLERANCE, assert_close

import distributed_worker as worker
from linreg_fused import FusedSGD

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WAIT_S = 240  # for a whole world; each rank's collectives give up after worker.TIMEOUT
FP32 = TOLERANCE[torch.float32]


def _spawn(world: int, tmp_path, fail_rank: int = -1) -> mp.ProcessContext:
    init_file = tmp_path / "store"
    # The ranks' environment, read by Triton when it is first imported there: interpret the kernels.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "1")
        return mp.start_processes(worker.run, args=(world, str(init_file), str(tmp_path), fail_rank),
                                  nprocs=world, join=False, start_method="spawn")


def _join(context: mp.ProcessContext) -> None:
    """Wait for every rank; a rank that raises ends the others (join terminates them)."""
    deadline = time.monotonic() + WAIT_S
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {WAIT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def world(request, tmp_path_factory):
    size = request.param
    out = tmp_path_factory.mktemp(f"world{size}")
    _join(_spawn(size, out))
    return size, [torch.load(out / f"rank{r}.pt") for r in range(size)], torch.load(out / "reference.pt")


@pytest.mark.parametrize("scenario", [s for s in worker.SCENARIOS if s != "train_step_exact"])
def test_every_rank_ends_where_one_process_on_all_rows_ends(world, scenario):
    _, ranks, reference = world
    if ranks[0][scenario] is None:
        pytest.skip("the ranks' Triton interpreter cannot run the kernels here (see "
                    "linreg_fused.backend.triton_unavailable_reason: Triton < 3.9 with NumPy 2)")
    for r, result in enumerate(ranks[1:], start=1):
        for key, value in result[scenario].items():
            assert torch.equal(value, ranks[0][scenario][key]), f"rank {r} differs from rank 0 in {key}"
    expected = reference[scenario]
    assert ranks[0][scenario].keys() == expected.keys()
    for key, value in expected.items():
        if key == "losses" and scenario == "loss_with_optimizer":
            continue  # loss(..., optimizer=) returns each rank's own loss
        assert_close(ranks[0][scenario][key], value, FP32, key)


def test_exact_sums_give_bitwise_the_same_steps(world):
    """Small-integer data and dyadic parameters: the gradient sums of both steps are exact in float32 in any
    order, so the parameters match bitwise; so does the first loss (the second step's Σ R² needs more bits)."""
    _, ranks, reference = world
    result = ranks[0]["train_step_exact"]
    expected = reference["train_step_exact"]
    for key in ("weight", "bias", "weight_buffer"):
        assert torch.equal(result[key], expected[key]), key
    assert torch.equal(result["losses"][0], expected["losses"][0])
    assert_close(result["losses"], expected["losses"], FP32, "losses")


def test_all_reduce_helper_local_training_and_mismatched_data(world):
    size, ranks, _ = world
    total = sum(torch.cat([torch.full((4,), float(r + 1)), torch.arange(3.0) * r]) for r in range(size))
    for r, result in enumerate(ranks):
        checks = result["distributed"]
        assert torch.equal(checks["all_reduce_sum"], total.double()), r
        assert checks["mismatch_error"].item() == 1, f"rank {r} did not refuse data that differs across ranks"
        assert checks["stats_mismatch_error"].item() == 1, f"rank {r} gathered statistics of another width"
        # process_group=False: each rank trained on its own rows alone.
        m = worker.model()
        x, t = worker.data(6, seed=40 + r)
        loss = m.train_step(x, t, FusedSGD(m.parameters(), lr=0.05), process_group=False)
        assert torch.equal(checks["local_loss"], loss) and torch.equal(checks["local_weight"], m.weight.detach())


def test_a_rank_that_raises_does_not_hang_the_others(tmp_path):
    """Rank 1 raises before its first collective, while rank 0 waits in it: the run ends with that error
    (rank 0 is terminated, or its collective fails when rank 1's connection closes), not at WAIT_S."""
    started = time.monotonic()
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        _join(_spawn(2, tmp_path, fail_rank=1))
    assert time.monotonic() - started < worker.TIMEOUT.total_seconds()


def test_an_overflowing_step_diverges_on_every_rank(world):
    """Data parallel, a pass per epoch and the statistics path: epoch 1's all-reduced step overflows the
    parameters while its loss is finite; every rank raises at epoch 1 with the parameters fit started from."""
    _, ranks, reference = world
    start = worker.model()
    for r, results in enumerate([*ranks, reference]):
        for scenario in ("fit_diverges", "fit_statistics_diverges"):
            result = results[scenario]
            assert result["epoch"].item() == 1, (r, scenario)
            assert torch.equal(result["weight"], start.weight.detach()), (r, scenario)
            assert torch.equal(result["bias"], start.bias.detach()), (r, scenario)
