"""Least squares and ridge from the R factor (linreg_fused/factor.py), and the
regression summary: coefficients, standard errors, t values, residual standard
deviation, R², adjusted R², degrees of freedom, rank and condition number.

The method, for the design factor F = [[Fxx, Fxt], [0, Ftt]] (the R of [X, T],
centred when an intercept is fitted; ridge appends √α·I below Fxx and refactors):

1. Equilibrate: divide each column of Fxx by its norm (the norm of that design column).
2. Reveal the rank: the SVD of the scaled Fxx (D × D, small). Singular values below
   rcond·σ_max are dropped, rcond = max(D, 1)·ε with ε the unit roundoff of the coarser
   of the data and the accumulation (2⁻⁵³ for float64, 2⁻²⁴ for float32 or 16-bit).
3. Full rank: W = Fxx⁻¹·Fxt by back substitution (the textbook QR least squares).
   Rank r < D: the least-squares solution on the r kept directions with the smallest
   ‖W‖ (the minimum-norm solution numpy.linalg.lstsq gives when the dropped directions
   are exact null directions): w_s = V_r·Σ_r⁻¹·U_rᵀ·Fxt in scaled coordinates, then
   w = S⁻¹·w_s projected off S⁻¹·V_null.
4. Residual sums of squares of any W: ‖Fxx·w − Fxt‖² + ‖Ftt‖² per output: never negative.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .factor import qr_r

EPS = {"fp64": 2.0**-53, "fp32": 2.0**-24}
DIGITS_WARNING = 4.0  # warn when the estimated correct digits of a coefficient fall below this
LIVE = 1e-3  # a coefficient below this fraction of the (scaled) fit is not judged by its relative digits


def check_alpha(alpha: Any) -> float:
    """alpha as a float: any real number (Python, NumPy or 0-d tensor), not a bool, finite, ≥ 0."""
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 0 and not alpha.dtype.is_complex \
            and alpha.dtype != torch.bool:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)) \
            or float(alpha) < 0:
        raise ValueError(f"alpha must be a finite real number >= 0, got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class Design:
    """A least-squares problem in factored form (all fp64, on one device)."""

    f: torch.Tensor  # (D + O, D + O) upper-triangular R of [X, T] (centred X and T when intercept)
    d: int
    n_rows: int
    mean_x: torch.Tensor  # (D,)
    mean_t: torch.Tensor  # (O,)
    intercept: bool


def check_representable(dtype: torch.dtype, *solution: torch.Tensor | None) -> None:
    """Raise OverflowError, before the parameters are written, where a solution (fp64) holds a
    value beyond the largest finite value of the parameters' dtype: stored, it would become
    inf and the loss NaN. One sync where the dtype is narrower than float64."""
    if dtype == torch.float64 or not dtype.is_floating_point:
        return
    values = [s.abs().amax() for s in solution if s is not None and s.numel()]
    if not values:
        return
    largest, limit = float(torch.stack(values).amax()), torch.finfo(dtype).max
    if not largest <= limit:
        raise OverflowError(f"the least-squares solution has a coefficient of magnitude {largest:.3g}, beyond "
                            f"{dtype}'s largest value {limit:.5g}; the parameters are unchanged. Solve in a wider "
                            f"dtype (e.g. model.float()), or rescale the features or targets")


def norms_along(a: torch.Tensor, dim: int) -> torch.Tensor:
    """‖·‖₂ along ``dim`` with no overflow or underflow of the squares (the factor holds data to
    10^±300; squared, a column of norm 1e155 is inf): each line divided by its largest entry first."""
    top = a.abs().amax(dim, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))
    return ((a / top).norm(dim=dim, keepdim=True) * top).squeeze(dim)


def design(r: torch.Tensor, shift: torch.Tensor, n_rows: int, d: int, intercept: bool) -> Design:
    """The design factor from the statistic R of [1, z − shift] (factor.py's layout)."""
    root_n = r[0, 0]
    mean = shift + (r[0, 1:] / root_n if n_rows else torch.zeros_like(shift))
    centred = r[1:, 1:]
    if intercept:
        f = centred
    else:  # uncentred: the Gram gains n·mean·meanᵀ, i.e. the row √n·mean on top of the centred R
        top = r[0, 1:] + root_n * shift
        f = qr_r(torch.cat([top[None], centred]))[: centred.shape[0]]
    return Design(f, d, n_rows, mean[:d], mean[d:], intercept)


SVD_LIMIT = 256  # wider designs first estimate their condition number (triangular solves, no SVD)


@dataclass(frozen=True)
class Solution:
    weight: torch.Tensor  # (O, D)
    bias: torch.Tensor | None  # (O,)
    rank: int  # of the (centred, when intercept) features
    kappa: float  # condition number of the equilibrated (augmented, for ridge) Fxx on the kept directions
    cond: float  # the same over all directions (inf when singular); estimated where no SVD was needed
    rcond: float
    operator: Any  # rhs (D, k) -> the solution for that right-hand side: W = operator(Fxt)ᵀ
    scale: torch.Tensor  # (D,) the column norms of the Fxx solved with
    pinv: torch.Tensor  # (D, r): A⁺ = pinv·(orthonormal)ᵀ for A = Fxx·S⁻¹ on the kept directions


def solve(des: Design, alpha: float, eps: float, rcond: float | None = None) -> Solution:
    d = des.d
    f = des.f
    if alpha > 0:  # ridge: min ‖X·w − t‖² + α‖w‖² is least squares on [X; √α·I], [t; 0]
        o = f.shape[0] - d
        penalty = torch.cat([math.sqrt(alpha) * torch.eye(d, dtype=f.dtype, device=f.device),
                             f.new_zeros(d, o)], 1)
        f = qr_r(torch.cat([f, penalty]))
    fxx, fxt = f[:d, :d], f[:d, d:]
    norms = norms_along(fxx, 0)
    scale = torch.where(norms > 0, norms, torch.ones_like(norms))
    a = fxx / scale
    cut = rcond if rcond is not None else max(d, 1) * eps

    def triangular(rhs):
        return torch.linalg.solve_triangular(fxx, rhs, upper=True)

    if d > SVD_LIMIT:  # a wide design: an SVD costs O(D³) with a large constant; an estimate may do
        estimate = condition_estimate(a)
        if math.isfinite(estimate) and estimate * cut < 1e-3:  # full rank with a margin of 1000
            pinv = torch.linalg.solve_triangular(a, torch.eye(d, dtype=a.dtype, device=a.device), upper=True)
            return _finish(des, triangular, fxt, d, estimate, estimate, cut, scale, pinv)
    u, sv, vh = torch.linalg.svd(a)
    values = sv.tolist()  # the one host sync: D numbers
    rank = sum(v > cut * values[0] for v in values) if values[0] > 0 else 0
    cond = values[0] / values[-1] if values[-1] > 0 else math.inf
    kappa = values[0] / values[rank - 1] if rank else 1.0
    pinv = vh[:rank].t() / sv[:rank]
    if rank == d:
        return _finish(des, triangular, fxt, rank, kappa, cond, cut, scale, pinv)
    # The dropped directions in w's coordinates, S⁻¹·V_null. Entries of V_null below the resolution of
    # the rank decision (cut·κ: a singular subspace moves by the error over the gap) are rounding
    # noise; divided by a tiny column norm they would tilt the direction onto huge coefficients.
    v_null = vh[rank:].t()
    null = torch.where(v_null.abs() > cut * kappa, v_null, 0.0) / scale[:, None]
    basis = torch.linalg.qr(null).Q

    def minimum_norm(rhs):
        w = (pinv @ (u[:, :rank].t() @ rhs)) / scale[:, None]
        return w - basis @ (basis.t() @ w)  # the smallest ‖w‖ with the same fit on the kept directions

    return _finish(des, minimum_norm, fxt, rank, kappa, cond, cut, scale, pinv)


def _finish(des, operator, fxt, rank, kappa, cond, cut, scale, pinv) -> Solution:
    weight = operator(fxt).t().contiguous()
    bias = des.mean_t - weight @ des.mean_x if des.intercept else None
    return Solution(weight, bias, rank, kappa, cond, cut, operator, scale, pinv)


def condition_estimate(a: torch.Tensor, iterations: int = 8) -> float:
    """‖a‖₂·‖a⁻¹‖₂ of an upper-triangular a, each norm from power iterations (products, and
    triangular solves for the inverse) from a fixed start: a lower bound, close after a few steps
    (LAPACK's condition estimators do the same kind of thing). inf when a is singular."""
    d = a.shape[0]
    start = torch.linspace(1.0, 2.0, d, dtype=a.dtype, device=a.device)
    v, w = start / start.norm(), start / start.norm()
    for _ in range(iterations):
        v = a.t() @ (a @ v)
        v = v / v.norm()
        w = torch.linalg.solve_triangular(a.t(), torch.linalg.solve_triangular(a, w[:, None], upper=True),
                                          upper=False)[:, 0]
        w = w / w.norm()
    inverse = torch.linalg.solve_triangular(a, w[:, None], upper=True).norm()
    estimate = float((a @ v).norm() * inverse)  # one host sync
    return estimate if math.isfinite(estimate) else math.inf


def residual_norms(des: Design, weight: torch.Tensor) -> torch.Tensor:
    """(O,) √Σ_rows (x·w_o − t_o)² for the design's (centred) rows: ‖[Fxx·w_o − Fxt_o; Ftt_o]‖."""
    d = des.d
    fit = des.f[:d, :d] @ weight.t() - des.f[:d, d:]
    return norms_along(torch.cat([fit, des.f[d:, d:]]), 0)


def check_accuracy(des: Design, sol: Solution, eps_factor: float, eps_data: float, data_name: str) -> None:
    """The warnings of a solve: a rank below D, and a coefficient with fewer than DIGITS_WARNING
    estimated correct significant digits.

    The estimate, first order in the perturbations: with A the equilibrated design (norm σ₀) and
    A⁺ its pseudo-inverse on the kept directions, the scaled coefficient w_s[j] = (S·w)[j] moves by
    about η·‖A⁺[j]‖, η = P·ε_accumulation·‖w_s‖ + ε·‖g∘w_s‖ + (P·ε_accumulation + ε)·‖t‖ (P: the
    factor's columns) with
    ε = ε_data/√n (the storage's roundings are independent: their effect along a fixed direction
    grows like √n) and g_j the uncentred over the centred norm of column j (storage rounds a value
    relative to itself, the factor relative to the shifted column). The intercept t̄ − w·x̄ moves by
    η·‖A⁺ᵀ·S⁻¹·x̄‖ and by the rounding of the means (which averages out the same way)."""
    d, kind = des.d, "centred features" if des.intercept else "features"
    if sol.rank < d:
        warnings.warn(f"solve: the {kind} have numerical rank {sol.rank} of {d} (columns scaled to unit norm; "
                      f"singular values below {sol.rcond:.1e} of the largest dropped); returning the minimum-norm "
                      f"least-squares solution on the {sol.rank} well-determined directions",
                      RuntimeWarning, stacklevel=4)
    if sol.rank == 0:
        return
    n, scale, pinv = des.n_rows, sol.scale, sol.pinv
    norms = norms_along(des.f[:d, :d], 0)
    one = torch.ones((), dtype=norms.dtype, device=norms.device)
    tiny = torch.finfo(norms.dtype).tiny
    g_x = torch.where(norms > 0, torch.hypot(norms, math.sqrt(n) * des.mean_x) / scale, one)  # (D,)
    # The data's storage rounding: independent errors, so their effect on a coefficient (A⁺[j]·δA·w, a
    # fixed direction of the row space against n roundings) grows like √n, not n as Cauchy-Schwarz
    # would have it: ε_data/√n. (The worst case warned on ordinary float32 data ~1-3 digits too early.)
    eps_store, eps_data = eps_data, eps_data / math.sqrt(max(n, 1))
    # The factor's own rounding grows with its columns (Householder QR's backward error is
    # O(P·ε) per column): with ε_accumulation alone the estimate ran up to 1.6 digits optimistic
    # on polynomial designs against 60-digit references (3.6 correct digits, no warning).
    eps_factor = eps_factor * des.f.shape[1]
    eps_t = eps_factor + eps_data
    t_norm = norms_along(des.f[:, d:], 0)
    if des.intercept:
        t_norm = torch.hypot(t_norm, math.sqrt(n) * des.mean_t)
    w_s = sol.weight * scale  # (O, D)
    # (O,) the size of δA·w_s + δt: column j of A moves by ε_accumulation + ε_data·g_j (A's columns have unit norm)
    eta = eps_factor * norms_along(w_s, 1) + eps_data * norms_along(w_s * g_x, 1) + eps_t * t_norm
    # Only coefficients that carry at least LIVE of the (scaled) fit: a noise-level coefficient beside
    # the ones that matter has few relative digits by nature, and warning about it helps no one.
    live = w_s.abs() > LIVE * norms_along(w_s, 1)[:, None]
    err = torch.where(live, (eta[:, None] * pinv.norm(dim=1)) / w_s.abs().clamp_min(tiny), 0.0)
    if des.intercept:  # x̄ᵀ·w = (S⁻¹·x̄)ᵀ·w_s: the errors of w_s along A⁺'s rows partly cancel in it
        terms = des.mean_t.abs() + sol.weight.abs() @ des.mean_x.abs()
        through_w = eta * (pinv.t() @ (des.mean_x / scale)).norm() + (eps_factor + eps_data) * terms
        err_b = torch.where(sol.bias.abs() > sol.rcond * terms, through_w / sol.bias.abs().clamp_min(tiny), 0.0)
        err = torch.cat([err, err_b[:, None]], 1)  # column D: the intercept
    flat = err.reshape(-1)
    worst = flat.argmax()
    worst, worst_err = torch.stack([worst.to(flat.dtype), flat[worst]]).tolist()  # the one sync
    worst, kappa = int(worst), sol.kappa
    digits = -math.log10(worst_err) if worst_err > 0 else 16.0
    available = -math.log10(max(eps_store, 2.0**-53))  # what the data's own precision can carry: 7 for float32
    if digits < DIGITS_WARNING:
        o, j = divmod(worst, err.shape[1])
        which = "the intercept" if j == d else f"the coefficient of feature {j}"
        warnings.warn(f"solve: condition number {kappa:.1e} of the {kind} (columns scaled to unit norm): {which} "
                      f"(output {o}) may have only ~{max(digits, 0):.0f} correct significant digits with {data_name} "
                      f"(~{max(available - digits, 0):.0f} of the data's ~{available:.0f} at risk)", RuntimeWarning,
                      stacklevel=4)


@dataclass(frozen=True)
class RegressionSummary:
    """statsmodels-style OLS (or ridge) results of one solve: (O, D) coefficients per output."""

    coef: torch.Tensor  # (O, D) float64
    intercept: torch.Tensor | None  # (O,)
    std_err: torch.Tensor  # (O, D)
    intercept_std_err: torch.Tensor | None  # (O,)
    t_values: torch.Tensor  # (O, D)
    intercept_t: torch.Tensor | None  # (O,)
    residual_std: torch.Tensor  # (O,)
    r2: torch.Tensor  # (O,): centred with an intercept, uncentred without (as NIST defines it)
    adj_r2: torch.Tensor  # (O,)
    df_model: int
    df_resid: int
    rank: int  # of the design, the intercept column included (statsmodels' rank)
    n_rows: int
    condition_number: float  # of the design (centred with an intercept) with unit-norm columns

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (lists, floats, ints, None): JSON-able; non-finite floats become None."""
        def plain(v):
            if isinstance(v, torch.Tensor):
                return plain(v.detach().cpu().tolist())
            if isinstance(v, list):
                return [plain(x) for x in v]
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v

        return {name: plain(getattr(self, name)) for name in self.__dataclass_fields__}


def summarise(des: Design, sol: Solution, alpha: float) -> RegressionSummary:
    d, n = des.d, des.n_rows
    k_const = 1 if des.intercept else 0
    rank_total = sol.rank + k_const
    df_resid = n - rank_total
    resid = residual_norms(des, sol.weight)
    total = norms_along(des.f[:, d:], 0)  # √Σ (t − t̄)² with an intercept, √Σ t² without
    sigma = resid / math.sqrt(df_resid) if df_resid > 0 else torch.full_like(resid, float("nan"))
    # Var(w_o) = σ_o²·L·Lᵀ, L the linear map from the right-hand side (whose noise is σ²·I) to w.
    eye = torch.eye(d, dtype=des.f.dtype, device=des.f.device)
    lmap = _coefficient_map(des, sol, alpha, eye)
    std_err = sigma[:, None] * norms_along(lmap, 1)[None, :]  # √diag(L·Lᵀ)
    coef = sol.weight
    intercept = sol.bias
    intercept_std_err = intercept_t = None
    if des.intercept:  # b = t̄ − w·x̄, with t̄ and w uncorrelated: Var(b) = σ²/n + x̄ᵀ·Var(w)·x̄
        intercept_std_err = sigma * torch.sqrt(1.0 / n + (lmap.t() @ des.mean_x).square().sum())
        intercept_t = intercept / intercept_std_err
    r2 = 1.0 - (resid / total).square()
    adj_r2 = 1.0 - (1.0 - r2) * (n - k_const) / df_resid if df_resid > 0 else torch.full_like(r2, float("nan"))
    return RegressionSummary(coef, intercept, std_err, intercept_std_err, coef / std_err, intercept_t, sigma, r2,
                             adj_r2, sol.rank, df_resid, rank_total, n, sol.cond)


def _coefficient_map(des: Design, sol: Solution, alpha: float, eye: torch.Tensor) -> torch.Tensor:
    """L (D × D) with w = L·(Q_xᵀ·t): the least-squares right-hand side Fxt maps to w through
    operator (OLS), or through operator ∘ (F_aug⁻ᵀ·Fxxᵀ) for ridge, whose own right-hand side is
    F_aug⁻ᵀ·Fxxᵀ·Fxt."""
    if alpha == 0:
        return sol.operator(eye)
    d = des.d
    fxx = des.f[:d, :d]
    aug = qr_r(torch.cat([fxx, math.sqrt(alpha) * eye]))
    return sol.operator(torch.linalg.solve_triangular(aug.t(), fxx.t(), upper=False))
