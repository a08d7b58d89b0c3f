"""linreg_fused.sklearn: scikit-learn's own estimator checks, and the estimators'
numbers against float64 least squares and scikit-learn's LinearRegression / Ridge.

Estimator checks that do not run, and why:
- check_array_api_input: scikit-learn runs it only with SCIPY_ARRAY_API=1 and
  array-api-compat installed, and only for estimators that declare array API
  support; these take torch tensors directly instead (tested below).
- the checks (or parts of checks) that build pandas DataFrames run only where
  pandas is installed; the test extra does not install it.
The rest run with backend="torch" (the same estimator code; the interpreter
would make the 50-odd checks take minutes): one test checks that the Triton
backend gives the same model.
"""

import importlib.util
import unittest

import numpy as np
import pytest
import torch
from conftest import DEVICE

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_diabetes, load_linnerud  # noqa: E402
from sklearn.exceptions import UndefinedMetricWarning  # noqa: E402
from sklearn.linear_model import LinearRegression, Ridge  # noqa: E402
from sklearn.metrics import r2_score  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from linreg_fused import FusedLinearRegressor, FusedSGD  # noqa: E402
from linreg_fused.sklearn import FusedLinearRegression, FusedSGDRegressor  # noqa: E402

SKIPPED_CHECKS = {"check_array_api_input"}


def _only_known_skips(estimator, check):
    """Run a check; a skip must be one of the known ones above."""
    try:
        check(estimator)
    except (pytest.skip.Exception, unittest.SkipTest) as skip:
        name = getattr(check, "func", check).__name__
        assert name in SKIPPED_CHECKS or (importlib.util.find_spec("pandas") is None
                                          and "pandas" in str(skip).lower()), (name, str(skip))
        raise


@parametrize_with_checks([FusedSGDRegressor(backend="torch")])
def test_sgd_regressor_passes_sklearn_checks(estimator, check):
    _only_known_skips(estimator, check)


@parametrize_with_checks([FusedLinearRegression(backend="torch")])
def test_linear_regression_passes_sklearn_checks(estimator, check):
    _only_known_skips(estimator, check)


def _data(n, d, o, rng, noise=0.05):
    x = rng.standard_normal((n, d))
    w, b = rng.uniform(-2, 2, (o, d)), rng.uniform(-3, 3, o)
    return x, x @ w.T + b + noise * rng.standard_normal((n, o))


def _lstsq(x, y):
    coef = np.linalg.lstsq(np.column_stack([x, np.ones(len(x))]), y, rcond=None)[0]
    return coef[:-1].T, coef[-1]


@pytest.mark.parametrize("n_targets", [1, 3])
def test_sgd_converges_to_least_squares_with_sklearn_shapes(n_targets):
    rng = np.random.default_rng()
    # Mini-batch SGD ends within its stationary noise of the least-squares solution, which scales
    # with the data's noise: at noise 0.05 the worst coefficient error over 12 fresh data sets was
    # 0.008-0.022 (the 0.02 bound failed 2 in 12), at 0.01 it was 0.0016-0.0043.
    x, y = _data(301, 5, n_targets, rng, noise=0.01)
    y_fit = y[:, 0] if n_targets == 1 else y  # 1-D y for a single target, as scikit-learn users pass it
    est = FusedSGDRegressor(epochs=200, batch_size=16, momentum=0.9, random_state=0, backend="torch",
                            dtype="float64").fit(x, y_fit)
    w, b = _lstsq(x, y)
    if n_targets == 1:
        assert est.coef_.shape == (5,) and isinstance(est.intercept_, float) and est.predict(x).shape == (301,)
        np.testing.assert_allclose(est.coef_, w[0], atol=0.015)
        np.testing.assert_allclose(est.intercept_, b[0], atol=0.015)
    else:
        assert est.coef_.shape == (3, 5) and est.intercept_.shape == (3,) and est.predict(x).shape == (301, 3)
        np.testing.assert_allclose(est.coef_, w, atol=0.015)
        np.testing.assert_allclose(est.intercept_, b, atol=0.015)
    assert est.score(x, y_fit) > 0.99 and est.n_features_in_ == 5 and est.n_iter_ == 200
    assert len(est.loss_curve_) == 200 and est.loss_curve_[-1] < est.loss_curve_[0]


def test_sgd_is_the_library_fit_with_the_same_seed_and_lr():
    rng = np.random.default_rng()
    x, y = _data(50, 3, 2, rng)
    est = FusedSGDRegressor(lr=0.05, epochs=7, batch_size=8, momentum=0.5, random_state=3, backend="torch").fit(x, y)
    # The estimator's default device is CUDA when there is one (conftest's DEVICE): the same
    # fit on the same device is the same arithmetic, bit for bit (a CPU one can differ in the last bit).
    model = FusedLinearRegressor(3, 2, backend="torch", device=DEVICE)
    assert est.model_.weight.device == model.weight.device
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    opt = FusedSGD(model.parameters(), lr=0.05, momentum=0.5, backend="torch")
    seed = int(np.random.RandomState(3).randint(2**31 - 1))
    x32, y32 = (torch.tensor(v, dtype=torch.float32, device=DEVICE) for v in (x, y))
    model.fit(x32, y32, epochs=7, batch_size=8, optimizer=opt, seed=seed)
    np.testing.assert_array_equal(est.coef_, model.weight.detach().double().cpu().numpy())
    np.testing.assert_array_equal(est.intercept_, model.bias.detach().double().cpu().numpy())


def test_auto_lr_and_explicit_lr():
    rng = np.random.default_rng()
    x, y = _data(40, 4, 2, rng)
    x = x * 100 + 100  # unscaled data: a fixed lr of 0.01 would diverge here
    est = FusedSGDRegressor(epochs=3, backend="torch").fit(x, y)
    assert est.lr_ == pytest.approx(1 / ((2 / 2) * ((x.astype(np.float32).astype(np.float64) ** 2).sum(1).max() + 1)))
    assert np.isfinite(est.coef_).all()
    assert FusedSGDRegressor(lr=0.125, epochs=1, backend="torch").fit(x, y).lr_ == 0.125
    for bad in ("fast", -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr must be a positive number or 'auto'"):
            FusedSGDRegressor(lr=bad, backend="torch").fit(x, y)


def test_random_state_reproducible_and_global_rng_untouched():
    rng = np.random.default_rng()
    x, y = _data(64, 3, 1, rng)
    state = torch.get_rng_state()
    a = FusedSGDRegressor(epochs=5, batch_size=4, random_state=1, backend="torch").fit(x, y[:, 0])
    b = FusedSGDRegressor(epochs=5, batch_size=4, random_state=1, backend="torch").fit(x, y[:, 0])
    c = FusedSGDRegressor(epochs=5, batch_size=4, random_state=2, backend="torch").fit(x, y[:, 0])
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert not np.array_equal(a.coef_, c.coef_)


def test_partial_fit_continues_with_momentum():
    rng = np.random.default_rng()
    x, y = _data(120, 4, 2, rng)
    est = FusedSGDRegressor(batch_size=10, momentum=0.9, random_state=0, backend="torch")
    for start in range(0, 120, 40):
        est.partial_fit(x[start:start + 40], y[start:start + 40])
    assert est.n_iter_ == 3 and len(est.loss_curve_) == 3
    assert all("momentum_buffer" in est.optimizer_.state[p] for p in est.model_.parameters())
    lr = est.lr_
    for _ in range(40):
        est.partial_fit(x, y)
    assert est.lr_ == lr and est.score(x, y) > 0.99
    with pytest.raises(ValueError, match="X has 3 features, but FusedSGDRegressor is expecting 4"):
        est.partial_fit(x[:, :3], y)
    with pytest.raises(ValueError, match="y has 1 targets, but the model was fitted with 2"):
        est.partial_fit(x, y[:, :1])


def test_torch_tensors_stay_on_their_device(device):
    rng = np.random.default_rng()
    x, y = _data(80, 3, 2, rng)
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    est_t = FusedSGDRegressor(epochs=20, batch_size=8, random_state=0, backend="torch").fit(xt, yt)
    est_n = FusedSGDRegressor(epochs=20, batch_size=8, random_state=0, backend="torch", device=device).fit(x, y)
    pred = est_t.predict(xt)
    assert isinstance(pred, torch.Tensor) and pred.device.type == device.type and pred.shape == (80, 2)
    np.testing.assert_array_equal(est_t.coef_, est_n.coef_)
    assert isinstance(est_n.predict(x), np.ndarray)
    assert est_t.score(xt, yt) == pytest.approx(est_n.score(x, y), rel=1e-9)
    assert not hasattr(est_t, "feature_names_in_") and est_t.n_features_in_ == 3
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est_t.predict(torch.full((2, 3), float("nan"), device=device))
    with pytest.raises(ValueError, match="X has 2 features"):
        est_t.predict(xt[:, :2])
    with pytest.raises(ValueError, match="requires y to be passed"):
        FusedSGDRegressor().fit(xt, None)


def test_triton_backend_gives_the_same_model():
    rng = np.random.default_rng()
    x, y = _data(37, 3, 2, rng)
    kwargs = dict(lr=0.05, epochs=4, batch_size=5, momentum=0.5, random_state=0)
    fused = FusedSGDRegressor(backend="triton", **kwargs).fit(x, y)
    reference = FusedSGDRegressor(backend="torch", **kwargs).fit(x, y)
    np.testing.assert_allclose(fused.coef_, reference.coef_, rtol=1e-5, atol=1e-6)  # float32 sums in other orders
    np.testing.assert_allclose(fused.intercept_, reference.intercept_, rtol=1e-5, atol=1e-6)


def test_in_a_pipeline_with_cross_validation():
    x, y = load_diabetes(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), FusedSGDRegressor(epochs=50, random_state=0, backend="torch"))
    scores = cross_val_score(pipe, x, y, cv=3)
    ols = cross_val_score(make_pipeline(StandardScaler(), LinearRegression()), x, y, cv=3)
    assert np.all(scores > ols - 0.05)  # SGD within 0.05 R² of the exact fit on each fold


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="needs pandas")
def test_feature_names_from_a_dataframe():
    x, y = load_diabetes(return_X_y=True, as_frame=True)
    est = FusedSGDRegressor(epochs=2, backend="torch").fit(x, y)
    assert list(est.feature_names_in_) == list(x.columns)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_exact_solution_matches_sklearn_on_its_data_sets(alpha):
    for x, y in (load_diabetes(return_X_y=True), load_linnerud(return_X_y=True)):
        ours = FusedLinearRegression(alpha=alpha, backend="torch", dtype="float64").fit(x, y)
        theirs = (Ridge(alpha=alpha) if alpha else LinearRegression()).fit(x, y)
        np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-6, atol=1e-6 * np.abs(theirs.coef_).max())
        np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=1e-6, atol=1e-6)
        assert ours.score(x, y) == pytest.approx(theirs.score(x, y), abs=1e-9)


def test_exact_without_intercept():
    x, y = load_diabetes(return_X_y=True)
    ours = FusedLinearRegression(fit_intercept=False, backend="torch", dtype="float64").fit(x, y)
    theirs = LinearRegression(fit_intercept=False).fit(x, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-6)
    assert ours.intercept_ == 0.0


# ---------------------------------------------------------------- hyper-parameters, precision, predict
def test_numpy_scalars_as_hyper_parameters():
    rng = np.random.default_rng()
    x, y = _data(48, 3, 1, rng)
    numpy_kwargs = dict(batch_size=np.int64(8), epochs=np.int32(2), lr=np.float32(0.0625), momentum=np.float32(0.5),
                        weight_decay=np.float64(1e-3))
    python_kwargs = {k: v.item() for k, v in numpy_kwargs.items()}
    a = FusedSGDRegressor(random_state=0, backend="torch", **numpy_kwargs).fit(x, y[:, 0])
    b = FusedSGDRegressor(random_state=0, backend="torch", **python_kwargs).fit(x, y[:, 0])
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.n_iter_ == 2 and type(a.n_iter_) is int and a.lr_ == 0.0625
    c = FusedSGDRegressor(random_state=0, backend="torch", **numpy_kwargs).partial_fit(x, y[:, 0])
    assert c.n_iter_ == 1
    ridge = FusedLinearRegression(alpha=np.float32(2), backend="torch", dtype="float64").fit(x, y)
    np.testing.assert_array_equal(ridge.coef_, FusedLinearRegression(alpha=2.0, backend="torch",
                                                                     dtype="float64").fit(x, y).coef_)
    for name, bad in (("batch_size", True), ("batch_size", 8.0), ("epochs", np.float64(2)), ("epochs", 0)):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            FusedSGDRegressor(backend="torch", **{name: bad}).fit(x, y)
    for name, bad in (("momentum", True), ("weight_decay", -1.0), ("momentum", np.float32("nan"))):
        with pytest.raises(ValueError, match=f"{name} must be a number >= 0"):
            FusedSGDRegressor(backend="torch", **{name: bad}).fit(x, y)
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        FusedLinearRegression(alpha=False).fit(x, y)


def test_grid_search_over_a_numpy_grid():
    from sklearn.model_selection import GridSearchCV

    rng = np.random.default_rng()
    x, y = _data(60, 3, 1, rng)
    search = GridSearchCV(FusedSGDRegressor(epochs=3, random_state=0, backend="torch"),
                          {"batch_size": np.array([8, 16]), "lr": np.array([0.01, 0.05])}, cv=2, error_score="raise")
    search.fit(x, y[:, 0])
    assert search.best_params_["batch_size"] in (8, 16) and np.isfinite(search.cv_results_["mean_test_score"]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_exact_solution_is_float64_for_a_float32_model(backend, as_tensor):
    """dtype="float32" is the model's: the solve uses float64 statistics of the float64 data, so
    data offset by 1e5 give the float64 least-squares coefficients rounded once to float32."""
    rng = np.random.default_rng()
    x = rng.standard_normal((40, 3)) + 1e5
    y = x @ np.array([[1.5, -2.0, 0.5], [0.25, 1.0, -1.0]]).T + [3.0, -1.0] + 0.1 * rng.standard_normal((40, 2))
    w, b = _lstsq(x, y)
    data = (torch.from_numpy(x), torch.from_numpy(y)) if as_tensor else (x, y)
    est = FusedLinearRegression(backend=backend).fit(*data)
    assert est.model_.weight.dtype == torch.float32
    np.testing.assert_allclose(est.coef_, w, rtol=1e-6)  # float32's rounding: 6e-8
    np.testing.assert_allclose(est.intercept_, b, rtol=1e-6)
    ridge = FusedLinearRegression(alpha=1.0, backend=backend).fit(*data)
    theirs = Ridge(alpha=1.0).fit(x, y)
    np.testing.assert_allclose(ridge.coef_, theirs.coef_, rtol=1e-6)


@pytest.mark.parametrize("estimator", [FusedLinearRegression(), FusedSGDRegressor(epochs=5, random_state=0)],
                         ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_rows_prediction_does_not_depend_on_its_batch(estimator, backend):
    """predict forms X·coef_ᵀ + intercept_ in float64 for NumPy input (a float32 model's
    predictions were 1 float32 ulp apart between a subset and the whole batch)."""
    from sklearn.base import clone
    from sklearn.utils.estimator_checks import check_methods_sample_order_invariance, check_methods_subset_invariance

    rng = np.random.default_rng()
    x, y = _data(97, 5, 2, rng)
    est = clone(estimator).set_params(backend=backend).fit(x, y)
    full = est.predict(x)
    np.testing.assert_allclose(full, x @ est.coef_.T + est.intercept_, rtol=1e-13, atol=1e-13)
    for rows in (slice(0, 1), slice(3, 20), slice(50, 97), rng.permutation(97)[:33]):
        np.testing.assert_allclose(est.predict(x[rows]), full[rows], rtol=1e-13, atol=1e-13)
    name = type(estimator).__name__
    check_methods_subset_invariance(name, clone(estimator).set_params(backend=backend))
    check_methods_sample_order_invariance(name, clone(estimator).set_params(backend=backend))


def test_set_params_between_partial_fits_applies_to_the_next_epoch():
    """lr, momentum and weight_decay changed with set_params between partial_fit
    calls take effect (as in scikit-learn's SGDRegressor), momentum buffers
    kept: full-batch epochs against torch.optim.SGD on nn.Linear in float64."""
    rng = np.random.default_rng()
    x, y = _data(24, 3, 2, rng)
    est = FusedSGDRegressor(lr=0.05, batch_size=24, shuffle=False, momentum=0.9, dtype="float64", backend="torch")
    ref = torch.nn.Linear(3, 2, dtype=torch.float64)
    torch.nn.init.zeros_(ref.weight), torch.nn.init.zeros_(ref.bias)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for settings in ({}, dict(lr=0.01, momentum=0.5, weight_decay=0.1), dict(lr=0.2, momentum=0.0)):
        est.set_params(**settings)
        opt.param_groups[0].update(settings)
        est.partial_fit(x, y)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(xt), yt).backward()
        opt.step()
        assert est.lr_ == opt.param_groups[0]["lr"]
        np.testing.assert_allclose(est.coef_, ref.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(est.intercept_, ref.bias.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_a_refit_refused_for_its_settings_keeps_the_fitted_model():
    rng = np.random.default_rng()
    x, y = _data(32, 3, 1, rng)
    est = FusedSGDRegressor(epochs=2, batch_size=8, random_state=0, backend="torch").fit(x, y[:, 0])
    coef, intercept = est.coef_.copy(), est.intercept_
    for bad in (dict(lr=-1.0), dict(momentum=-0.5), dict(lr="fast")):
        with pytest.raises(ValueError, match="must be"):
            est.set_params(**bad).fit(x, y[:, 0])
        est.set_params(lr="auto", momentum=0.0)
        np.testing.assert_array_equal(est.coef_, coef)
        assert est.intercept_ == intercept
    est.set_params(lr=-1.0)
    with pytest.raises(ValueError, match="lr must be"):
        est.partial_fit(x, y[:, 0])  # a later partial_fit is refused too, before its epoch
    np.testing.assert_array_equal(est.coef_, coef)
    est.set_params(lr=0.01).partial_fit(x, y[:, 0])  # and then continues the fitted model
    assert est.n_iter_ == 3 and not np.array_equal(est.coef_, coef)


@pytest.mark.parametrize("estimator", [FusedLinearRegression(backend="torch"),
                                       FusedSGDRegressor(epochs=2, random_state=0, backend="torch")],
                         ids=["exact", "sgd"])
def test_tensor_targets_are_checked_as_numpy_targets_are(estimator):
    """Tensor y goes through the checks scikit-learn gives arrays: a transposed y in score, a complex
    or target-less y in fit are errors (they used to give a wrong R², or drop the imaginary part)."""
    x, y = _data(12, 3, 2, np.random.default_rng())
    xt, yt = torch.tensor(x), torch.tensor(y)
    est = clone(estimator).fit(xt, yt)
    for ys in (yt, y, y.tolist()):  # a list's floats are float64, as in scikit-learn (not torch's float32)
        assert est.score(xt, ys) == pytest.approx(r2_score(y, est.predict(x)), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        est.score(xt, yt.T.contiguous())  # (2, 12): r2_score refuses it too
    with pytest.raises(ValueError, match="y has 1 targets, but .* predicts 2"):
        est.score(xt, yt[:, 0])
    with pytest.raises(ValueError, match="NaN"):
        est.score(xt, yt * float("nan"))
    for xs, ys in ((x, y), (xt, yt)):  # one row: no R², as r2_score says
        with pytest.warns(UndefinedMetricWarning):
            assert np.isnan(est.score(xs[:1], ys[:1]))
    np.testing.assert_array_equal(clone(estimator).fit(xt, y.tolist()).coef_, est.coef_)
    with pytest.raises(ValueError, match="y must hold real numbers"):
        clone(estimator).fit(xt, yt.to(torch.complex128))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        clone(estimator).fit(xt, torch.zeros(12, 0, dtype=torch.float64))


def test_boolean_settings_refuse_what_is_not_a_boolean():
    """fit_intercept="no" fitted an intercept, shuffle=None did not shuffle, silently; scikit-learn refuses both."""
    x, y = _data(10, 2, 1, np.random.default_rng())
    with pytest.raises(ValueError, match="fit_intercept must be True or False"):
        FusedLinearRegression(fit_intercept="no", backend="torch").fit(x, y)
    with pytest.raises(ValueError, match="shuffle must be True or False"):
        FusedSGDRegressor(shuffle=None, epochs=1, backend="torch").fit(x, y)
    assert FusedLinearRegression(fit_intercept=np.False_, backend="torch").fit(x, y).intercept_.tolist() == [0.0]
