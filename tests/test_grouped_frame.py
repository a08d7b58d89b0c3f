"""fit_frame on pandas and polars DataFrames against a per-group float64 least-squares loop
(the pandas.groupby + numpy.linalg.lstsq a user would write), and its errors. Tolerance: 1e-9
relative (the statistics solve the normal equations of well-conditioned draws, cond < 20)."""

import warnings

import numpy as np
import pytest

from linreg_fused.grouped import fit_frame

pd = pytest.importorskip("pandas")


def frame(n=400, n_keys=13, seed=0):
    rng = np.random.default_rng(seed)
    keys = np.array([f"store-{k:02d}" for k in range(n_keys)])[rng.integers(0, n_keys, n)]
    x = rng.standard_normal((n, 3)) + [0.0, 5.0, -2.0]
    y = x @ [1.5, -0.5, 2.0] + rng.standard_normal(n) * 0.1 + rng.integers(0, 3, n)
    return pd.DataFrame({"store": keys, "price": x[:, 0], "label": "ignored", "temp": x[:, 1], "promo": x[:, 2],
                         "revenue": y})


def loop_reference(df, by, target, features):
    rows = {}
    for key, sub in df.groupby(by):
        a = np.column_stack([sub[features].to_numpy(float), np.ones(len(sub))])
        coef = np.linalg.lstsq(a, sub[target].to_numpy(float), rcond=None)[0]
        resid = sub[target].to_numpy(float) - a @ coef
        sst = ((sub[target] - sub[target].mean()) ** 2).sum()
        rows[key] = (*coef, len(sub), 1 - (resid @ resid) / sst)
    return rows


def check_against_loop(out, df, features):
    assert list(out.columns) == ["store", *features, "intercept", "n_rows", "r2"]
    expected = loop_reference(df, "store", "revenue", features)
    assert list(out["store"]) == sorted(expected)
    for row in out.itertuples(index=False):
        np.testing.assert_allclose(row[1:], expected[row[0]], rtol=1e-9, atol=1e-9, err_msg=row[0])


def test_pandas_matches_a_groupby_lstsq_loop():
    df = frame()
    out = fit_frame(df, by="store", target="revenue")  # features: the numeric columns but by/target
    check_against_loop(out, df, ["price", "temp", "promo"])
    assert out["n_rows"].sum() == len(df) and out["n_rows"].dtype == np.int64
    ridge = fit_frame(df, by="store", target="revenue", features=["temp", "price"], alpha=3.0)
    sub = df[df.store == "store-00"]
    x = sub[["temp", "price"]].to_numpy() - sub[["temp", "price"]].to_numpy().mean(0)
    w = np.linalg.solve(x.T @ x + 3.0 * np.eye(2), x.T @ (sub.revenue - sub.revenue.mean()).to_numpy())
    np.testing.assert_allclose(ridge.loc[ridge.store == "store-00", ["temp", "price"]].to_numpy()[0], w, rtol=1e-9)


def test_polars_matches_the_same_loop():
    pl = pytest.importorskip("polars")
    df = frame(seed=1)
    out = fit_frame(pl.from_pandas(df), by="store", target="revenue", features=["price", "temp", "promo"])
    assert isinstance(out, pl.DataFrame)
    check_against_loop(out.to_pandas(), df, ["price", "temp", "promo"])


def test_integer_keys_one_row_groups_and_a_constant_target():
    df = pd.DataFrame({"k": [5, 2, 5, 9, 5, 2, 2], "a": [1.0, 2, 3, 4, 5, 6, 8], "y": [1.0, 3, 2, 7, 4, 3, 3]})
    with pytest.warns(RuntimeWarning, match=r"1 group\(s\) are rank-deficient.*\[9\]"):
        out = fit_frame(df, by="k", target="y")
    assert out["k"].tolist() == [2, 5, 9] and out["n_rows"].tolist() == [3, 3, 1]
    assert np.isnan(out["r2"][0]) and out["a"][0] == 0.0 and out["intercept"][0] == 3.0  # y constant in group 2
    assert out["a"][2] == 0.0 and out["intercept"][2] == 7.0  # one row: the minimum-norm fit
    # Group 5: a = 1, 3, 5 and y = 1, 2, 4: slope 6/8, intercept 7/3 − 3·0.75, R² = 0.75²·8 / (42/9).
    np.testing.assert_allclose(out.loc[1, ["a", "intercept", "r2"]].astype(float),
                               [0.75, 7 / 3 - 2.25, 4.5 / (42 / 9)], rtol=1e-12)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(by="nope", target="revenue"), ValueError, "not a column"),
    (dict(by="store", target="store"), ValueError, "same column"),
    (dict(by="store", target="revenue", features=["price", "label"]), TypeError, "must be numeric"),
    (dict(by="store", target="revenue", features=["price", "revenue"]), ValueError, "must not include"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_frame(frame(n=30), **kwargs)


def test_missing_keys_and_non_frames_are_refused():
    df = frame(n=30)
    df.loc[3, "store"] = None
    with pytest.raises(ValueError, match="1 missing keys"):
        fit_frame(df, by="store", target="revenue")
    with pytest.raises(TypeError, match="pandas or polars DataFrame"):
        fit_frame(df.to_dict(), by="store", target="revenue")
    with pytest.raises(ValueError, match="the DataFrame has no rows"):
        fit_frame(frame(n=30).iloc[:0], by="store", target="revenue")  # not "x has shape (0, 3)"
    clash = frame(n=30).rename(columns={"price": "intercept"})
    with pytest.raises(ValueError, match="clash"):
        with warnings.catch_warnings():
            fit_frame(clash, by="store", target="revenue")


@pytest.mark.parametrize("keys", [[7, -3, 7, 7, -3, -3], [10**12, -5, 10**12, 10**12, -5, -5]],
                         ids=["dense-range", "wide-range"])
def test_integer_keys_are_coded_the_same_by_counting_and_by_factorizing(keys):
    df = pd.DataFrame({"k": keys, "a": [1.0, 2, 3, 5, 4, 9], "y": [1.0, 2, 2, 4, 3, 5]})
    out = fit_frame(df, by="k", target="y")
    assert out["k"].tolist() == sorted(set(keys)) and out["n_rows"].tolist() == [3, 3]
    check = pd.DataFrame({"a": [2.0, 4, 9], "y": [2.0, 3, 5]})
    slope = np.polyfit(check.a, check.y, 1)[0]
    np.testing.assert_allclose(out["a"][0], slope, rtol=1e-12)


@pytest.mark.parametrize("dtype, lo, hi, n", [("int8", -100, 100, 40), ("int16", -20000, 20000, 10_000)])
def test_narrow_integer_keys_whose_range_exceeds_their_type(dtype, lo, hi, n):
    # Keys coded by counting (a range under 4n + 1024): int8 keys -100 and 100 lie 200 apart, an
    # offset from the smallest key that int8 cannot hold (int16 likewise at ±20000).
    rng = np.random.default_rng(5)
    keys = rng.choice([lo, hi, lo + 1], n)
    x = rng.standard_normal((n, 2))
    y = np.where(keys == lo, 1.0, np.where(keys == hi, -2.0, 0.5)) * x[:, 0] + x[:, 1] + 0.1 * rng.standard_normal(n)
    df = pd.DataFrame({"k": keys.astype(dtype), "a": x[:, 0], "b": x[:, 1], "y": y})
    frames = [df]
    pl = pytest.importorskip("polars")
    frames.append(pl.from_pandas(df))
    for frame_ in frames:
        out = fit_frame(frame_, by="k", target="y")
        out = out.to_pandas() if not isinstance(out, pd.DataFrame) else out
        assert out["k"].tolist() == [lo, lo + 1, hi] and out["n_rows"].sum() == n
        for row in out.itertuples(index=False):
            sub = df[df.k == row.k]
            a = np.column_stack([sub[["a", "b"]].to_numpy(), np.ones(len(sub))])
            coef = np.linalg.lstsq(a, sub.y.to_numpy(), rcond=None)[0]
            np.testing.assert_allclose([row.a, row.b, row.intercept], coef, rtol=1e-9, atol=1e-12)


def test_a_column_name_used_twice_is_refused_not_half_fitted():
    # Two columns named "a": df[["a"]] is both, and "a"'s coefficient would be half of each.
    rng = np.random.default_rng(6)
    values = np.column_stack([rng.integers(0, 3, 30), rng.standard_normal((30, 3))])
    for names, kwargs in ((["k", "a", "a", "y"], dict(features=["a"])), (["k", "a", "a", "y"], dict()),
                          (["k", "k", "a", "y"], dict()), (["k", "a", "y", "y"], dict(features=["a"]))):
        df = pd.DataFrame(values, columns=names)
        with pytest.raises(ValueError, match=r"appear more than once"):
            fit_frame(df, by="k", target="y", **kwargs)
    # A name twice among columns the fit does not use is no ambiguity.
    out = fit_frame(pd.DataFrame(values, columns=["k", "a", "b", "y"]).assign(note="x", note2="y").set_axis(
        ["k", "a", "b", "y", "note", "note"], axis=1), by="k", target="y", features=["a"])
    assert list(out.columns) == ["k", "a", "intercept", "n_rows", "r2"] and out["n_rows"].sum() == 30


def test_complex_columns_are_not_fitted_as_their_real_parts():
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"k": rng.integers(0, 2, 20), "z": rng.standard_normal(20) + 1j * rng.standard_normal(20),
                       "a": rng.standard_normal(20), "y": rng.standard_normal(20)})
    out = fit_frame(df, by="k", target="y")  # features=None: the real numeric columns only
    assert list(out.columns) == ["k", "a", "intercept", "n_rows", "r2"]
    for kwargs in (dict(features=["a", "z"]), dict(target="z", features=["a"])):
        with pytest.raises(TypeError, match=r"\['z'\] are complex"):
            fit_frame(df, **{"by": "k", "target": "y", **kwargs})


def test_by_names_one_column_of_any_name_and_a_list_is_told_so():
    rng = np.random.default_rng(8)
    df = pd.DataFrame({0: rng.integers(0, 2, 20), 1: rng.standard_normal(20), "y": rng.standard_normal(20)})
    out = fit_frame(df, by=0, target="y")  # pandas column names need not be strings
    assert list(out.columns) == [0, 1, "intercept", "n_rows", "r2"] and out["n_rows"].sum() == 20
    with pytest.raises(ValueError, match="by takes one column name.*combine them"):
        fit_frame(df, by=[0, 1], target="y")
