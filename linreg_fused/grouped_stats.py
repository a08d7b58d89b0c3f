"""Sufficient statistics of many least-squares problems at once: one per group of rows.

    stats = LinearStats.from_tensors(x, t, groups=g, n_groups=G)   # a GroupedLinearStats
    weight, bias = stats.solve()          # (G, O, D), (G, O); see GroupedSolution
    stats.solve().status                  # per group: OK, RANK_DEFICIENT, EMPTY, NONFINITE

Each group holds what linreg_fused.stats.LinearStats holds for one data set (count,
means, centred co-moments), in fp64, with a leading group dimension; the moments are
formed by one pass over the rows in any order (linreg_fused.grouped_ops), merged with
Chan's update per group, and solved per group.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch

from . import distributed
from .backend import BACKENDS
from .functional import REDUCTIONS
from .grouped_ops import GroupedMoments, empty_moments, grouped_moments, merge_grouped, residual_sums
from .grouped_solve import DIGITS_WARNING, EMPTY, NONFINITE, OK, RANK_DEFICIENT, solve_groups
from .solver import check_alpha

__all__ = ["EMPTY", "NONFINITE", "OK", "RANK_DEFICIENT", "GroupedLinearStats", "GroupedSolution"]
STATUS_NAMES = ("ok", "rank_deficient", "empty", "nonfinite")
_EPS = 2.0**-52  # relative accuracy of the fp64 moments' entries, for the rank threshold
_KEYS = ("n_rows", "mean_x", "mean_t", "m_xx", "m_tx", "m_tt")


class GroupedSolution(tuple):
    """``(weight (G, O, D), bias (G, O) or None)``, fp64, with per-group diagnostics:

    - ``status`` (G,) int8: OK (0), RANK_DEFICIENT (1: the minimum-norm solution, the
      weights' norm minimised with the intercept unpenalised, as lstsq on the group's centred
      rows), EMPTY (2: no rows; weight and bias NaN) or NONFINITE (3: the group's data hold
      NaN or inf, or values whose squares overflow float64, beyond ~1e154 from the group's first
      row; weight and bias NaN);
    - ``rank`` (G,) int64: the numerical rank of each group's (ridge) normal equations.
    """

    status: torch.Tensor
    rank: torch.Tensor

    def __new__(cls, weight, bias, status, rank):
        obj = super().__new__(cls, (weight, bias))
        obj.status, obj.rank = status, rank
        return obj

    @property
    def weight(self) -> torch.Tensor:
        return self[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1]

    def groups_with(self, status: int) -> torch.Tensor:
        """The ids of the groups with this status (1-D int64; a host sync)."""
        return torch.nonzero(self.status == status).flatten()


class GroupedLinearStats:
    """Count, means and centred co-moments of the (x, t) rows of each of ``n_groups`` groups,
    fp64, on one device. Build with ``LinearStats.from_tensors(x, t, groups=g, n_groups=G)``
    or ``GroupedLinearStats(G, D, O)`` and ``update``; combine with ``merge``, across
    torch.distributed ranks with ``all_reduce_``.

    Accuracy: each group's moments are those of linreg_fused.grouped_ops (fp64 sums of rows
    shifted by one of the group's rows: each entry within ~n·2⁻⁵² of Σ|z_i − s||z_j − s|).
    The solve forms each group's normal equations, so a group's coefficients are within
    about cond(X_g centred)²·2⁻⁵² (relative) of the exact least-squares solution.
    """

    group_keys: Any = None  # what each group stands for, where a DataFrame's key column made them (linreg_fused.dask)

    def __init__(self, n_groups: int, in_features: int, out_features: int, *,
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        n_groups, in_features, out_features = (positive_int(name, v) for name, v in (
            ("n_groups", n_groups), ("in_features", in_features), ("out_features", out_features)))
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._moments: GroupedMoments = empty_moments(n_groups, in_features, out_features, device)
        self.backend = backend
        self.precision = "fp64"

    # ------------------------------------------------------------ building
    @classmethod
    def from_tensors(cls, x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor, n_groups: int, *,
                     precision: str | None = None, backend: str = "auto") -> "GroupedLinearStats":
        """The statistics of rows x (..., D), t (..., O) with group ids ``groups`` (...,) int64 in
        [0, n_groups), in any order. One pass; one host sync (the ids' range check)."""
        if precision not in (None, "fp64"):
            raise ValueError(f"grouped statistics accumulate in fp64; precision={precision!r} is not offered")
        x2, t2 = _check_rows(x, t)
        stats = cls(n_groups, x2.shape[1], t2.shape[1], device=x2.device, backend=backend)
        return stats._add(x2, t2, _check_groups(groups, x, n_groups))

    def update(self, x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor) -> "GroupedLinearStats":
        """Add the rows x (..., D), t (..., O) of groups ``groups`` (moved to this device); returns self."""
        x2, t2 = _check_rows(x, t)
        if (x2.shape[1], t2.shape[1]) != (self.in_features, self.out_features):
            raise ValueError(f"the chunk has {x2.shape[1]} features and {t2.shape[1]} targets; these statistics "
                             f"have {self.in_features} and {self.out_features}")
        g = _check_groups(groups, x, self.n_groups)
        return self._add(x2.to(self.device), t2.to(self.device), g.to(self.device))

    def _add(self, x, t, groups) -> "GroupedLinearStats":
        chunk = grouped_moments(x, t, groups, self.n_groups, self.backend)
        self._moments = merge_grouped(self._moments, chunk)
        return self

    def merge(self, other: "GroupedLinearStats") -> "GroupedLinearStats":
        """Add the rows that ``other`` summarises, group by group; returns self."""
        if not isinstance(other, GroupedLinearStats):
            raise TypeError(f"merge takes GroupedLinearStats, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"cannot merge statistics of {other.shape} (groups, in, out) into {self.shape}")
        if not _same_keys(self.group_keys, other.group_keys):  # group i would add rows of two different keys
            raise ValueError(f"cannot merge statistics of other groups: group_keys {_shown(other.group_keys)} "
                             f"into {_shown(self.group_keys)}")
        if self.group_keys is None:
            self.group_keys = other.group_keys
        self._moments = merge_grouped(self._moments, tuple(v.to(self.device) for v in other._moments))
        return self

    def all_reduce_(self, process_group: Any = None) -> "GroupedLinearStats":
        """Make these the statistics of every rank's rows, on every rank: one all-gather of each
        rank's flat statistics over ``process_group`` (see linreg_fused.distributed.resolve_group),
        merged in rank order, so every rank holds the same bits. Every rank must hold statistics of
        the same shape (else every rank raises ValueError, before the gather: one sync). Returns self."""
        import torch.distributed as dist

        group = distributed.resolve_group(process_group)
        if group is None:
            return self
        distributed.check_same_on_every_rank(dict(zip(("n_groups", "in_features", "out_features"), self.shape)),
                                             group, self.device)
        n, *tensors = self._moments
        flat = torch.cat([n.to(torch.float64), *(v.reshape(-1) for v in tensors)])  # counts < 2⁵³: exact
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, flat, group=group)
        merged = None
        for row in gathered:
            counts, *values = row.split([n.numel(), *(v.numel() for v in tensors)])
            rank = (counts.to(torch.int64), *(v.view_as(t) for v, t in zip(values, tensors)))
            merged = rank if merged is None else merge_grouped(merged, rank)
        self._moments = merged
        return self

    # ------------------------------------------------------------ what they hold
    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_groups, in_features, out_features)."""
        return self.n_groups, self.in_features, self.out_features

    @property
    def n_groups(self) -> int:
        return self._moments[0].shape[0]

    @property
    def in_features(self) -> int:
        return self._moments[1].shape[1]

    @property
    def out_features(self) -> int:
        return self._moments[2].shape[1]

    @property
    def device(self) -> torch.device:
        return self._moments[1].device

    n_rows = property(lambda self: self._moments[0], doc="(G,) int64: rows per group")
    mean_x = property(lambda self: self._moments[1], doc="(G, D)")
    mean_t = property(lambda self: self._moments[2], doc="(G, O)")
    m_xx = property(lambda self: self._moments[3], doc="(G, D, D): Σ (x − x̄)(x − x̄)ᵀ per group")
    m_tx = property(lambda self: self._moments[4], doc="(G, O, D): Σ (t − t̄)(x − x̄)ᵀ per group")
    m_tt = property(lambda self: self._moments[5], doc="(G, O, O): Σ (t − t̄)(t − t̄)ᵀ per group")

    def to(self, device: torch.device | str) -> "GroupedLinearStats":
        """A copy on ``device``."""
        out = GroupedLinearStats(*self.shape, device=device, backend=self.backend)
        out._moments = tuple(v.to(out.device) for v in self._moments)
        out.group_keys = self.group_keys
        return out

    def __repr__(self) -> str:
        return (f"GroupedLinearStats(n_groups={self.n_groups}, in_features={self.in_features}, "
                f"out_features={self.out_features}, device={self.device})")

    # ------------------------------------------------------------ loss and gradients
    def loss(self, weight: torch.Tensor, bias: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Each group's F.mse_loss(x·W_gᵀ + b_g, t, reduction) over its rows: (G,) fp64 (NaN for
        an empty group with reduction "mean"). weight (G, O, D), bias (G, O) or None. No sync."""
        return self._sums(weight, bias, reduction, need_grads=False)[0]

    def grads(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
              reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dL_g/dW_g (G, O, D), dL_g/db_g (G, O) or None) of each group's ``loss``, fp64."""
        return self._sums(weight, bias, reduction, need_grads=True)[1]

    def _sums(self, weight, bias, reduction, need_grads):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        w, b = self._parameters(weight, bias)
        sse, rx, r = residual_sums(self._moments, w, b)
        scale = 1.0 / (self.n_rows.to(torch.float64) * self.out_features) if reduction == "mean" else \
            torch.ones(self.n_groups, dtype=torch.float64, device=self.device)
        grads = None
        if need_grads:
            grads = (2.0 * scale[:, None, None] * rx, 2.0 * scale[:, None] * r if bias is not None else None)
        return sse.sum(1) * scale, grads

    def _parameters(self, weight, bias):
        g, d, o = self.shape
        if not isinstance(weight, torch.Tensor) or weight.shape != (g, o, d):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must have shape ({g}, {o}, {d}), got {shape}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (g, o)):
            raise ValueError(f"bias must have shape ({g}, {o}) or be None")
        w = weight.detach().to(self.device, torch.float64)
        b = bias.detach().to(self.device, torch.float64) if bias is not None else torch.zeros_like(self.mean_t)
        return w, b

    # ------------------------------------------------------------ exact solutions
    def solve(self, alpha: float = 0.0, fit_intercept: bool = True) -> GroupedSolution:
        """Each group's least-squares (alpha = 0) or ridge solution, as LinearStats.solve on that
        group's rows: a GroupedSolution (weight (G, O, D), bias (G, O) or None, fp64, with
        ``status`` and ``rank`` per group). Never raises for a group: an empty group or one whose
        data are not finite gets NaN and its status; a rank-deficient one (e.g. a single row) the
        minimum-norm solution, with a RuntimeWarning naming the groups.

        Method: per group, Cholesky of the normal equations scaled to a unit diagonal (batched),
        with the smallest eigenvalue bounded by inverse iteration; groups below the rank
        threshold (D·2⁻⁵²) take an eigendecomposition instead (eigenvalues below the threshold
        relative to the largest dropped, like numpy.linalg.lstsq). Host syncs: three (which groups
        need the eigendecomposition; the two warnings). A full-rank group whose coefficients may
        have fewer than 4 correct digits is named in a RuntimeWarning: the normal equations these
        moments give square its condition number, where LinearStats' QR factor would not.
        """
        alpha = check_alpha(alpha)  # any real number >= 0 (NumPy's, a 0-d tensor), not a bool
        weight, bias, status, rank, error = solve_groups(self._moments, alpha, fit_intercept,
                                                         threshold=self.in_features * _EPS)
        _warn_about(status, rank, self.in_features)
        _warn_about_digits(error)
        return GroupedSolution(weight, bias, status, rank)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (``torch.save`` or safetensors); ``load_state_dict`` restores them."""
        return {**dict(zip(_KEYS, self._moments)), "precision": self.precision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace these statistics with ``state`` (from ``state_dict``), on this device; the shapes
        must match this object's."""
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise KeyError(f"state_dict is missing {missing}")
        g, d, o = self.shape
        shapes = dict(zip(_KEYS, ((g,), (g, d), (g, o), (g, d, d), (g, o, d), (g, o, o))))
        for key, shape in shapes.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"state_dict[{key!r}] has shape {got}, expected {shape}")
        n = state["n_rows"]
        if n.dtype != torch.int64 or bool((n < 0).any()):
            raise ValueError("state_dict['n_rows'] must be an int64 tensor of counts >= 0")
        self._moments = (n.to(self.device).clone(),
                         *(state[k].detach().to(self.device, torch.float64).clone() for k in _KEYS[1:]))


def positive_int(name: str, v: Any) -> int:
    """``v`` as a Python int >= 1: any integer (NumPy's too, as len() of an array or a search grid
    gives them), not a bool."""
    if not isinstance(v, numbers.Integral) or isinstance(v, (bool, np.bool_)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_rows(x: Any, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, t) as 2-D (N, D), (N, O) views, checked (as linreg_fused.stats checks them; not imported
    from there, which dispatches here)."""
    for name, v in (("x", x), ("t", t)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 1:
            raise TypeError(f"{name} must be a floating-point torch.Tensor of at least one dimension")
    if x.dtype != t.dtype or x.device != t.device:
        raise TypeError(f"x ({x.dtype} on {x.device}) and t ({t.dtype} on {t.device}) must match in dtype and device")
    if x.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"x has shape {tuple(x.shape)} and t {tuple(t.shape)}: their leading dimensions differ")
    if x.numel() == 0 or t.numel() == 0:  # before reshape(-1, 0), which cannot infer the rows
        raise ValueError(f"empty data: x has shape {tuple(x.shape)}, t {tuple(t.shape)}")
    return x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])


def _check_groups(groups: Any, x: torch.Tensor, n_groups: Any) -> torch.Tensor:
    """``groups`` as a flat int64 tensor of ids in [0, n_groups), one per row of x; names the problem
    otherwise (one host sync: the range)."""
    n_groups = positive_int("n_groups", n_groups)
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor of int64 group ids, got {type(groups).__name__}")
    if groups.dtype != torch.int64:
        raise TypeError(f"groups must hold int64 group ids, got {groups.dtype}")
    if tuple(groups.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"groups has shape {tuple(groups.shape)} but x has {tuple(x.shape)}: one id per row")
    if groups.device != x.device:
        raise ValueError(f"groups is on {groups.device} but x is on {x.device}; move them to one device")
    g = groups.reshape(-1)
    if g.numel() == 0:  # no rows (a forward of an empty batch): nothing to range-check, and aminmax refuses
        return g
    low, high = torch.stack(torch.aminmax(g)).tolist()  # one read of the device
    if low < 0 or high >= n_groups:
        raise ValueError(f"group ids must lie in [0, {n_groups}); got ids from {low} to {high}")
    return g


def _same_keys(a: Any, b: Any) -> bool:
    """Whether two group_keys name the same groups in the same order (None: unnamed, matches any)."""
    return a is None or b is None or (len(a) == len(b) and all(bool(u == v) for u, v in zip(a, b)))


def _shown(keys: Any) -> str:
    return "None" if keys is None else f"{list(keys[:5])}{' …' if len(keys) > 5 else ''}"


def _warn_about_digits(error: torch.Tensor) -> None:
    """One line naming the full-rank groups whose coefficients may have fewer than DIGITS_WARNING
    correct digits: the grouped statistics are moments, whose normal equations square the
    condition number (one host sync)."""
    worst = float(error.max()) if error.numel() else 0.0
    if worst <= 10.0 ** -DIGITS_WARNING:
        return
    ill = torch.nonzero(error > 10.0 ** -DIGITS_WARNING).flatten()
    shown = ill[torch.argsort(error[ill], descending=True)][:8].tolist()
    more = f" and {ill.numel() - len(shown)} more" if ill.numel() > len(shown) else ""
    digits = max(-math.log10(worst), 0.0)
    warnings.warn(f"solve: {ill.numel()} group(s) have ill-conditioned features: {shown}{more}; from the "
                  f"normal equations these statistics hold, their coefficients may have only ~{digits:.0f} "
                  f"correct significant digits (the worst); a QR factor of such a group's rows (LinearStats) "
                  f"loses about half as many digits to the condition number", RuntimeWarning, stacklevel=3)


def _warn_about(status: torch.Tensor, rank: torch.Tensor, d: int) -> None:
    bad = torch.nonzero((status == RANK_DEFICIENT) | (status == NONFINITE)).flatten()
    if bad.numel() == 0:
        return
    shown = bad[:8].tolist()
    more = f" and {bad.numel() - len(shown)} more" if bad.numel() > len(shown) else ""
    kinds = ", ".join(f"{i} ({STATUS_NAMES[int(status[i])]}, rank {int(rank[i])} of {d})" for i in shown)
    warnings.warn(f"solve: {bad.numel()} group(s) are rank-deficient or not finite: {kinds}{more}; rank-deficient "
                  f"groups get the minimum-norm solution, non-finite ones NaN (see GroupedSolution.status)",
                  RuntimeWarning, stacklevel=3)
