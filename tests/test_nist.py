"""LinearStats against the certified values of NIST's StRD linear least-squares datasets
(tests/data/nist), on both backends, with float64 data, float32 data and fp32 accumulation.

Accuracy is McCullough's LRE: the correct significant digits of the worst estimate. Goals:

- float64 data: within 1 digit of a centred Householder QR (the issue's measured column, and
  the same method measured here on the same rows), for the estimates, their standard
  deviations, the residual standard deviation and R².
- float32 data: at least min(7, d − 1) digits, d those of a float64 QR of the float32-rounded
  data (rounding the data costs what it costs; the solver adds nothing beyond one digit).
- Any result with fewer than 4 correct digits comes with a warning that gives the condition
  number and the digits at risk (float32 data, and precision="fp32", lose digits that way).
"""

import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE
from nist_strd import NAMES, floor, load, lre

from linreg_fused import LinearStats


def estimates(summary, intercept):
    coef, se = summary.coef[0].cpu().numpy(), summary.std_err[0].cpu().numpy()
    if intercept:
        coef = np.concatenate([summary.intercept.cpu().numpy(), coef])
        se = np.concatenate([summary.intercept_std_err.cpu().numpy(), se])
    return coef, se


def fit(data, dtype, backend, precision=None):
    x, y = torch.from_numpy(data.x).to(dtype), torch.from_numpy(data.y)[:, None].to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = LinearStats.from_tensors(x.to(DEVICE), y.to(DEVICE), backend=backend, precision=precision)
        summary = stats.summary(fit_intercept=data.intercept)
    return summary, [str(w.message) for w in caught]


def accuracy(data, summary) -> dict[str, float]:
    coef, se = estimates(summary, data.intercept)
    return {"estimates": lre(coef, data.coef), "std errors": lre(se, data.std_err),
            "residual std": lre(summary.residual_std.cpu().numpy(), data.residual_std),
            "R²": lre(summary.r2.cpu().numpy(), data.r2)}


def warned(messages) -> bool:
    return any("condition number" in m and "digits" in m for m in messages)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_certified_values(name, dtype, backend):
    data = load(name)
    floor_digits = floor(data, dtype == torch.float32)
    summary, messages = fit(data, dtype, backend)
    got = accuracy(data, summary)
    for what, digits in got.items():
        assert digits >= floor_digits, f"{name} {dtype} {backend}: {what} {digits:.1f} < {floor_digits:.1f} ({got})"
    if got["estimates"] < 4.0:
        assert warned(messages), f"{name} {dtype}: {got['estimates']:.1f} digits without a warning: {messages}"
    if dtype == torch.float64:  # the default on float64 data: no warning where the digits are there
        assert not warned(messages), messages
    assert summary.n_rows == len(data.y) and summary.df_resid == len(data.y) - summary.rank
    if dtype == torch.float64:
        assert summary.rank == len(data.coef)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_accumulation_warns_where_digits_are_lost(name, backend):
    """precision="fp32" (for GPUs without fast fp64) loses digits with the condition number, and
    says so: every estimate below 4 digits is warned about; well-conditioned sets keep ≥ 7."""
    data = load(name)
    summary, messages = fit(data, torch.float64, backend, precision="fp32")
    digits = accuracy(data, summary)["estimates"]
    if digits < 4.0:
        assert warned(messages), f"{name}: {digits:.1f} digits without a warning: {messages}"
    if summary.condition_number < 2 and not data.intercept:
        assert digits >= 7.0, f"{name}: {digits:.1f} digits"
