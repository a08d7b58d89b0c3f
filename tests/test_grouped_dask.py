"""linreg_fused.dask.linear_stats on a dask.distributed LocalCluster of 2 workers against the
statistics of the same rows in memory. The workers are threads (processes=False), to keep the
test to about two seconds: the partitions' tasks and the merge tree still run as scheduled
tasks on the two workers; only the transport (no pickling between processes) is skipped."""

import numpy as np
import pytest
import torch

from linreg_fused import LinearStats
from linreg_fused.grouped_stats import GroupedLinearStats

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("dask.distributed")
pd = pytest.importorskip("pandas")

from linreg_fused.dask import linear_stats, tree_reduce  # noqa: E402

FEATURES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def frame(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)) * [1.0, 3.0, 0.5] + [100.0, -4.0, 0.0]
    key = rng.choice(["north", "south", "east", "west", "tiny"], n, p=[0.3, 0.3, 0.2, 0.199, 0.001])
    key[3] = "tiny"  # at least one row
    y = x @ [0.5, -1.0, 2.0] + rng.standard_normal(n)
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y, "y2": -y, "region": key})


def assert_same_statistics(got, expected):
    assert torch.equal(torch.as_tensor(got.n_rows), torch.as_tensor(expected.n_rows))
    for key in ("mean_x", "mean_t", "m_xx", "m_tx", "m_tt"):
        torch.testing.assert_close(getattr(got, key), getattr(expected, key), rtol=1e-12, atol=1e-9)


def test_ungrouped_statistics_equal_the_in_memory_ones(client):
    df = frame()
    ddf = dd.from_pandas(df, npartitions=7)
    stats = linear_stats(ddf, FEATURES, ["y", "y2"], split_every=2)
    assert isinstance(stats, LinearStats)
    x, t = torch.tensor(df[FEATURES].to_numpy()), torch.tensor(df[["y", "y2"]].to_numpy())
    expected = LinearStats.from_tensors(x, t, backend="torch")
    # Compared through LinearStats' public results (its internal form is the solver's business).
    assert stats.n_rows == expected.n_rows == len(df)
    (w, b), (w_ref, b_ref) = stats.solve(), expected.solve()
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.loss(w, b), expected.loss(w, b), rtol=1e-9, atol=1e-12)
    assert client.run(lambda: 1)  # both workers are up and took part in the cluster


def test_grouped_statistics_equal_the_in_memory_ones(client):
    df = frame(seed=1)
    ddf = dd.from_pandas(df, npartitions=5)
    stats = linear_stats(ddf, FEATURES, "y", by="region", split_every=2)
    assert isinstance(stats, GroupedLinearStats)
    keys = sorted(df.region.unique())
    assert list(stats.group_keys) == keys
    codes = torch.tensor(np.searchsorted(keys, df.region.to_numpy()))
    x, t = torch.tensor(df[FEATURES].to_numpy()), torch.tensor(df[["y"]].to_numpy())
    expected = GroupedLinearStats.from_tensors(x, t, codes, len(keys), backend="torch")
    assert_same_statistics(stats, expected)
    torch.testing.assert_close(stats.solve(alpha=1.0).weight, expected.solve(alpha=1.0).weight, rtol=1e-10, atol=1e-12)


def test_the_tree_merges_in_order_with_the_fan_in_asked():
    calls = []

    def merge(items):
        calls.append(list(items))
        return "(" + "+".join(items) + ")"

    assert tree_reduce(list("abcde"), merge, 2) == "(((a+b)+(c+d))+e)"
    assert [len(c) for c in calls] == [2, 2, 2, 2]  # P − 1 pairwise merges, ceil(log2 P) levels
    assert tree_reduce(list("abcde"), lambda items: "".join(items), 8) == "abcde"


def test_errors_are_raised_before_any_partition_work(client):
    ddf = dd.from_pandas(frame(n=50), npartitions=2)
    with pytest.raises(ValueError, match=r"\['nope'\] are not in the DataFrame"):
        linear_stats(ddf, ["a", "nope"], "y")
    with pytest.raises(ValueError, match="split_every"):
        linear_stats(ddf, FEATURES, "y", split_every=1)
    with pytest.raises(ValueError, match="split_every"):
        linear_stats(ddf, FEATURES, "y", split_every=True)
    with pytest.raises(TypeError, match="takes a Dask DataFrame"):
        linear_stats(frame(n=50), FEATURES, "y")  # not an AttributeError of to_delayed
    assert linear_stats(ddf, FEATURES, "y", split_every=np.int64(2)).n_rows == 50  # NumPy's integers, as elsewhere
    df = frame(n=50)
    df.loc[2, "region"] = None
    with pytest.raises(ValueError, match="1 missing keys"):
        linear_stats(dd.from_pandas(df, npartitions=2), FEATURES, "y", by="region")


def test_keys_survive_compute_false_and_copies_and_guard_merges(client):
    df = frame(n=200, seed=2)
    df.loc[150, "region"] = "tiny"  # every region on both sides
    first, second = df.iloc[:100], df.iloc[100:]
    delayed = linear_stats(dd.from_pandas(first, npartitions=3), FEATURES, "y", by="region", compute=False)
    a = delayed.compute()
    b = linear_stats(dd.from_pandas(second, npartitions=2), FEATURES, "y", by="region")
    other = linear_stats(dd.from_pandas(second.replace({"region": {"west": "zz-new"}}), npartitions=2),
                         FEATURES, "y", by="region")
    keys = sorted(df.region.unique())
    assert list(a.group_keys) == keys and list(a.to("cpu").group_keys) == keys
    # The same stores on both sides: the merge is the statistics of all the rows.
    merged = a.to("cpu").merge(b)
    codes = torch.tensor(np.searchsorted(keys, df.region.to_numpy()))
    expected = GroupedLinearStats.from_tensors(torch.tensor(df[FEATURES].to_numpy()), torch.tensor(df[["y"]].to_numpy()),
                                               codes, len(keys), backend="torch")
    assert_same_statistics(merged, expected)
    # Another set of stores with as many groups: group i would mix two stores' rows.
    assert other.n_groups == a.n_groups
    with pytest.raises(ValueError, match="other groups"):
        a.merge(other)
