"""One-pass statistics of a linear least-squares problem: the MSE loss and its
gradients for any weights, the exact least-squares or ridge solution and its
regression summary, all without reading X again.

The statistic is the R factor of the shifted, augmented rows z = [1, x − s, t − s_t]
(linreg_fused/factor.py): RᵀR = ZᵀZ, so it holds what the normal equations hold, but
solving from R loses digits in proportion to the data's condition number, not its
square (linreg_fused/solver.py; docs/solver.md). The residual r = W·x + b − t of every
row is Z·c for c = [b + W·s − s_t, W, −I]ᵀ, so

    Σ_rows r_o² = ‖R·c_o‖²  (never negative)     Σ_rows r·zᵀ = Rᵀ·R·c.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import torch

from . import distributed, factor, solver
from .backend import BACKENDS
from .chunks import check_rows, row_chunks, staged  # noqa: F401  (row_chunks: the public name lives here too)
from .functional import REDUCTIONS, loss_scale

PRECISIONS = ("fp64", "fp32")
_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_DTYPE_NAMES = {2.0**-53: "float64", 2.0**-24: "float32", 2.0**-11: "float16", 2.0**-8: "bfloat16"}


class LinearStats:
    """The R factor of [1, x − s, t − s_t] over every row seen (fp64, on one device), and the count.

    Build with ``LinearStats.from_tensors(x, t)`` (one pass: kernels/linear_qr.py on the Triton
    backend where 1 + D + O ≤ 64, blocked Householder QR in PyTorch otherwise),
    ``LinearStats.from_batches(chunks)`` (out of core), or ``LinearStats(D, O)`` (empty) and
    ``update(x, t)``. ``merge`` and ``all_reduce_`` add the rows other statistics hold (a QR of the
    two stacked factors, in a fixed order: the same bits on every rank and every run).

    precision: how each chunk is factored.

    - "fp64" (the default, for every input dtype): fp64 arithmetic. The factor is backward stable:
      it is the exact R of data within about 1e-15 (relative, per column) of the given values.
    - "fp32": the chunk's Householder steps in fp32 (then merged in fp64), for GPUs without fast
      fp64. The factor is exact for data within ~1e-7 of the given values: solve() then decides the
      rank at float32's resolution and warns when the digits it can promise fall below 4.

    The shift s is the mean of the first chunk's leading rows, so data far from 0 cost nothing.
    """

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None,
                 precision: str = "fp64", backend: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:  # NumPy's too
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        p = 1 + in_features + out_features
        self._d, self._o = int(in_features), int(out_features)
        self._n = 0
        self._shift = torch.zeros(p - 1, dtype=torch.float64, device=device)
        self._r = torch.zeros((p, p), dtype=torch.float64, device=device)
        self._data_eps = _UNIT_ROUNDOFF[torch.float64]  # the coarsest input seen: for solve's warnings
        self.precision, self.backend = precision, backend

    # ------------------------------------------------------------ building
    @classmethod
    def from_tensors(cls, x: torch.Tensor, t: torch.Tensor, *, precision: str | None = None,
                     backend: str = "auto", groups: torch.Tensor | None = None,
                     n_groups: int | None = None) -> "LinearStats":
        """The statistics of rows x (..., D), t (..., O): one pass, no host sync.

        precision: "fp64" (default, also None) | "fp32"; see the class.
        groups, n_groups: int64 group ids (...,) in [0, n_groups): one set of statistics per
        group, a linreg_fused.grouped_stats.GroupedLinearStats.
        """
        if groups is not None or n_groups is not None:
            from .grouped_stats import GroupedLinearStats
            return GroupedLinearStats.from_tensors(x, t, groups, n_groups, precision=precision, backend=backend)
        x2, t2 = check_rows(x, t)
        stats = cls(x2.shape[1], t2.shape[1], device=x2.device, precision=precision or "fp64", backend=backend)
        return stats._add(x2, t2)

    def update(self, x: torch.Tensor, t: torch.Tensor) -> "LinearStats":
        """Add the rows x (..., D), t (..., O) (moved to this device; none: nothing); returns self."""
        x2, t2 = check_rows(x, t, allow_no_rows=True)
        if (x2.shape[1], t2.shape[1]) != (self.in_features, self.out_features):
            raise ValueError(f"the chunk has {x2.shape[1]} features and {t2.shape[1]} targets; these statistics "
                             f"have {self.in_features} and {self.out_features}")
        if x2.shape[0] == 0:
            return self
        return self._add(x2.to(self.device), t2.to(self.device))

    def _add(self, x: torch.Tensor, t: torch.Tensor) -> "LinearStats":
        x, t = x.detach(), t.detach()  # a summary of data: no autograd graph kept across the stream
        fp64 = self.precision == "fp64"
        acc = torch.float64 if fp64 else torch.float32
        if self._n == 0:
            self._shift = factor.leading_shift(x, t, acc)
        # The pass subtracts the shift in the accumulator's dtype: exactly ``used``.
        used = self._shift if fp64 else self._shift.to(acc).to(torch.float64)
        r = factor.chunk_factor(x, t, used, fp64=fp64, backend=self.backend)
        if not fp64 and not torch.equal(used, self._shift):  # a shift merged in from fp64 statistics
            r = factor.reshift(r, used, self._shift)
        self._r = r if self._n == 0 else factor.stack(self._r, r)
        self._n += x.shape[0]
        self._data_eps = max(self._data_eps, _UNIT_ROUNDOFF[x.dtype])
        return self

    def merge(self, other: "LinearStats") -> "LinearStats":
        """Add the rows that ``other`` summarises (a QR of the two stacked factors); returns self."""
        if not isinstance(other, LinearStats):
            raise TypeError(f"merge takes LinearStats, got {type(other).__name__}")
        if (other.in_features, other.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"cannot merge statistics of {other.in_features}→{other.out_features} into "
                             f"{self.in_features}→{self.out_features}")
        self._merge_state(other._n, other._shift.to(self.device), other._r.to(self.device), other._data_eps,
                          other.precision)
        return self

    def _merge_state(self, n: int, shift: torch.Tensor, r: torch.Tensor, data_eps: float, precision: str) -> None:
        if n == 0:
            return
        if self._n == 0:
            self._shift, self._r = shift.clone(), r.clone()
        else:
            self._r = factor.stack(self._r, factor.reshift(r, shift, self._shift))
        self._n += n
        self._data_eps = max(self._data_eps, data_eps)
        if precision == "fp32":  # the merged factor is no more accurate than its coarsest part
            self.precision = "fp32"

    def all_reduce_(self, process_group: Any = None) -> "LinearStats":
        """Make these the statistics of every rank's rows, on every rank: one all-gather of the
        (D+O+1)²-sized factors over ``process_group`` (default: the world group when
        torch.distributed is initialised; False: nothing), merged in rank order, so every rank
        holds the same bits. Every rank must hold statistics of the same shape (else every rank
        raises ValueError, before the gather). Reads the counts back: two syncs. Returns self."""
        group = distributed.resolve_group(process_group)
        if group is None:
            return self
        import torch.distributed as dist

        distributed.check_same_on_every_rank(dict(in_features=self.in_features, out_features=self.out_features),
                                             group, self.device)

        head = torch.tensor([float(self._n), self._data_eps, float(self.precision == "fp32")], dtype=torch.float64,
                            device=self.device)
        flat = torch.cat([head, self._shift, self._r.reshape(-1)])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, flat, group=group)
        p = self._r.shape[0]
        self._n, self._data_eps, self.precision = 0, _UNIT_ROUNDOFF[torch.float64], "fp64"
        for row in gathered:
            n, data_eps, fp32 = row[:3].tolist()
            shift, r = row[3 : 3 + p - 1], row[3 + p - 1 :].view(p, p)
            self._merge_state(int(n), shift, r, data_eps, "fp32" if fp32 else self.precision)
        return self

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[Any, Any]], *, device: torch.device | str | None = None,
                     precision: str | None = None, backend: str = "auto") -> "LinearStats":
        """The statistics of a stream of (x, t) chunks: tensors on any device, NumPy arrays, or
        slices of ``np.load(path, mmap_mode="r")`` arrays (see ``row_chunks``). Memory: a few
        chunks, never the whole data set. Chunks of no rows add nothing.

        device: where the statistics are computed (default: the first chunk's, CPU for NumPy).
        On CUDA, host chunks are copied into two pinned buffers and uploaded on a side stream,
        so chunk k+1 is read and copied while the kernel reduces chunk k.
        """
        stats = None
        dev = torch.device(device) if device is not None else None
        for x, t in staged(batches, dev):
            if stats is None:
                x2, t2 = check_rows(x, t, allow_no_rows=True)
                stats = cls(x2.shape[1], t2.shape[1], device=x2.device, backend=backend, precision=precision or "fp64")
            stats.update(x, t)
        if stats is None or stats.n_rows == 0:
            raise ValueError(f"from_batches: the iterable yielded {'no chunks' if stats is None else 'no rows'}")
        return stats

    @classmethod
    def from_arrays(cls, x: Any, t: Any, *, chunk_rows: int = 1 << 18, **kwargs) -> "LinearStats":
        """``from_batches(row_chunks(x, t, chunk_rows), **kwargs)``: arrays or memory-mapped files
        larger than memory, read ``chunk_rows`` rows at a time."""
        return cls.from_batches(row_chunks(x, t, chunk_rows), **kwargs)

    # ------------------------------------------------------------ what they hold
    @property
    def n_rows(self) -> int:
        return self._n

    @property
    def in_features(self) -> int:
        return self._d

    @property
    def out_features(self) -> int:
        return self._o

    @property
    def device(self) -> torch.device:
        return self._r.device

    @property
    def factor(self) -> torch.Tensor:
        """R ((1+D+O) × (1+D+O), upper-triangular, diagonal ≥ 0) of [1, x − shift, t − shift_t]."""
        return self._r

    @property
    def shift(self) -> torch.Tensor:
        """(D + O,) the shift of the factor's columns (the mean of the first chunk's leading rows)."""
        return self._shift

    def _means(self) -> torch.Tensor:
        if self._n == 0:
            return torch.zeros_like(self._shift)
        return self._shift + self._r[0, 1:] / self._r[0, 0]

    def _centred_gram(self) -> torch.Tensor:
        rc = self._r[1:, 1:]
        return rc.t() @ rc

    @property
    def mean_x(self) -> torch.Tensor:
        return self._means()[: self.in_features]

    @property
    def mean_t(self) -> torch.Tensor:
        return self._means()[self.in_features :]

    @property
    def m_xx(self) -> torch.Tensor:
        """Σ (x − x̄)(x − x̄)ᵀ (D × D), from the factor (the Gram, for code that needs one)."""
        d = self.in_features
        return self._centred_gram()[:d, :d]

    @property
    def m_tx(self) -> torch.Tensor:
        """Σ (t − t̄)(x − x̄)ᵀ (O × D)."""
        d = self.in_features
        return self._centred_gram()[d:, :d].contiguous()

    @property
    def m_tt(self) -> torch.Tensor:
        """Σ (t − t̄)(t − t̄)ᵀ (O × O)."""
        d = self.in_features
        return self._centred_gram()[d:, d:].contiguous()

    def to(self, device: torch.device | str) -> "LinearStats":
        """A copy on ``device``."""
        out = LinearStats(self.in_features, self.out_features, device=device, precision=self.precision,
                          backend=self.backend)
        out._n, out._data_eps = self._n, self._data_eps
        out._shift, out._r = self._shift.to(out.device, copy=True), self._r.to(out.device, copy=True)
        return out

    def __repr__(self) -> str:
        return (f"LinearStats(n_rows={self.n_rows}, in_features={self.in_features}, "
                f"out_features={self.out_features}, precision={self.precision!r}, device={self.device})")

    # ------------------------------------------------------------ loss and gradients
    def loss(self, weight: torch.Tensor, bias: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """F.mse_loss(x·Wᵀ + b, t, reduction) over every row, from the factor: 0-d fp64, ≥ 0.

        weight (O, D), bias (O,) or None. O·P² work, no read of the data, no sync.
        """
        sse, _ = self._residual_sums(weight, bias, reduction, need_grads=False)
        return sse

    def grads(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
              reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dL/dW (O, D), dL/db (O,) or None) of ``loss(weight, bias, reduction)``, fp64."""
        _, grads = self._residual_sums(weight, bias, reduction, need_grads=True)
        return grads

    def _residual_sums(self, weight, bias, reduction, need_grads):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self._require_rows()
        w, b = self._parameters(weight, bias)
        d, o = self.in_features, self.out_features
        # c (P × O): the residual of output j over all rows is Z·c[:, j].
        s_x, s_t = self._shift[:d], self._shift[d:]
        c = torch.cat([(b + w @ s_x - s_t)[None, :], w.t(),
                       -torch.eye(o, dtype=torch.float64, device=self.device)])
        rc = self._r @ c
        scale = loss_scale(reduction, self._n, o)
        sse = rc.square().sum() * scale
        grads = None
        if need_grads:
            zr = self._r.t() @ rc  # Σ_rows z·r_jᵀ (P × O)
            sum_r = zr[0]
            grad_w = 2.0 * scale * (zr[1 : 1 + d].t() + torch.outer(sum_r, s_x))  # Σ r·xᵀ = Σ r·(x − s)ᵀ + Σ r·sᵀ
            grads = (grad_w, 2.0 * scale * sum_r if bias is not None else None)
        return sse, grads

    def _parameters(self, weight, bias):
        if not isinstance(weight, torch.Tensor) or weight.shape != (self.out_features, self.in_features):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must have shape ({self.out_features}, {self.in_features}), got {shape}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,)):
            raise ValueError(f"bias must have shape ({self.out_features},) or be None")
        w = weight.detach().to(self.device, torch.float64)
        b = bias.detach().to(self.device, torch.float64) if bias is not None else w.new_zeros(self.out_features)
        return w, b

    def _require_rows(self) -> None:
        if self.n_rows == 0:
            raise ValueError("these statistics hold no rows yet: update() them with data first")

    # ------------------------------------------------------------ exact solutions
    def solve(self, alpha: float = 0.0, fit_intercept: bool = True, *,
              rcond: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The least-squares (alpha = 0) or ridge solution: (weight (O, D), bias (O,) or None), fp64.

        Minimises Σ_rows ‖W·x + b − t‖² + alpha·‖W‖² (scikit-learn's Ridge convention: the
        intercept is not penalised; fit_intercept=False fixes b = 0 and returns None for it).
        alpha: any real number ≥ 0 (Python, NumPy or 0-d tensor). From the factor, not the
        normal equations: columns scaled to unit norm, the rank revealed by an SVD of the small
        D × D factor (rcond, default max(D, 1)·ε of the coarser of the data and the
        accumulation), then back substitution, or the minimum-norm least-squares solution on the
        well-determined directions when the rank is below D (a warning states the rank). A
        warning also says when the estimated correct digits fall below 4. Three host syncs (the
        factor's finiteness, the D singular values, the digits estimate): a solve is not a step.
        """
        des, sol = self._solution(alpha, fit_intercept, rcond)
        return sol.weight, sol.bias

    def summary(self, alpha: float = 0.0, fit_intercept: bool = True, *,
                rcond: float | None = None) -> solver.RegressionSummary:
        """``solve``'s coefficients with statsmodels-style OLS results: standard errors, t values,
        residual standard deviation, R² (uncentred without an intercept), adjusted R², degrees of
        freedom, rank and condition number (linreg_fused.solver.RegressionSummary)."""
        des, sol = self._solution(alpha, fit_intercept, rcond)
        return solver.summarise(des, sol, solver.check_alpha(alpha))

    def _solution(self, alpha, fit_intercept, rcond):
        alpha = solver.check_alpha(alpha)
        if rcond is not None and not (isinstance(rcond, numbers.Real) and not isinstance(rcond, bool)
                                      and 0 <= rcond < 1):
            raise ValueError(f"rcond must be a number in [0, 1) or None, got {rcond!r}")
        self._require_rows()
        if not bool(torch.isfinite(self._r).all()):
            raise ValueError("the statistics are not finite: the data contain NaN or inf")
        des = solver.design(self._r, self._shift, self._n, self.in_features, fit_intercept)
        eps_factor = solver.EPS[self.precision]
        eps_rank = max(eps_factor, min(self._data_eps, solver.EPS["fp32"]))
        sol = solver.solve(des, alpha, eps_rank, rcond)
        data = _DTYPE_NAMES.get(self._data_eps, "the") + " data"
        data += "" if self.precision == "fp64" else ", fp32 accumulation"
        solver.check_accuracy(des, sol, eps_factor, self._data_eps, data)
        return des, sol

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain data (``torch.save`` it; ``load_state_dict`` restores it), independent of the shift:
        n_rows, the means, the R factor of the centred [X, T] ((D+O) × (D+O)), the coarsest input's
        unit roundoff (0-d) and the precision."""
        means = self._means()
        d = self.in_features
        return {"n_rows": self._n, "mean_x": means[:d], "mean_t": means[d:], "factor": self._r[1:, 1:].clone(),
                "input_eps": torch.tensor(self._data_eps, dtype=torch.float64), "precision": self.precision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace these statistics with ``state``, on this device; the shapes must match this
        object's. Also reads the moments format of earlier releases (n_rows, mean_x, mean_t, m_xx,
        m_tx, m_tt, precision), converted to a factor with the same Gram."""
        old = "m_xx" in state
        keys = ("n_rows", "mean_x", "mean_t", *(("m_xx", "m_tx", "m_tt") if old else ("factor",)), "precision")
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"state_dict is missing {missing}")
        d, o = self.in_features, self.out_features
        shapes = {"mean_x": (d,), "mean_t": (o,)}
        shapes.update({"m_xx": (d, d), "m_tx": (o, d), "m_tt": (o, o)} if old else {"factor": (d + o, d + o)})
        for key, shape in shapes.items():
            if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape:
                got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
                raise ValueError(f"state_dict[{key!r}] has shape {got}, expected {shape}")
        n = state["n_rows"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"state_dict['n_rows'] must be an int >= 0, got {n!r}")
        if state["precision"] not in PRECISIONS:
            raise ValueError(f"state_dict['precision'] must be one of {PRECISIONS}")
        get = {k: state[k].detach().to(self.device, torch.float64) for k in shapes}
        mean = torch.cat([get["mean_x"], get["mean_t"]])
        if old:
            gram = torch.cat([torch.cat([get["m_xx"], get["m_tx"].t()], 1), torch.cat([get["m_tx"], get["m_tt"]], 1)])
            r = factor.from_moments(n, mean, gram)
        else:
            r = torch.zeros_like(self._r)
            r[0, 0] = float(n) ** 0.5
            r[1:, 1:] = get["factor"]
        eps = state.get("input_eps")
        self._n, self._shift, self._r = n, mean.clone(), r
        self._data_eps = float(eps) if eps is not None else _UNIT_ROUNDOFF[torch.float64]
        self.precision = state["precision"]
