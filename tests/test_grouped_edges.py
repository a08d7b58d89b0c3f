"""Grouped regressions at their edges: rank-deficient groups whose columns differ in scale, tight
fits, a last step that overflows, NumPy hyper-parameters, and model files that are not what they
claim. Each test is the regression test of a defect found by an adversarial run; the float64
references are LinearStats (a QR of the group's rows) and torch.linalg.lstsq."""

import math
import warnings

import numpy as np
import pytest
import torch

from linreg_fused import LinearStats
from linreg_fused.grouped_stats import OK, RANK_DEFICIENT, GroupedLinearStats


def _mse(x, t, w, b):
    return float(((x @ w.T + b - t) ** 2).mean())


def test_a_rank_deficient_group_keeps_its_small_and_large_columns(backend):
    """Columns at 1e8, 1e-8, 1 and 1e4 plus a copy of the first: rank 4 of 5. The rank is decided
    on the scaled equations (as LinearStats decides it), so the 1e-8 column, which carries the
    target, is kept: the group's MSE is the least-squares optimum, the copies share their weight."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64) * torch.tensor([1e8, 1e-8, 1.0, 1e4],
                                                                              dtype=torch.float64)
    t = x[:, 1:2] * 1e8 + torch.randn(50, 1, generator=gen, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], 1)
    other = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    g = torch.cat([torch.zeros(50, dtype=torch.int64), torch.ones(30, dtype=torch.int64)])
    with pytest.warns(RuntimeWarning, match=r"0 \(rank_deficient, rank 4 of 5\)"):
        sol = GroupedLinearStats.from_tensors(torch.cat([x, other]), torch.cat([t, other[:, :1]]), g, 2,
                                              backend=backend).solve()
    assert sol.status.tolist() == [RANK_DEFICIENT, OK] and sol.rank.tolist() == [4, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w_ref, b_ref = LinearStats.from_tensors(x, t, backend="torch").solve()
    best = _mse(x, t, w_ref, b_ref)
    assert best < 1.5  # the reference keeps the 1e-8 column (dropping it leaves an MSE of ~1e16·var)
    assert _mse(x, t, sol.weight[0], sol.bias[0]) <= best * (1 + 1e-9)
    torch.testing.assert_close(sol.weight[0], w_ref, rtol=1e-7, atol=0)
    assert math.isclose(sol.weight[0, 0, 0], sol.weight[0, 0, 4], rel_tol=1e-9)


def test_an_exact_fit_has_a_loss_of_zero_not_below(backend):
    """Rows at 100 fitted exactly: the moments' residual sum is a rounding-level difference of large
    terms; the loss (and the r2 fit_frame derives from it) must not go below 0 (above 1)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64) * 1e3 + 100.0
    t = x @ torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64).T + 5.0
    g = torch.randint(0, 4, (200,), generator=gen)
    stats = GroupedLinearStats.from_tensors(x, t, g, 4, backend=backend)
    sol = stats.solve()
    for reduction in ("mean", "sum"):
        loss = stats.loss(sol.weight, sol.bias, reduction)
        assert bool((loss >= 0).all()), loss
        assert float(loss.max()) <= 1e-12 * float((t * t).sum())  # the moments' rounding level


@pytest.mark.parametrize("epochs", [1, 3])
def test_a_step_that_overflows_a_groups_parameters_stops_that_group(epochs):
    """The loss is taken before each step (in fp64, from the statistics: finite here), so a step that
    overflows the float32 weights is caught by checking the parameters too. The group keeps the
    values it had before that step, a warning names it, and a group with small rows trains on."""
    from linreg_fused.grouped_module import GroupedLinearRegressor

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 3, generator=gen)
    g = torch.arange(20) % 2
    x[g == 0] *= 1e20  # group 0's first step overflows float32 at lr 0.1; group 1's rows are small
    t = torch.randn(20, 2, generator=gen)
    model = GroupedLinearRegressor(2, 3, 2, backend="torch")
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"1 group\(s\) stopped being finite \(\[0\]"):
        history = model.fit(x, t, g, epochs=epochs, lr=0.1)
    assert bool(torch.isfinite(history[:, 1]).all())
    assert torch.equal(model.weight[0], start[0][0]) and torch.equal(model.bias[0], start[1][0])
    assert bool(torch.isfinite(model.weight[1]).all()) and not torch.equal(model.weight[1], start[0][1])


def test_numpy_scalars_are_taken_and_bools_refused():
    """As elsewhere in the library (scikit-learn's searches pass NumPy numbers)."""
    from linreg_fused.grouped_module import GroupedLinearRegressor

    gen = torch.Generator().manual_seed(5)
    x, t, g = torch.randn(30, 2, generator=gen), torch.randn(30, 1, generator=gen), torch.arange(30) % 3
    stats = GroupedLinearStats.from_tensors(x, t, g, np.int64(3), backend="torch")
    ref = stats.solve(alpha=0.5).weight
    for alpha in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(stats.solve(alpha=alpha).weight, ref, rtol=1e-7, atol=0)
    model = GroupedLinearRegressor(np.int64(3), np.int32(2), np.int64(1), backend="torch")
    assert (model.n_groups, model.in_features, model.out_features) == (3, 2, 1)
    history = model.fit(x, t, g, epochs=np.int64(2), lr=np.float32(0.1))
    assert history.shape == (2, 3)
    for call in (lambda: stats.solve(alpha=True), lambda: model.fit(x, t, g, epochs=True, lr=0.1),
                 lambda: model.fit(x, t, g, epochs=1, lr=True), lambda: GroupedLinearStats(True, 2, 1)):
        with pytest.raises(ValueError):
            call()


def test_grouped_model_files_are_checked_and_written_like_single_model_files(tmp_path):
    """A changed byte, malformed metadata or a tensor of the wrong kind is a ModelFileError (one line in
    the CLI, not a traceback); saving follows a symlink and keeps an existing file's mode, and a new
    file gets a normal file's mode (not mkstemp's owner-only 0600)."""
    import os
    import stat

    from safetensors.torch import save_file

    from linreg_fused.grouped_module import GroupedLinearRegressor
    from linreg_fused.serialization import ModelFileError

    model = GroupedLinearRegressor(3, 2, 2)
    path = tmp_path / "g.safetensors"
    umask = os.umask(0o022)
    try:
        model.save(path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    os.chmod(path, 0o600)
    model.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    model.save(link)
    assert link.is_symlink() and torch.equal(GroupedLinearRegressor.load(link).weight, model.weight)

    from linreg_fused import FusedLinearRegressor

    with pytest.raises(ModelFileError, match="GroupedLinearRegressor.load"):
        FusedLinearRegressor.load(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1  # a byte of the bias
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="checksum"):
        GroupedLinearRegressor.load(path)

    base = {"format": "linreg-fused-grouped", "format_version": "1"}
    good = {"weight": model.weight.detach().clone(), "bias": model.bias.detach().clone()}
    for meta, tensors, match in (({**base, "format_version": "1.0"}, good, "whole number"),
                                 ({**base, "n_groups": "7"}, good, "n_groups=7"),
                                 ({**base, "bias": "False"}, good, "bias"),
                                 (base, {"weight": torch.ones(3, 1, 2, dtype=torch.int64)}, "floating point"),
                                 (base, {"weight": torch.ones(0, 1, 2)}, "empty")):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, bad, metadata=meta)
        with pytest.raises(ModelFileError, match=match):
            GroupedLinearRegressor.load(bad)
