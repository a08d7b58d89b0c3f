"""Sufficient statistics of a linear least-squares problem: one pass over the
data, then the MSE loss and its gradients for any weights, any number of
full-batch SGD epochs, and the exact least-squares or ridge solution, all
without reading X again.

With x̄, t̄ the means and the centred co-moments

    M_xx = Σ (x − x̄)(x − x̄)ᵀ  (D × D)     M_tx = Σ (t − t̄)(x − x̄)ᵀ  (O × D)
    M_tt = Σ (t − t̄)(t − t̄)ᵀ  (O × O)

the residual r = W·x + b − t of every row is known in aggregate: with
e = W·x̄ + b − t̄,

    Σ_rows r_o² = n·e_o² + w_o·M_xx·w_oᵀ − 2·w_o·M_tx[o]ᵀ + M_tt[o, o]
    Σ_rows r·xᵀ = n·e·x̄ᵀ + W·M_xx − M_tx,     Σ_rows r = n·e.

(These are G = ZᵀZ, C = TᵀZ and ‖T‖² for Z = [X 1], kept centred: the
uncentred sums of data with a large mean cancel catastrophically when a
loss near zero is formed from them.)
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from . import distributed
from .backend import BACKENDS, select_ops
from .functional import REDUCTIONS, loss_scale
from .optim import FusedSGD, group_hyper
from .reference import Moments, merge_moments

PRECISIONS = ("fp32", "fp64")

# Relative accuracy of the statistics' entries, for the solver's rank threshold: fp64
# products and sums; or split-TF32 products with fp32 sums over at most 1024 rows.
_STATS_EPS = {"fp64": 2.0**-52, "fp32": 2.0**-20}


class LinearStats:
    """Count, means and centred co-moments of (x, t) rows, in fp64 on one device.

    Build with ``LinearStats.from_tensors(x, t)`` (one pass: kernels/linear_stats.py
    on the Triton backend), ``LinearStats.from_batches(chunks)`` (out of core), or
    ``LinearStats(in_features, out_features)`` (empty) and ``update(x, t)``.

    Accuracy. Chunks (one per ``update``) are centred on their own means and merged
    with Chan et al.'s pairwise update in fp64, so the result does not depend on how
    far the data sit from 0. Within a chunk:

    - precision="fp64" (the default for fp64 data, and the reference backend always):
      fp64 products and sums; each co-moment entry is within about 1e-15 of
      Σ |x_i − s|·|y_i − s| (s: the shift, near the mean).
    - precision="fp32" (the default for fp32/bf16/fp16 data on the Triton backend):
      the shifted values are fp32 (one rounding, 2⁻²⁴ relative), products are split
      TF32 (hi + lo, three tensor-core products, ≤ 1.2e-6 relative on a GPU, exact
      fp32 in the interpreter), summed in fp32 over at most 1024 rows and in fp64
      beyond: each entry is within ~1e-6 (typical) and 6e-5 (worst case) of that
      same magnitude Σ |x_i − s|·|y_i − s|.

    A loss formed from the statistics carries that error times the variance of the
    predictions and targets: on data with mean 1e4, spread 1 and a residual of 1e-2,
    fp64 statistics gave the loss to 2.5e-12 relative and fp32 ones to 2.5e-3 (Triton's
    interpreter; expect a few times more on a GPU), where the uncentred fp32 sums are
    wrong in every digit (tests/test_stats.py). Use precision="fp64" when the fit is
    tight relative to the data's spread.
    """

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None,
                 precision: str = "fp64", backend: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self._moments: Moments = (0, zeros(in_features), zeros(out_features), zeros(in_features, in_features),
                                  zeros(out_features, in_features), zeros(out_features, out_features))
        self.precision, self.backend = precision, backend

    # ------------------------------------------------------------ building
    @classmethod
    def from_tensors(cls, x: torch.Tensor, t: torch.Tensor, *, precision: str | None = None,
                     backend: str = "auto", groups: torch.Tensor | None = None,
                     n_groups: int | None = None) -> "LinearStats":
        """The statistics of rows x (..., D), t (..., O): one pass, no host sync.

        precision: "fp32" | "fp64" | None (fp64 for fp64 data, else fp32); see the class.
        groups, n_groups: int64 group ids (...,) in [0, n_groups): one set of statistics per
        group, a linreg_fused.grouped_stats.GroupedLinearStats.
        """
        if groups is not None or n_groups is not None:
            from .grouped_stats import GroupedLinearStats
            return GroupedLinearStats.from_tensors(x, t, groups, n_groups, precision=precision, backend=backend)
        x2, t2 = _check_rows(x, t)
        stats = cls(x2.shape[1], t2.shape[1], device=x2.device, precision=precision or _default_precision(x2),
                    backend=backend)
        return stats._add(x2, t2)

    def update(self, x: torch.Tensor, t: torch.Tensor) -> "LinearStats":
        """Add the rows x (..., D), t (..., O) (moved to this device); returns self."""
        x2, t2 = _check_rows(x, t)
        if (x2.shape[1], t2.shape[1]) != (self.in_features, self.out_features):
            raise ValueError(f"the chunk has {x2.shape[1]} features and {t2.shape[1]} targets; these statistics "
                             f"have {self.in_features} and {self.out_features}")
        return self._add(x2.to(self.device), t2.to(self.device))

    def _add(self, x: torch.Tensor, t: torch.Tensor) -> "LinearStats":
        ops = select_ops(self.backend, x.device)
        chunk = ops.linear_moments(x, t, fp64=self.precision == "fp64")
        self._moments = merge_moments(self._moments, chunk)
        return self

    def merge(self, other: "LinearStats") -> "LinearStats":
        """Add the rows that ``other`` summarises (Chan et al.'s pairwise update); returns self."""
        if not isinstance(other, LinearStats):
            raise TypeError(f"merge takes LinearStats, got {type(other).__name__}")
        if (other.in_features, other.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"cannot merge statistics of {other.in_features}→{other.out_features} into "
                             f"{self.in_features}→{self.out_features}")
        self._moments = merge_moments(self._moments, tuple(_to(v, self.device) for v in other._moments))
        if other.precision == "fp32":
            self.precision = "fp32"
        return self

    def all_reduce_(self, process_group: Any = None) -> "LinearStats":
        """Make these the statistics of every rank's rows, on every rank: one all-gather of the
        (D+1)²-sized statistics over ``process_group`` (default: the world group when
        torch.distributed is initialised; False: nothing), merged in rank order, so every rank
        holds the same bits. Returns self."""
        merged = distributed.merge_moments_over_ranks(self._moments, process_group)
        if merged is not self._moments:
            self._moments = merged
        return self

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[Any, Any]], *, device: torch.device | str | None = None,
                     precision: str | None = None, backend: str = "auto") -> "LinearStats":
        """The statistics of a stream of (x, t) chunks: tensors on any device, NumPy arrays, or
        slices of ``np.load(path, mmap_mode="r")`` arrays (see ``row_chunks``). Memory: a few
        chunks, never the whole data set.

        device: where the statistics are computed (default: the first chunk's, CPU for NumPy).
        On CUDA, host chunks are copied into two pinned buffers and uploaded on a side stream,
        so chunk k+1 is read and copied while the kernel reduces chunk k.
        """
        stats = None
        dev = torch.device(device) if device is not None else None
        for x, t in _staged(batches, dev):
            if stats is None:
                x2, _ = _check_rows(x, t)
                stats = cls(x2.shape[1], t.shape[-1], device=x2.device, backend=backend,
                            precision=precision or _default_precision(x2))
            stats.update(x, t)
        if stats is None:
            raise ValueError("from_batches: the iterable yielded no chunks")
        return stats

    @classmethod
    def from_arrays(cls, x: Any, t: Any, *, chunk_rows: int = 1 << 18, **kwargs) -> "LinearStats":
        """``from_batches(row_chunks(x, t, chunk_rows), **kwargs)``: arrays or memory-mapped files
        larger than memory, read ``chunk_rows`` rows at a time."""
        return cls.from_batches(row_chunks(x, t, chunk_rows), **kwargs)

    # ------------------------------------------------------------ what they hold
    @property
    def n_rows(self) -> int:
        return self._moments[0]

    @property
    def in_features(self) -> int:
        return self._moments[1].shape[0]

    @property
    def out_features(self) -> int:
        return self._moments[2].shape[0]

    @property
    def device(self) -> torch.device:
        return self._moments[1].device

    @property
    def mean_x(self) -> torch.Tensor:
        return self._moments[1]

    @property
    def mean_t(self) -> torch.Tensor:
        return self._moments[2]

    @property
    def m_xx(self) -> torch.Tensor:
        return self._moments[3]

    @property
    def m_tx(self) -> torch.Tensor:
        return self._moments[4]

    @property
    def m_tt(self) -> torch.Tensor:
        return self._moments[5]

    def to(self, device: torch.device | str) -> "LinearStats":
        """A copy on ``device``."""
        out = LinearStats(self.in_features, self.out_features, device=device, precision=self.precision,
                          backend=self.backend)
        out._moments = tuple(_to(v, out.device) for v in self._moments)
        return out

    def __repr__(self) -> str:
        return (f"LinearStats(n_rows={self.n_rows}, in_features={self.in_features}, "
                f"out_features={self.out_features}, precision={self.precision!r}, device={self.device})")

    # ------------------------------------------------------------ loss and gradients
    def loss(self, weight: torch.Tensor, bias: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """F.mse_loss(x·Wᵀ + b, t, reduction) over every row, from the statistics: 0-d fp64.

        weight (O, D), bias (O,) or None. O·D² work, no read of the data, no sync.
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
        n, mean_x, mean_t, m_xx, m_tx, m_tt = self._moments
        e = w @ mean_x + b - mean_t
        wm = w @ m_xx
        sse = (n * e * e + (w * (wm - 2.0 * m_tx)).sum(1) + m_tt.diagonal()).sum()
        scale = loss_scale(reduction, n, self.out_features)
        grads = None
        if need_grads:
            grad_w = 2.0 * scale * (n * torch.outer(e, mean_x) + wm - m_tx)
            grads = (grad_w, 2.0 * scale * n * e if bias is not None else None)
        return sse * scale, grads

    def _parameters(self, weight, bias):
        if not isinstance(weight, torch.Tensor) or weight.shape != (self.out_features, self.in_features):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must have shape ({self.out_features}, {self.in_features}), got {shape}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (self.out_features,)):
            raise ValueError(f"bias must have shape ({self.out_features},) or be None")
        w = weight.detach().to(self.device, torch.float64)
        b = bias.detach().to(self.device, torch.float64) if bias is not None else torch.zeros_like(self.mean_t)
        return w, b

    def _require_rows(self) -> None:
        if self.n_rows == 0:
            raise ValueError("these statistics hold no rows yet: update() them with data first")

    # ------------------------------------------------------------ exact solutions
    def solve(self, alpha: float = 0.0, fit_intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The least-squares (alpha = 0) or ridge solution: (weight (O, D), bias (O,) or None), fp64.

        Minimises Σ_rows ‖W·x + b − t‖² + alpha·‖W‖² (scikit-learn's Ridge convention: the
        intercept is not penalised; fit_intercept=False fixes b = 0 and returns None for it).
        Cholesky of the normal equations in fp64 on the statistics' device, after scaling them
        to a unit diagonal. When they are rank-deficient or too ill-conditioned for the
        statistics' accuracy, a warning names the numerical rank and the minimum-norm solution
        (eigendecomposition, eigenvalues below the threshold dropped, like numpy.linalg.lstsq)
        is returned instead. One host sync (the decision); the normal equations square the
        condition number of the centred data, so for cond ≳ 1e6 (fp64 statistics) prefer a QR
        solver on the data itself.
        """
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self._require_rows()
        n, mean_x, mean_t, m_xx, m_tx, _ = self._moments
        if fit_intercept:
            a, rhs = m_xx, m_tx
        else:  # uncentred: Σ x·xᵀ and Σ t·xᵀ
            a, rhs = m_xx + n * torch.outer(mean_x, mean_x), m_tx + n * torch.outer(mean_t, mean_x)
        a = a + alpha * torch.eye(self.in_features, dtype=a.dtype, device=a.device)
        if not bool(torch.isfinite(a).all() & torch.isfinite(rhs).all()):
            raise ValueError("the statistics are not finite: the data contain NaN or inf")
        weight = self._solve_spd(a, rhs)
        bias = mean_t - weight @ mean_x if fit_intercept else None
        return weight, bias

    def _solve_spd(self, a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """W with W·a = rhs for symmetric positive semi-definite a (D × D), rhs (O × D)."""
        d = a.shape[0]
        threshold = max(d, 1) * _STATS_EPS[self.precision]
        diag = a.diagonal()
        scale = torch.where(diag > 0, diag.clamp_min(torch.finfo(a.dtype).tiny).rsqrt(), torch.ones_like(diag))
        scaled = a * scale[:, None] * scale[None, :]
        factor, info = torch.linalg.cholesky_ex(scaled)
        # The smallest eigenvalue of the unit-diagonal matrix, from above: the smallest pivot and
        # a few steps of inverse iteration (‖a⁻¹v‖ ≤ 1/λ_min for a unit v).
        lam_min = torch.full((), float("inf"), dtype=a.dtype, device=a.device)
        if d:
            lam_min = factor.diagonal().square().min()
            v = torch.ones((d, 1), dtype=a.dtype, device=a.device) / math.sqrt(d)
            v = v + torch.linspace(-0.5, 0.5, d, dtype=a.dtype, device=a.device)[:, None] / d  # break symmetry
            for _ in range(6):
                v = torch.cholesky_solve(v, factor)
                norm = v.norm()
                lam_min = torch.minimum(lam_min, 1.0 / norm)
                v = v / norm
        ok = bool((info == 0) & torch.isfinite(lam_min) & (lam_min > threshold))  # the one sync
        if ok:
            return (torch.cholesky_solve((rhs * scale).t(), factor) * scale[:, None]).t()
        eigenvalues, vectors = torch.linalg.eigh(a)
        keep = eigenvalues > threshold * eigenvalues.max().clamp_min(0)
        rank = int(keep.sum())
        inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, torch.ones_like(eigenvalues)), 0.0)
        warnings.warn(f"solve: the normal equations are rank-deficient or ill-conditioned for {self.precision} "
                      f"statistics (numerical rank {rank} of {d}); returning the minimum-norm solution "
                      f"(eigenvalues below {threshold:.1e} of the largest dropped)", RuntimeWarning, stacklevel=3)
        return ((rhs @ vectors) * inverse) @ vectors.t()

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain data: ``torch.save`` it; ``load_state_dict`` restores it."""
        n, mean_x, mean_t, m_xx, m_tx, m_tt = self._moments
        return {"n_rows": n, "mean_x": mean_x, "mean_t": mean_t, "m_xx": m_xx, "m_tx": m_tx, "m_tt": m_tt,
                "precision": self.precision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace these statistics with ``state`` (from ``state_dict``), on this device; the
        shapes must match this object's."""
        keys = ("n_rows", "mean_x", "mean_t", "m_xx", "m_tx", "m_tt", "precision")
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"state_dict is missing {missing}")
        d, o = self.in_features, self.out_features
        shapes = {"mean_x": (d,), "mean_t": (o,), "m_xx": (d, d), "m_tx": (o, d), "m_tt": (o, o)}
        for key, shape in shapes.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(state[key].shape)}, expected {shape}")
        if not isinstance(state["n_rows"], int) or state["n_rows"] < 0:
            raise ValueError(f"state_dict['n_rows'] must be an int >= 0, got {state['n_rows']!r}")
        if state["precision"] not in PRECISIONS:
            raise ValueError(f"state_dict['precision'] must be one of {PRECISIONS}")
        self._moments = (state["n_rows"], *(state[k].detach().to(self.device, torch.float64).clone() for k in shapes))
        self.precision = state["precision"]


# ---------------------------------------------------------------- input handling
def _default_precision(x: torch.Tensor) -> str:
    return "fp64" if x.dtype == torch.float64 else "fp32"


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


def _check_rows(x: Any, t: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, t) as 2-D (N, D), (N, O) views, checked; names the problem otherwise."""
    for name, v in (("x", x), ("t", t)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (or a NumPy array in from_batches), got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if v.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x.dtype != t.dtype:
        raise TypeError(f"x is {x.dtype} but t is {t.dtype}; they must match")
    if x.device != t.device:
        raise ValueError(f"x is on {x.device} but t is on {t.device}; move them to one device")
    if x.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"x has shape {tuple(x.shape)} and t {tuple(t.shape)}: their leading dimensions differ")
    x2, t2 = x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
    if x2.shape[0] == 0 or x2.shape[1] == 0 or t2.shape[1] == 0:
        raise ValueError(f"empty data: x has shape {tuple(x.shape)}, t {tuple(t.shape)}")
    return x2, t2


def _as_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        if not v.flags.c_contiguous:
            v = np.ascontiguousarray(v)
        with warnings.catch_warnings():  # read-only (memory-mapped) arrays are only ever read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(v)  # no copy: a memory-mapped chunk is read when it is used
    raise TypeError(f"a chunk must be a (x, t) pair of tensors or NumPy arrays, got {type(v).__name__}")


def row_chunks(x: Any, t: Any, chunk_rows: int) -> Iterator[tuple[Any, Any]]:
    """(x[i:i+chunk_rows], t[i:i+chunk_rows]) for arrays, memory-mapped arrays or tensors."""
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if len(x) != len(t):
        raise ValueError(f"x has {len(x)} rows but t has {len(t)}")
    for start in range(0, len(x), chunk_rows):
        yield x[start : start + chunk_rows], t[start : start + chunk_rows]


def _staged(batches: Iterable[tuple[Any, Any]], device: torch.device | None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The chunks as tensors on ``device``; on CUDA through double-buffered pinned memory."""
    if device is not None and device.type == "cuda":
        yield from _PinnedUploader(device).stream(batches)
        return
    for x, t in _unpack(batches):
        yield (x, t) if device is None else (x.to(device), t.to(device))


def _unpack(batches):
    for chunk in batches:
        try:
            x, t = chunk
        except (TypeError, ValueError):
            raise TypeError(f"each chunk must be an (x, t) pair, got {type(chunk).__name__}") from None
        yield _as_tensor(x), _as_tensor(t)


class _PinnedUploader:
    """Host chunks -> CUDA through two pinned buffers, copied on a side stream.

    Chunk k is copied into pinned slot k % 2 (host memcpy), uploaded on the copy stream
    and handed to the caller, whose kernels run on the current stream; while they run,
    chunk k+1 is read into the other slot. Events order the reuse of each slot: the
    host waits for the upload that last read a pinned slot, the copy stream for the
    kernels that last read a device slot. Tensors already on the device pass through.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.slots: list[dict[str, Any]] = [{}, {}]

    def _buffers(self, slot: dict[str, Any], x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """The slot's buffers, (re)allocated when a chunk is larger or shaped otherwise."""
        fits = ("host_x" in slot and x.shape[0] <= slot["host_x"].shape[0] and x.dtype == slot["host_x"].dtype
                and x.shape[1:] == slot["host_x"].shape[1:] and t.shape[1:] == slot["host_t"].shape[1:])
        if not fits:
            if "consumed" in slot:  # nothing may still read the buffers being replaced
                slot["copied"].synchronize()
                slot["consumed"].synchronize()
            slot.update(host_x=torch.empty(x.shape, dtype=x.dtype, pin_memory=True),
                        host_t=torch.empty(t.shape, dtype=t.dtype, pin_memory=True),
                        dev_x=torch.empty(x.shape, dtype=x.dtype, device=self.device),
                        dev_t=torch.empty(t.shape, dtype=t.dtype, device=self.device),
                        copied=torch.cuda.Event(), consumed=torch.cuda.Event())
        return slot

    def stream(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        compute = torch.cuda.current_stream(self.device)
        for k, (x, t) in enumerate(_unpack(batches)):
            if x.device == self.device and t.device == self.device:
                yield x, t
                continue
            x, t = x.cpu(), t.cpu()
            slot = self._buffers(self.slots[k % 2], x, t)
            rows = x.shape[0]
            slot["copied"].synchronize()  # the upload that last read this pinned slot is done
            host_x, host_t = slot["host_x"][:rows], slot["host_t"][:rows]
            host_x.copy_(x)
            host_t.copy_(t)
            dev_x, dev_t = slot["dev_x"][:rows], slot["dev_t"][:rows]
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot["consumed"])  # kernels that last read this device slot
                dev_x.copy_(host_x, non_blocking=True)
                dev_t.copy_(host_t, non_blocking=True)
                slot["copied"].record(self.copy_stream)
            compute.wait_event(slot["copied"])
            yield dev_x, dev_t
            slot["consumed"].record(compute)
