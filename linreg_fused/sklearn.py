"""scikit-learn estimators (the ``sklearn`` extra; or ``pip install scikit-learn``).

    from linreg_fused.sklearn import FusedSGDRegressor, FusedLinearRegression
    est = FusedSGDRegressor(epochs=100, batch_size=32, random_state=0).fit(X, y)   # lr="auto"
    est.predict(X_new); est.score(X, y); est.coef_; est.intercept_
    make_pipeline(StandardScaler(), FusedSGDRegressor())        # like any regressor

FusedSGDRegressor trains with the fused SGD step (``FusedLinearRegressor.fit``);
FusedLinearRegression solves least squares, or ridge with ``alpha`` > 0
(``FusedLinearRegressor.solve``). Both take numpy arrays (and anything
scikit-learn accepts: lists, DataFrames) or torch tensors, single or
multiple targets.

- numpy-like input: validated by scikit-learn, copied to ``device`` (default:
  CUDA when available, else the CPU); ``predict`` returns a float64 numpy array,
  X·coef_ᵀ + intercept_ formed in float64 (as scikit-learn's linear models do
  with float64 X; a row's prediction does not depend on the rows beside it).
- torch tensors: stay on their device (or move to ``device`` if given);
  ``predict`` returns a tensor there (float64 tensors: formed in float64 as
  above; others: the model's fused forward in its dtype), ``score`` is
  computed there.
- ``coef_`` (n_targets, n_features), or (n_features,) for 1-D y, and
  ``intercept_`` (n_targets,), or a float for 1-D y, as numpy arrays, like
  scikit-learn's LinearRegression.
- hyper-parameters: Python or NumPy numbers alike (``np.int64(8)``, or a grid of
  ``np.array([8, 16])`` in GridSearchCV), not bools.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch.nn import functional as F

try:
    from sklearn.base import BaseEstimator, RegressorMixin
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("linreg_fused.sklearn needs scikit-learn >= 1.6: pip install scikit-learn (the sklearn extra)") from err

from .module import FusedLinearRegressor
from .optim import FusedSGD

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _FusedLinearModel(RegressorMixin, BaseEstimator):
    """Validation, prediction, scoring and the fitted attributes shared by both estimators."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    # ---- fitted attributes, read from the model (one device-to-host copy when asked for)
    @property
    def coef_(self) -> np.ndarray:
        check_is_fitted(self, "model_")
        coef = self.model_.weight.detach().to("cpu", torch.float64).numpy()
        return coef[0] if self._y_1d else coef

    @property
    def intercept_(self) -> np.ndarray | float:
        check_is_fitted(self, "model_")
        bias = self.model_.bias
        if bias is None:
            return 0.0 if self._y_1d else np.zeros(self.model_.out_features)
        bias = bias.detach().to("cpu", torch.float64).numpy()
        return float(bias[0]) if self._y_1d else bias

    def predict(self, X) -> np.ndarray | torch.Tensor:
        """(n_samples,) for a model fitted on 1-D y, else (n_samples, n_targets)."""
        check_is_fitted(self, "model_")
        is_tensor = isinstance(X, torch.Tensor)
        wide = not is_tensor or X.dtype == torch.float64 or self._dtype() == torch.float64
        x, _, _ = self._inputs(X, reset=False, dtype=torch.float64 if wide else None)
        with torch.no_grad():
            if wide:  # float64 products of the (float32 or float64) weights: no batch-dependent rounding
                weight, bias = self.model_.weight, self.model_.bias
                pred = F.linear(x, weight.double(), None if bias is None else bias.double())
            else:
                pred = self.model_(x)
        if self._y_1d:
            pred = pred[:, 0]
        return pred if is_tensor else pred.to("cpu", torch.float64).numpy()

    def score(self, X, y, sample_weight=None) -> float:
        """R² averaged over the targets (scikit-learn's default), computed on the device for tensors."""
        if not isinstance(X, torch.Tensor):
            return super().score(X, y, sample_weight=sample_weight)
        if sample_weight is not None:
            raise ValueError("sample_weight is supported for numpy input only")
        pred = self.predict(X).double()
        true = _check_targets(X, y).to(pred.device, torch.float64)
        if true[0].numel() != (pred.shape[1] if pred.ndim == 2 else 1):  # (n, 1) and (n,) pair as in r2_score
            raise ValueError(f"y has {true[0].numel()} targets, but {type(self).__name__} predicts "
                             f"{pred.shape[1] if pred.ndim == 2 else 1}")
        if len(true) < 2:
            warnings.warn("R^2 score is not well-defined with less than two samples.", UndefinedMetricWarning)
            return float("nan")
        true = true.reshape(pred.shape)
        sse = ((true - pred) ** 2).sum(0)
        sst = ((true - true.mean(0)) ** 2).sum(0)
        r2 = torch.where(sst > 0, 1 - sse / sst, torch.where(sse > 0, 0.0, 1.0))  # as sklearn's r2_score
        return float(r2.mean())

    # ---- input handling
    def _device(self, x=None) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if isinstance(x, torch.Tensor):
            return x.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]

    def _inputs(self, X, y="no_validation", *, reset: bool, dtype: torch.dtype | str | None = None):
        """(x (N, D), t (N, O) or None, whether X was a tensor), on the device in ``dtype``: the
        model's (None), a torch dtype, or "data": float32 when X and y both are, else float64.
        y: the targets when fitting (None is then an error), left out when predicting."""
        if isinstance(X, torch.Tensor):
            if y is None:
                raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None.")
            x, t = _check_tensors(X, None if isinstance(y, str) else y, self, reset)
            device, is_tensor = self._device(X), True
        else:
            if isinstance(y, str):
                x, t = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32]), None
            else:
                x, y = validate_data(self, X, y, reset=reset, multi_output=True, y_numeric=True,
                                     dtype=[np.float64, np.float32])
                t = np.asarray(y).reshape(len(x), -1)
                if reset:
                    self._y_1d = np.ndim(y) == 1
            device, is_tensor = self._device(), False
        if dtype == "data":
            both32 = all(str(v.dtype).endswith("float32") for v in (x, t) if v is not None)
            dtype = torch.float32 if both32 else torch.float64
        dtype = dtype or self._dtype()
        if is_tensor:
            return x.to(device, dtype), None if t is None else t.to(device, dtype), True
        x = torch.tensor(x, dtype=dtype, device=device)
        return x, None if t is None else torch.tensor(t, dtype=dtype, device=device), False

    def _new_model(self, x: torch.Tensor, t: torch.Tensor, bias: bool = True) -> FusedLinearRegressor:
        """A model with zero weight and bias (built on the meta device first, so that making
        it draws nothing from torch's global random generator)."""
        model = FusedLinearRegressor(x.shape[1], t.shape[1], bias, device="meta", dtype=self._dtype(),
                                     backend=self.backend)
        model = model.to_empty(device=x.device)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model


def _integer(name: str, value) -> int:
    """A Python int from any positive integer (NumPy's too, as GridSearchCV passes them), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _real(name: str, value, *, low: float = 0.0, strict: bool = False, what: str = "") -> float:
    """A Python float from any finite real number >= low (> low if strict), not a bool."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        what = what or f"a number {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _check_tensors(X: torch.Tensor, y, estimator, reset: bool):
    if X.ndim != 2:
        raise ValueError(f"Expected a 2D tensor (n_samples, n_features), got shape {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"Found a tensor with shape {tuple(X.shape)}; at least one sample and one feature "
                         f"are required")
    if not _real_tensor(X):
        raise ValueError(f"X must hold real numbers, got {X.dtype}")
    if reset:
        estimator.n_features_in_ = X.shape[1]
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    elif X.shape[1] != estimator.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but {type(estimator).__name__} is expecting "
                         f"{estimator.n_features_in_} features as input")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("Input X contains NaN or infinity")
    if y is None:
        return X, None
    t = _check_targets(X, y)
    if reset:
        estimator._y_1d = t.ndim == 1
    return X, t.reshape(X.shape[0], -1)


def _boolean(name: str, value, *also) -> None:
    """True or False (NumPy's too), as scikit-learn's own estimators require: a string like "no" is truthy."""
    if not isinstance(value, (bool, np.bool_)) and value not in also:
        raise ValueError(f"{name} must be True or False{''.join(f' or {a!r}' for a in also)}, got {value!r}")


def _real_tensor(v: torch.Tensor) -> bool:
    return v.is_floating_point() or v.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8,
                                                torch.bool)


def _check_targets(X: torch.Tensor, y) -> torch.Tensor:
    """y as a tensor on X's device: (n,) or (n, k >= 1) real, finite numbers, n the rows of X (a complex y
    would lose its imaginary part, a transposed one would pair the wrong rows). Lists, Series and DataFrames
    go through NumPy, so Python floats stay float64 (torch would round them to float32)."""
    t = torch.as_tensor(y if isinstance(y, torch.Tensor) else np.array(y), device=X.device)
    if t.ndim not in (1, 2) or t.shape[0] != X.shape[0] or t.numel() == 0:
        raise ValueError(f"Found input variables with inconsistent numbers of samples or shapes: X "
                         f"{tuple(X.shape)}, y {tuple(t.shape)} (y: (n_samples,) or (n_samples, n_targets >= 1))")
    if not _real_tensor(t):
        raise ValueError(f"y must hold real numbers, got {t.dtype}")
    if not bool(torch.isfinite(t.double()).all()):
        raise ValueError("Input y contains NaN or infinity")
    return t


class FusedSGDRegressor(_FusedLinearModel):
    """Linear regression trained by the tutorial's mini-batch SGD on the fused kernels.

    lr: the learning rate, or "auto" (default): 1 / ((2 / n_targets)·(max_i ‖x_i‖² + 1)),
    the largest step that no single row's loss can make unstable (the rule
    scikit-learn's SAG solver uses; a row's MSE has curvature (2 / n_targets)·‖x_i‖²
    in the weights, plus 1 for the bias), taken from the data of ``fit`` or of
    the first ``partial_fit``; the value used is ``lr_``. Data on different
    scales still trains faster standardised (StandardScaler).
    momentum, weight_decay: torch.optim.SGD's (FusedSGD); epochs: passes
    over the data in ``fit``; batch_size: rows per step; shuffle: a fresh row
    order each epoch (seeded by random_state: an int, a RandomState or
    None); device: where the data and model live (default: see the module);
    backend: "auto" | "triton" | "torch"; dtype: "float32" | "float64".
    ``partial_fit`` runs one epoch over the data it is given and keeps the
    weights and momentum between calls (lr, momentum and weight_decay changed by
    set_params apply from the next call). Weights start at zero.
    Attributes: coef_, intercept_, n_features_in_, feature_names_in_ (for
    inputs with column names), loss_curve_ (the mean batch loss of each
    epoch of the last fit, or of each partial_fit call), n_iter_ (epochs run),
    lr_ (the learning rate used). A learning rate too large for the data raises
    linreg_fused.TrainingDivergedError.
    """

    def __init__(self, lr: float | str = "auto", epochs: int = 100, batch_size: int = 32, momentum: float = 0.0,
                 weight_decay: float = 0.0, shuffle: bool = True, random_state=None, device=None,
                 backend: str = "auto", dtype: str = "float32") -> None:
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.momentum, self.weight_decay, self.shuffle = momentum, weight_decay, shuffle
        self.random_state, self.device, self.backend, self.dtype = random_state, device, backend, dtype

    def fit(self, X, y) -> "FusedSGDRegressor":
        """Train from zero for ``epochs`` epochs. X: (n_samples, n_features); y: (n_samples,) or (n_samples, n_targets)."""
        epochs, batch_size = _integer("epochs", self.epochs), _integer("batch_size", self.batch_size)
        x, t, _ = self._inputs(X, y, reset=True)
        self._start(x, t)
        self.loss_curve_ = self.model_.fit(x, t, epochs=epochs, batch_size=batch_size,
                                           optimizer=self.optimizer_, shuffle=self.shuffle, seed=self._seed,
                                           progress=False)
        self.n_iter_ = epochs
        return self

    def partial_fit(self, X, y) -> "FusedSGDRegressor":
        """One epoch over (X, y), continuing from the current weights (from zero on the first call)."""
        first = not hasattr(self, "model_")
        batch_size = _integer("batch_size", self.batch_size)
        x, t, _ = self._inputs(X, y, reset=first)
        if first:
            self._start(x, t)
            self.loss_curve_, self.n_iter_ = [], 0
        elif t.shape[1] != self.model_.out_features:
            raise ValueError(f"y has {t.shape[1]} targets, but the model was fitted with {self.model_.out_features}")
        else:  # hyper-parameters changed by set_params since the last call apply from this epoch on
            lr, momentum, weight_decay = self._settings(x, t.shape[1], keep_auto=True)
            for group in self.optimizer_.param_groups:
                group.update(lr=lr, momentum=momentum, weight_decay=weight_decay)
            self.lr_ = lr
        # a different, reproducible row order on each call
        seed = (self._seed + 1_000_003 * self.n_iter_) % (2**63)
        self.loss_curve_ += self.model_.fit(x.to(self.model_.weight.device), t.to(self.model_.weight.device),
                                            epochs=1, batch_size=batch_size, optimizer=self.optimizer_,
                                            shuffle=self.shuffle, seed=seed, progress=False)
        self.n_iter_ += 1
        return self

    def _start(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """A zero model, its optimizer and the seed; every hyper-parameter is checked before the
        fitted model (and optimizer) of an earlier fit is replaced."""
        lr, momentum, weight_decay = self._settings(x, t.shape[1], keep_auto=False)
        model = self._new_model(x, t)
        optimizer = FusedSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                             backend=self.backend)
        self.model_, self.optimizer_, self.lr_ = model, optimizer, lr
        self._seed = int(check_random_state(self.random_state).randint(2**31 - 1))

    def _settings(self, x: torch.Tensor, n_targets: int, *, keep_auto: bool) -> tuple[float, float, float]:
        """(lr, momentum, weight_decay), checked. keep_auto: lr="auto" keeps the lr_ an earlier
        "auto" took from the data of fit or the first partial_fit."""
        _integer("epochs", self.epochs)
        _boolean("shuffle", self.shuffle, "device")  # fit's device shuffle
        momentum, weight_decay = _real("momentum", self.momentum), _real("weight_decay", self.weight_decay)
        if not isinstance(self.lr, str):
            lr = _real("lr", self.lr, strict=True, what="a positive number or 'auto'")
            self._lr_auto = None
            return lr, momentum, weight_decay
        if self.lr != "auto":
            raise ValueError(f"lr must be a positive number or 'auto', got {self.lr!r}")
        if not (keep_auto and getattr(self, "_lr_auto", None) is not None):
            max_sq_norm = float((x.double() ** 2).sum(1).max())  # one sync, at the start of fit
            self._lr_auto = 1.0 / (2.0 / n_targets * (max_sq_norm + 1.0))
        return self._lr_auto, momentum, weight_decay


class FusedLinearRegression(_FusedLinearModel):
    """Exact least squares, or ridge regression with ``alpha`` > 0 (the intercept is not
    penalised), solved in float64 on the device (``FusedLinearRegressor.solve`` with
    float64 statistics of the data as given: float64 input is not rounded to float32).

    fit_intercept: learn a bias; device, backend, dtype: as FusedSGDRegressor
    (dtype is the model's, to which the float64 solution is rounded).
    Attributes: coef_, intercept_, n_features_in_, feature_names_in_.
    """

    def __init__(self, alpha: float = 0.0, fit_intercept: bool = True, device=None, backend: str = "auto",
                 dtype: str = "float32") -> None:
        self.alpha, self.fit_intercept = alpha, fit_intercept
        self.device, self.backend, self.dtype = device, backend, dtype

    def fit(self, X, y) -> "FusedLinearRegression":
        """Solve for the weights. X: (n_samples, n_features); y: (n_samples,) or (n_samples, n_targets)."""
        alpha = _real("alpha", self.alpha)
        _boolean("fit_intercept", self.fit_intercept)
        # The data at their own precision (float32 products are exact in float64 statistics).
        x, t, _ = self._inputs(X, y, reset=True, dtype="data")
        self.model_ = self._new_model(x, t, bias=self.fit_intercept)
        self.model_.solve(x, t, alpha=alpha, precision="fp64")
        return self
