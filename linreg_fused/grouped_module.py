"""GroupedLinearRegressor: one linear model per group of rows, trained together.

    model = GroupedLinearRegressor(n_groups=10_000, in_features=8, out_features=1)
    mse = model.solve(x, t, groups)            # every group's least squares, from one pass
    history = model.fit(x, t, groups, epochs=100, lr=0.05)   # or gradient descent per group
    y = model(x, groups)                        # row i through group groups[i]'s model
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import torch
from torch import nn

from .backend import BACKENDS
from .grouped_stats import EMPTY, NONFINITE, GroupedLinearStats, _check_groups, positive_int
from .optim import group_hyper
from .reference import _sgd_step
from .solver import check_representable
from .kernels.specs import SGDHyper

FORMAT = "linreg-fused-grouped"
FORMAT_VERSION = 1
FORWARD_CHUNK_ROWS = 1 << 15  # rows per gathered (rows, O, D) weight block in forward


class GroupedLinearRegressor(nn.Module):
    """``n_groups`` independent models y = x·W_gᵀ + b_g: ``weight`` (G, O, D), ``bias`` (G, O),
    each group's slice initialised as nn.Linear(in_features, out_features) initialises its own.

    - ``forward(x, groups)``: x (..., D), groups (...,) int64 -> (..., O);
    - ``solve(x, t, groups, alpha)``: every group's least-squares (ridge) solution;
    - ``fit(x, t, groups, epochs, lr=…)``: full-batch gradient descent per group, each group
      exactly as a FusedLinearRegressor trained on its own rows, from one statistics pass.

    backend: "auto" | "triton" | "torch": where the statistics pass runs (linreg_fused.backend).
    """

    def __init__(self, n_groups: int, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        n_groups, in_features, out_features = (positive_int(name, v) for name, v in (
            ("n_groups", n_groups), ("in_features", in_features), ("out_features", out_features)))
        factory = {"device": device, "dtype": dtype}
        self.n_groups, self.in_features, self.out_features, self.backend = n_groups, in_features, out_features, backend
        self.weight = nn.Parameter(torch.empty((n_groups, out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty((n_groups, out_features), **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's distribution per group: W_g and b_g ~ U(−1/√in, 1/√in)."""
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Row i of x (..., D) through the model of group groups[i]: (..., O). One host sync
        (the ids' range check)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (..., {self.in_features}), got {shape}")
        g = _check_groups(groups, x, self.n_groups)
        x2 = x.reshape(-1, self.in_features)
        out = []
        # Bounded (rows, O, D) gathers; one (empty) chunk for no rows, so that y is x's function as nn.Linear's.
        for start in range(0, max(x2.shape[0], 1), FORWARD_CHUNK_ROWS):
            gi = g[start : start + FORWARD_CHUNK_ROWS]
            y = torch.einsum("nd,nod->no", x2[start : start + FORWARD_CHUNK_ROWS].to(self.weight.dtype),
                             self.weight[gi])
            out.append(y + self.bias[gi] if self.bias is not None else y)
        y = torch.cat(out) if len(out) > 1 else out[0]
        return y.reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------ exact solutions
    def statistics(self, x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor) -> GroupedLinearStats:
        """The per-group statistics of (x, t) on this model's device (one pass)."""
        if t is None or groups is None:
            raise TypeError("give t and groups with the rows x (or a GroupedLinearStats alone in their place)")
        device = self.weight.device
        return GroupedLinearStats.from_tensors(x.to(device), t.to(device), groups.to(device), self.n_groups,
                                               backend=self.backend)

    def _statistics_of(self, x, t, groups) -> GroupedLinearStats:
        stats = x if isinstance(x, GroupedLinearStats) else self.statistics(x, t, groups)
        if stats.shape != (self.n_groups, self.in_features, self.out_features):
            raise ValueError(f"the statistics are of {stats.shape} (groups, in, out) but the model is "
                             f"{(self.n_groups, self.in_features, self.out_features)}")
        return stats

    @torch.no_grad()
    def solve(self, x: torch.Tensor | GroupedLinearStats, t: torch.Tensor | None = None,
              groups: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
        """Set every group's weight and bias to its least-squares (alpha = 0) or ridge solution
        (GroupedLinearStats.solve) and return each group's training MSE there: (G,) fp64.

        x: (..., D) tensor with t (..., O) and groups (...,), or a GroupedLinearStats alone.
        A group without rows, or whose data are not finite, keeps its parameters and gets a NaN
        MSE (a RuntimeWarning names the groups); a rank-deficient one gets the minimum-norm fit.
        """
        stats = self._statistics_of(x, t, groups)
        solution = stats.solve(alpha, fit_intercept=self.bias is not None)
        solved = ((solution.status != EMPTY) & (solution.status != NONFINITE)).to(self.weight.device)
        kept = solved.to(solution.weight.device)
        check_representable(self.weight.dtype, solution.weight[kept],
                            None if self.bias is None else solution.bias[kept])
        self.weight.copy_(torch.where(solved[:, None, None], solution.weight.to(self.weight), self.weight))
        if self.bias is not None:
            self.bias.copy_(torch.where(solved[:, None], solution.bias.to(self.bias), self.bias))
        _warn_unsolved(solution.status)
        return torch.where(solved, stats.loss(self.weight, self.bias), float("nan"))

    # ------------------------------------------------------------ gradient descent
    @torch.no_grad()
    def fit(self, x: torch.Tensor | GroupedLinearStats, t: torch.Tensor | None = None,
            groups: torch.Tensor | None = None, epochs: int = 1, lr: float | None = None,
            optimizer: torch.optim.SGD | None = None, *, reduction: str = "mean") -> torch.Tensor:
        """Full-batch gradient descent on each group's own rows: the steps that ``FusedLinearRegressor.fit
        (x_g, t_g, epochs=epochs, optimizer=SGD(lr, …))`` takes for every group g, from one pass
        over the data (each epoch is O·D² work per group on the statistics, not a pass).

        lr: plain SGD with this learning rate; or optimizer: a torch.optim.SGD/FusedSGD over this
        model's parameters (its momentum, dampening, weight_decay, nesterov and maximize apply,
        and its momentum buffers (G, O, D) are kept in its state). Returns the loss of each
        epoch before its step, (epochs, G) fp64. A group without rows is not trained (NaN
        losses); a group whose loss, or whose parameters after a step, stop being finite keeps
        its last finite epoch's parameters (a RuntimeWarning names it); the other groups train on.
        """
        epochs = positive_int("epochs", epochs)
        hypers, buffers = self._training_state(lr, optimizer)
        stats = self._statistics_of(x, t, groups)
        has_rows = (stats.n_rows > 0).to(self.weight.device)
        params = [p for p in (self.weight, self.bias) if p is not None]
        state = [p.detach().clone() for p in params]
        history = torch.empty((epochs, self.n_groups), dtype=torch.float64, device=self.weight.device)
        all_finite = has_rows.clone()
        for epoch in range(epochs):
            values = [s.double() for s in state]
            loss = stats.loss(values[0], values[1] if self.bias is not None else None, reduction)
            grads = stats.grads(values[0], values[1] if self.bias is not None else None, reduction)
            history[epoch] = torch.where(has_rows, loss, float("nan"))
            all_finite &= torch.isfinite(loss)
            steps = {}
            for i, (p, value, grad, hyper) in enumerate(zip(params, values, grads, hypers)):
                if hyper is None:  # not trained: frozen, or not in the optimizer
                    continue
                buf = buffers[i].double() if buffers[i] is not None else None
                new_p, new_buf = _sgd_step(value, grad, buf, hyper, first=buf is None)
                steps[i] = new_p.to(p.dtype), None if new_buf is None else new_buf.to(p.dtype)
                # The loss is taken before the step: a step that overflows the parameters (or buffers)
                # ends the group's training too, with the values it had before that step.
                for v in steps[i]:
                    if v is not None:
                        all_finite &= torch.isfinite(v).flatten(1).all(1)
            for i, (new_p, new_buf) in steps.items():
                keep = all_finite.view(-1, *([1] * (params[i].dim() - 1)))
                state[i] = torch.where(keep, new_p, state[i])
                if new_buf is not None:
                    old = buffers[i] if buffers[i] is not None else torch.zeros_like(params[i])
                    buffers[i] = torch.where(keep, new_buf, old)
        for p, new in zip(params, state):
            p.copy_(new)
        if optimizer is not None:
            for p, buf in zip(params, buffers):
                if buf is not None:
                    optimizer.state[p]["momentum_buffer"] = buf
        diverged = torch.nonzero(has_rows & ~all_finite).flatten()
        if diverged.numel():
            warnings.warn(f"fit: the loss or parameters of {diverged.numel()} group(s) stopped being finite ({diverged[:8].tolist()}"
                          f"{' …' if diverged.numel() > 8 else ''}); they keep the parameters of their last finite "
                          f"epoch", RuntimeWarning, stacklevel=2)
        return history

    def _training_state(self, lr, optimizer) -> tuple[list[SGDHyper | None], list[torch.Tensor | None]]:
        params = [p for p in (self.weight, self.bias) if p is not None]
        if (lr is None) == (optimizer is None):
            raise ValueError("give fit either lr= (plain SGD) or optimizer= (an SGD over this model's parameters)")
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"lr must be a positive number, got {lr!r}")
            return [SGDHyper(lr=float(lr)) if p.requires_grad else None for p in params], [None] * len(params)
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"optimizer must be a torch.optim.SGD or FusedSGD (gradient descent per group), got "
                            f"{type(optimizer).__name__}")
        hypers, buffers = [], []
        for p in params:
            group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
            hyper = group_hyper(group) if group is not None and p.requires_grad else None
            hypers.append(hyper)
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and hyper is not None and hyper.momentum and buf.shape != p.shape:
                # (G, O, D) against another shape would broadcast: every group stepped with one buffer
                raise RuntimeError(f"the momentum_buffer in the optimizer's state of a parameter of shape "
                                   f"{tuple(p.shape)} has shape {tuple(buf.shape)}: load a state of this model")
            buffers.append(buf.detach().clone() if buf is not None and hyper is not None and hyper.momentum else None)
        if all(h is None for h in hypers):
            raise ValueError("the optimizer holds none of this model's trainable parameters")
        return hypers, buffers

    # ------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the model to a safetensors file (``weight`` (G, O, D), ``bias`` (G, O)), atomically."""
        from .grouped_files import save_grouped

        save_grouped(self, path, FORMAT, FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None,
             backend: str = "auto") -> "GroupedLinearRegressor":
        """A model read from a file written by ``save``."""
        from .grouped_files import read_grouped

        tensors, bias = read_grouped(path, FORMAT, FORMAT_VERSION)
        g, o, d = tensors["weight"].shape
        model = cls(g, d, o, bias, device=device, dtype=tensors["weight"].dtype, backend=backend)
        model.load_state_dict(tensors)
        return model

    def extra_repr(self) -> str:
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return (f"n_groups={self.n_groups}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{extra}")


def _warn_unsolved(status: torch.Tensor) -> None:
    empty = torch.nonzero(status == EMPTY).flatten()
    if empty.numel():
        warnings.warn(f"solve: {empty.numel()} group(s) have no rows ({empty[:8].tolist()}"
                      f"{' …' if empty.numel() > 8 else ''}) and keep their parameters (MSE NaN)",
                      RuntimeWarning, stacklevel=3)
