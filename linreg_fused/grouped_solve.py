"""Per-group least-squares and ridge solutions from grouped moments (batched, fp64)."""

from __future__ import annotations

import math

import torch

from .grouped_ops import GroupedMoments

# GroupedSolution.status codes (linreg_fused.grouped_stats).
OK, RANK_DEFICIENT, EMPTY, NONFINITE = 0, 1, 2, 3
_EPS64 = 2.0**-53
DIGITS_WARNING = 4.0  # warn about groups whose coefficients may have fewer correct digits (as LinearStats.solve)


def solve_groups(moments: GroupedMoments, alpha: float, fit_intercept: bool, *, threshold: float):
    """(weight (G, O, D), bias (G, O) or None, status (G,) int8, rank (G,) int64, error (G,)) minimising
    Σ_rows ‖W_g·x + b_g − t‖² + alpha·‖W_g‖² for every group g (intercept unpenalised).

    Groups whose unit-diagonal normal equations have a smallest eigenvalue above ``threshold``
    are solved by Cholesky; the others by an eigendecomposition of the same unit-diagonal
    equations (columns of any scale count alike), dropping eigenvalues below ``threshold`` times
    the largest (the minimum-norm solution, see ``_minimum_norm``).

    error: each full-rank group's estimated relative error of its coefficients (0 elsewhere). The
    normal equations square the condition number: D·ε·λ_max/λ_min of the unit-diagonal equations
    (λ_max ≤ D; the factor D for the accumulation of the moments, as LinearStats counts P·ε), where
    a QR solve of the same rows would lose only about its square root."""
    n, mean_x, mean_t, m_xx, m_tx, _ = moments
    g, d = mean_x.shape
    nf = n.to(torch.float64)
    if fit_intercept:
        a, rhs = m_xx, m_tx
    else:  # uncentred: Σ x·xᵀ and Σ t·xᵀ
        a = m_xx + nf[:, None, None] * mean_x[:, :, None] * mean_x[:, None, :]
        rhs = m_tx + nf[:, None, None] * mean_t[:, :, None] * mean_x[:, None, :]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    a = a + alpha * eye
    empty = n == 0
    finite = torch.isfinite(a).flatten(1).all(1) & torch.isfinite(rhs).flatten(1).all(1) & torch.isfinite(
        mean_t).all(1)
    usable = finite & ~empty
    a = torch.where(usable[:, None, None], a, eye)  # keep the factorisations away from NaN and zeros
    rhs = torch.where(usable[:, None, None], rhs, 0.0)

    diag = a.diagonal(dim1=1, dim2=2)
    scale = torch.where(diag > 0, diag.clamp_min(torch.finfo(a.dtype).tiny).rsqrt(), torch.ones_like(diag))
    scaled = a * scale[:, :, None] * scale[:, None, :]
    factor, info = torch.linalg.cholesky_ex(scaled)
    # Each group's smallest eigenvalue from above: its smallest pivot, and a few steps of
    # inverse iteration (‖a⁻¹v‖ ≤ 1/λ_min for a unit v), as LinearStats.solve does for one.
    lam_min = factor.diagonal(dim1=1, dim2=2).square().amin(1)
    v = torch.ones((d, 1), dtype=a.dtype, device=a.device) / math.sqrt(d)
    v = (v + torch.linspace(-0.5, 0.5, d, dtype=a.dtype, device=a.device)[:, None] / d).expand(g, d, 1)
    for _ in range(6):
        v = torch.cholesky_solve(v, factor)
        norm = v.norm(dim=1, keepdim=True)
        lam_min = torch.minimum(lam_min, 1.0 / norm[:, 0, 0])
        v = v / norm
    full = (info == 0) & torch.isfinite(lam_min) & (lam_min > threshold)
    weight = (torch.cholesky_solve((rhs * scale[:, None, :]).mT, factor) * scale[:, :, None]).mT
    rank = torch.where(usable, d, 0)

    fallback = torch.nonzero(usable & ~full).flatten()  # the one sync of the solve
    if fallback.numel():
        weight[fallback], rank[fallback] = _minimum_norm(scaled[fallback], rhs[fallback], scale[fallback], threshold)

    error = torch.where(full & usable, d * d * _EPS64 / lam_min.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
    status = torch.full((g,), OK, dtype=torch.int8, device=a.device)
    status[rank < d] = RANK_DEFICIENT
    status[~finite] = NONFINITE
    status[empty] = EMPTY
    nan = torch.tensor(float("nan"), dtype=a.dtype, device=a.device)
    weight = torch.where(usable[:, None, None], weight, nan)
    bias = None
    if fit_intercept:
        bias = torch.where(usable[:, None], mean_t - torch.einsum("god,gd->go", weight, mean_x), nan)
    return weight.contiguous(), bias, status, rank, error


def _minimum_norm(scaled: torch.Tensor, rhs: torch.Tensor, scale: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (F, O, D), rank (F,)) of rank-deficient groups: the least-squares solution on the
    well-determined directions of the unit-diagonal equations ``scaled`` = S·A·S (S = diag(scale)),
    with the smallest ‖w‖ in the original coordinates, as LinearStats.solve decides it.

    The rank is decided on the scaled equations: on A itself a column of 1e-8 beside one of 1e8
    would look null (its eigenvalue is 1e-32 of the largest) although it is well determined."""
    values, vectors = torch.linalg.eigh(scaled)  # ascending: the dropped directions come first
    top = values[:, -1:].clamp_min(torch.finfo(values.dtype).tiny)
    keep = values > threshold * top
    inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)), 0.0)
    # u = S⁻¹·w solves the scaled equations on the kept directions; then w = S·u.
    u = ((rhs * scale[:, None, :]) @ vectors * inverse[:, None, :]) @ vectors.mT
    weight = u * scale[:, None, :]
    # The dropped directions in w's coordinates are S·V_null. Entries below the resolution of the
    # eigenvectors (threshold·λ_max/λ_kept: an eigenvector moves by the error over the gap) are
    # rounding noise, which a large scale would turn into a tilt of the direction.
    smallest_kept = torch.where(keep, values, top).amin(1, keepdim=True)
    noise = (threshold * top / smallest_kept)[:, :, None]  # (F, 1, 1)
    null = torch.where(~keep[:, None, :] & (vectors.abs() > noise), vectors, 0.0) * scale[:, :, None]
    norms = null.norm(dim=1, keepdim=True)
    null = null / torch.where(norms > 0, norms, torch.ones_like(norms))
    # Project w off their span (the smallest ‖w‖ with the same fit): w − N·N⁺·w.
    weight = weight - (null @ (torch.linalg.pinv(null) @ weight.mT)).mT
    return weight, keep.sum(1)
