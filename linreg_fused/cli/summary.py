"""Numbers ``train`` derives from the data's statistics: SGD's default learning rate, and
the exact solver's standard errors."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..stats import LinearStats


def derived_lr(stats: LinearStats, x: torch.Tensor, batch_size: int, momentum: float = 0.0,
               weight_decay: float = 0.0) -> float:
    """A learning rate at which mini-batch SGD on F.mse_loss (mean over rows and targets) is
    stable, from one statistics pass and the rows' largest norm.

    For rows z = (x, 1) the loss of one target's (w, b) has the Hessian (2/O)·E[z·zᵀ] on a
    batch. Ma, Bassily and Belkin (2018, "The power of interpolation") give the step at which
    mini-batch SGD on least squares still converges as η(B) = B / (β + (B − 1)·λ) in those
    units: λ the largest eigenvalue of E[z·zᵀ] over all rows, β = max ‖z‖² over rows. For a
    full batch it is about 1/λ, which makes gradient descent converge in every direction;
    for B = 1 it is 1/β, scikit-learn's SAG rule. Weight decay adds to the curvature. With
    momentum μ on mini-batches the step is scaled by (1 − μ): the effective step η/(1 − μ)
    would otherwise multiply the gradient noise (on the diabetes data, batch 32, μ = 0.9:
    R² 0.30 without the scaling, 0.51 with it; least squares: 0.518).
    """
    n, d, o = stats.n_rows, stats.in_features, stats.out_features
    mean = stats.mean_x
    second = torch.ones((d + 1, d + 1), dtype=torch.float64, device=mean.device)
    second[:d, :d] = stats.m_xx / n + torch.outer(mean, mean)
    second[:d, d] = second[d, :d] = mean
    lam = float(torch.linalg.eigvalsh(second)[-1])
    beta = float(torch.linalg.vector_norm(x.reshape(-1, d), dim=1, dtype=torch.float64).max()) ** 2 + 1.0
    b = min(batch_size, n)
    curvature = (2.0 / o) * (beta + (b - 1) * lam) / b + weight_decay
    lr = 1.0 / curvature
    if b < n:
        lr *= 1.0 - momentum
    return lr


def standard_errors(stats: LinearStats | None, alpha: float, scale: np.ndarray | None) -> dict | None:
    """The exact solver's standard errors and t statistics for the coefficient table, from
    LinearStats.summary; None without statistics (SGD: the table then shows the coefficients
    alone, never placeholder numbers).

    scale: the features' standardisation (None: raw features). The coefficients are shown for
    raw features, w / scale, so their standard errors are divided by scale too (t is
    unchanged); the intercept's would need the coefficients' covariance, which the summary
    does not give, so it is left out then.
    """
    if stats is None:
        return None
    with warnings.catch_warnings():  # the solve's own warnings were shown when the model was solved
        warnings.simplefilter("ignore", RuntimeWarning)
        s = stats.summary(alpha=alpha, fit_intercept=True)
    std_err = torch.as_tensor(s.std_err, dtype=torch.float64).cpu()
    t_values = torch.as_tensor(s.t_values, dtype=torch.float64).cpu()
    if scale is not None:
        std_err = std_err / torch.as_tensor(scale, dtype=torch.float64)
    out = {"std_err": std_err.tolist(), "t_values": t_values.tolist()}
    if scale is None and s.intercept_std_err is not None:
        out["intercept_std_err"] = torch.as_tensor(s.intercept_std_err, dtype=torch.float64).cpu().tolist()
        out["intercept_t"] = torch.as_tensor(s.intercept_t, dtype=torch.float64).cpu().tolist()
    return out
