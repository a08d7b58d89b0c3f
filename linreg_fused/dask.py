"""Statistics of a Dask DataFrame: each partition summarised where it lies, merged in a tree.

    import dask.dataframe as dd
    from linreg_fused.dask import linear_stats
    stats = linear_stats(dd.read_parquet("sales/*.parquet"), ["price", "promo"], "revenue", by="store")
    weight, bias = stats.solve()        # one model per store; stats.group_keys[i] names group i

Each partition becomes a LinearStats (or, with ``by``, a GroupedLinearStats) in a task that
runs where the partition is, so only the statistics travel: (D+O+1)² numbers per group, not
rows. They are merged pairwise (Chan's update) in a tree of fan-in ``split_every``, in
partition order, so the result does not depend on which worker finished first. Requires the
``dask`` extra (pip install "linreg-fused[dask]").
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .grouped_stats import GroupedLinearStats
from .stats import LinearStats


def linear_stats(ddf: Any, features: Sequence[str], target: str | Sequence[str], by: str | None = None, *,
                 split_every: int = 8, compute: bool = True) -> LinearStats | GroupedLinearStats | Any:
    """LinearStats of ``target`` on ``features`` over every row of the Dask DataFrame ``ddf``, or
    with ``by`` a GroupedLinearStats with one group per distinct value of that column (sorted;
    ``group_keys`` holds them). fp64 statistics, computed with PyTorch on each worker's CPU.

    With ``by``, the distinct keys are found first (one pass over that column alone).
    split_every: partitions' statistics merged per task of the tree. compute=False returns the
    dask.delayed result instead of computing it (on the current scheduler or distributed Client).
    """
    import dask

    if not hasattr(ddf, "to_delayed"):
        raise TypeError(f"linear_stats takes a Dask DataFrame, got {type(ddf).__module__}.{type(ddf).__name__} "
                        f"(a pandas or polars one: linreg_fused.grouped.fit_frame, or dask.dataframe.from_pandas)")
    features = [features] if isinstance(features, str) else list(features)
    targets = [target] if isinstance(target, str) else list(target)
    if not features or not targets:
        raise ValueError("give at least one feature and one target column")
    missing = [c for c in (*features, *targets, *([by] if by is not None else [])) if c not in ddf.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the DataFrame (columns: {list(ddf.columns)})")
    if not isinstance(split_every, numbers.Integral) or isinstance(split_every, (bool, np.bool_)) or split_every < 2:
        raise ValueError(f"split_every must be an integer >= 2, got {split_every!r}")
    keys = None
    if by is not None:
        column = ddf[by]
        n_missing = int(column.isna().sum().compute())
        if n_missing:
            raise ValueError(f"the by column {by!r} has {n_missing} missing keys: fill or drop those rows first")
        keys = np.sort(column.unique().compute().to_numpy())
    split_every = int(split_every)
    parts = [dask.delayed(_partition_stats)(p, features, targets, by, keys) for p in ddf.to_delayed()]
    # The keys travel with the result, so that compute=False's delayed result carries them too.
    result = dask.delayed(_named)(tree_reduce(parts, dask.delayed(_merge_all), split_every), keys)
    return result.compute() if compute else result


def tree_reduce(items: list[Any], merge: Callable[[list[Any]], Any], split_every: int) -> Any:
    """Merge ``items`` in a tree: ``merge`` of up to ``split_every`` consecutive items per node,
    level by level, until one is left (kept in order at every level; a lone last item waits for
    the next level)."""
    if not items:
        raise ValueError("the DataFrame has no partitions")
    while len(items) > 1:
        items = [merge(items[i : i + split_every]) if len(items[i : i + split_every]) > 1 else items[i]
                 for i in range(0, len(items), split_every)]
    return items[0]


def _partition_stats(df, features, targets, by, keys):
    """One partition's statistics (None for an empty partition)."""
    if len(df) == 0:
        return None
    x = torch.from_numpy(np.require(df[features].to_numpy(dtype=np.float64), requirements=["C", "W"]))
    t = torch.from_numpy(np.require(df[targets].to_numpy(dtype=np.float64), requirements=["C", "W"]))
    if by is None:
        return LinearStats.from_tensors(x, t, backend="torch")
    codes = np.searchsorted(keys, df[by].to_numpy())
    groups = torch.from_numpy(np.require(codes, dtype=np.int64, requirements=["C", "W"]))
    return GroupedLinearStats.from_tensors(x, t, groups, len(keys), backend="torch")


def _named(stats: Any, keys: Any) -> Any:
    """The merged statistics with their group keys (None for ungrouped ones)."""
    if stats is None:
        raise ValueError("the DataFrame has no rows")
    if keys is not None:
        stats.group_keys = keys
    return stats


def _merge_all(stats: list[Any]) -> Any:
    """Statistics of the union, merged left to right; empty partitions (None) skipped."""
    merged = None
    for s in stats:
        if s is None:
            continue
        merged = s.to(s.device) if merged is None else merged.merge(s)  # a copy: task results stay as they were
    return merged
