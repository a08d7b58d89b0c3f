"""One least-squares fit per group of a DataFrame (pandas, or polars when installed).

    from linreg_fused.grouped import fit_frame
    coefs = fit_frame(sales, by="store", target="revenue", features=["price", "promo", "temp"])

returns one row per group, sorted by the key: the ``by`` column, one column per feature
holding its coefficient, then ``intercept``, ``n_rows`` and ``r2`` (1 − SSE/SST on the
group's rows; NaN where the target is constant within the group). The statistics of all
groups come from one pass over the rows (linreg_fused.grouped_stats), so 10⁴ groups cost
about what one regression on all the rows costs.
"""

from __future__ import annotations

import warnings
from typing import Any, Hashable, Sequence

import numpy as np
import torch

from .grouped_stats import NONFINITE, RANK_DEFICIENT, GroupedLinearStats

RESULT_COLUMNS = ("intercept", "n_rows", "r2")


def fit_frame(df: Any, by: str, target: str, features: Sequence[str] | None = None, alpha: float = 0.0, *,
              device: torch.device | str | None = None) -> Any:
    """Per-group linear regression of ``target`` on ``features`` (default: every other numeric
    column) over the groups of column ``by``; a DataFrame of the same library as ``df``.

    alpha: ridge penalty on the coefficients (not the intercept), as scikit-learn's Ridge.
    device: where the statistics are computed (default: the CPU, with PyTorch's kernels).
    A group with fewer distinct rows than features gets the minimum-norm coefficients, and one
    with NaN or inf in its rows NaN coefficients; a RuntimeWarning names them.
    """
    kind = _kind(df)
    columns = list(df.columns)
    features = _features(df, kind, columns, by, target, features)
    if len(df) == 0:
        raise ValueError("fit_frame: the DataFrame has no rows")
    keys, codes = _factorize(df, kind, by)
    x = _matrix(df, kind, features)
    t = _matrix(df, kind, [target])
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = "torch" if device.type == "cpu" else "auto"
    stats = GroupedLinearStats.from_tensors(torch.from_numpy(x).to(device), torch.from_numpy(t).to(device),
                                            torch.from_numpy(codes).to(device), len(keys), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # re-issued below with the groups' keys
        solution = stats.solve(alpha)
    weight, bias = solution.weight[:, 0].cpu().numpy(), solution.bias[:, 0].cpu().numpy()
    sse = stats.loss(solution.weight, solution.bias, reduction="sum").cpu().numpy()
    sst = stats.m_tt[:, 0, 0].cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 0, 1.0 - sse / sst, np.nan)
    _warn_with_keys(solution.status.cpu().numpy(), keys)
    data = {by: keys, **{name: weight[:, j] for j, name in enumerate(features)}, "intercept": bias[:],
            "n_rows": stats.n_rows.cpu().numpy(), "r2": r2}
    if kind == "polars":
        import polars as pl

        return pl.DataFrame({name: (pl.Series(name, v) if name == by else v) for name, v in data.items()})
    import pandas as pd

    return pd.DataFrame(data)


def _kind(df: Any) -> str:
    module = type(df).__module__.split(".")[0]
    if module == "pandas" and type(df).__name__ == "DataFrame":
        return "pandas"
    if module == "polars" and type(df).__name__ == "DataFrame":
        return "polars"
    raise TypeError(f"fit_frame takes a pandas or polars DataFrame, got {type(df).__module__}.{type(df).__name__} "
                    f"(a polars LazyFrame: .collect() it first)")


def _features(df, kind, columns, by, target, features) -> list[str]:
    for name, value in (("by", by), ("target", target)):
        if isinstance(value, (list, tuple)) and value not in columns:
            raise ValueError(f"{name} takes one column name, got {value!r}" + (
                " (to group by several columns, combine them into one key column first)" if name == "by" else ""))
        if not isinstance(value, Hashable) or value not in columns:  # pandas names may be ints, not only str
            raise ValueError(f"{name}={value!r} is not a column of the DataFrame (columns: {columns})")
    if by == target:
        raise ValueError("by and target are the same column")
    # pandas allows a name twice: df[name] would then be several columns (features=None looks at all).
    used = {by, target, *(columns if features is None else [features] if isinstance(features, str) else features)}
    twice = [c for c in dict.fromkeys(columns) if c in used and columns.count(c) > 1]
    if twice:
        raise ValueError(f"columns {twice} appear more than once in the DataFrame: rename or drop the copies")
    if features is None:
        features = [c for c in columns if c not in (by, target) and _is_numeric(df, kind, c)]
    else:
        features = [features] if isinstance(features, str) else list(features)
        missing = [f for f in features if f not in columns]
        if missing:
            raise ValueError(f"features {missing} are not columns of the DataFrame")
        if by in features or target in features:
            raise ValueError("features must not include the by or target column")
    if not features:
        raise ValueError("no feature columns: pass features=[...] (numeric columns)")
    if len(set(features)) != len(features):
        raise ValueError(f"features lists a column twice: {features}")
    clash = [c for c in (by, *features) if c in RESULT_COLUMNS]
    if clash:
        raise ValueError(f"columns {clash} would clash with the result's columns {RESULT_COLUMNS}; rename them")
    return features


def _is_numeric(df, kind, column) -> bool:
    if kind == "pandas":
        import pandas as pd

        dtype = df[column].dtype
        types = pd.api.types
        return types.is_numeric_dtype(dtype) and not types.is_bool_dtype(dtype) and not types.is_complex_dtype(dtype)
    return df[column].dtype.is_numeric()


def _factorize(df, kind, by) -> tuple[Any, np.ndarray]:
    """(the sorted distinct keys, each row's int64 code into them)."""
    column = df[by]
    missing = int(column.isna().sum()) if kind == "pandas" else column.null_count()
    if missing:
        raise ValueError(f"the by column {by!r} has {missing} missing keys: fill or drop those rows first")
    values = column.to_numpy()
    if values.dtype.kind in "iu" and values.size:
        dense = _dense_integer_codes(values)
        if dense is not None:
            return dense
    if kind == "pandas":
        import pandas as pd

        codes, keys = pd.factorize(column, sort=True)
        return keys, np.asarray(codes, dtype=np.int64)
    import polars as pl

    keys = column.unique().sort()
    codes = column.rank("dense").cast(pl.Int64).to_numpy() - 1
    return keys, np.ascontiguousarray(codes, dtype=np.int64)


def _dense_integer_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer keys spanning a range not much wider than the data: codes by counting, O(N) with no
    sort or hash (None for a wider range)."""
    low, high = int(values.min()), int(values.max())
    if high - low > 4 * values.size + 1024:
        return None
    # In int64 (or the unsigned type itself): int8 keys -100 and 100 differ by 200, beyond int8.
    offset = values.astype(np.int64) - low if values.dtype.kind == "i" else (values - values.min()).astype(np.int64)
    present = np.bincount(offset, minlength=high - low + 1) > 0
    code_of = np.cumsum(present) - 1
    return np.flatnonzero(present).astype(values.dtype) + low, code_of[offset]


def _matrix(df, kind, names) -> np.ndarray:
    if kind == "pandas":
        import pandas as pd

        complex_ = [n for n in names if pd.api.types.is_complex_dtype(df[n].dtype)]
        if complex_:  # to_numpy(float64) would drop the imaginary parts with a mere warning
            raise TypeError(f"columns {complex_} are complex: a real least-squares fit needs real columns")
    try:
        if kind == "pandas":
            out = df[names].to_numpy(dtype=np.float64)
        else:
            out = df.select(names).to_numpy().astype(np.float64, copy=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"columns {names} must be numeric: {err}") from None
    return np.require(out, requirements=["C", "W"])  # torch.from_numpy wants a writable array


def _warn_with_keys(status: np.ndarray, keys) -> None:
    for code, what in ((RANK_DEFICIENT, "are rank-deficient (fewer distinct rows than features, or collinear "
                        "features): minimum-norm coefficients"), (NONFINITE, "hold NaN or inf (or values beyond ~1e154, whose squares overflow): NaN coefficients")):
        where = np.flatnonzero(status == code)
        if where.size:
            shown = [_plain(keys[int(i)]) for i in where[:8]]
            more = f" and {where.size - len(shown)} more" if where.size > len(shown) else ""
            warnings.warn(f"fit_frame: {where.size} group(s) {what}: {shown}{more}", RuntimeWarning, stacklevel=3)


def _plain(key):
    """A NumPy scalar key as the Python value it holds (for readable messages)."""
    return key.item() if isinstance(key, np.generic) else key
