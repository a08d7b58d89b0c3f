"""Pure-PyTorch reference path.

Two layers, both plain PyTorch:

- the user-level functions (``linear``, ``linear_mse``, ``sgd_update_``) with
  the same signatures as ``linreg_fused.functional``: readable definitions of
  what the kernels compute, used as oracles in the tests;
- ``TorchOps``, the same primitives the Triton backend implements (partial
  sums, reduce, update, a whole small fit), so that every function of the
  library runs on machines without a GPU through the same autograd
  Functions and training loop.

Mixed precision: half-precision x with fp32 parameters is upcast to fp32
before the product (fp32 master weights), here and in the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.specs import ColumnTarget, GradPartials, SGDHyper, accumulator_dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., D) -> (..., O): x·Wᵀ + b, x upcast to the weights' dtype."""
    return F.linear(x.to(weight.dtype), weight, bias)


def linear_mse(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.mse_loss(linear(x, weight, bias), target, reduction): a 0-d tensor."""
    pred = linear(x, weight, bias)
    return F.mse_loss(pred, target.to(pred.dtype), reduction=reduction)


@torch.no_grad()
def sgd_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    hyper: SGDHyper,
    *,
    init_buffer: bool,
) -> None:
    """torch.optim.SGD's update of one parameter, in place (buffer too).

    init_buffer: the buffer is new; SGD's first step sets it to the gradient.
    """
    g = grad.to(accumulator_dtype(param.dtype))
    p = param.to(g.dtype)
    if hyper.maximize:
        g = -g
    if hyper.weight_decay != 0:
        g = g + hyper.weight_decay * p
    if hyper.momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum != 0 needs a momentum buffer")
        if init_buffer:
            buf = g.clone()
        else:
            buf = hyper.momentum * momentum_buffer.to(g.dtype) + (1.0 - hyper.dampening) * g
        momentum_buffer.copy_(buf)
        g = g + hyper.momentum * buf if hyper.nesterov else buf
    param.copy_(p - hyper.lr * g)


class TorchOps:
    """The backend primitives in plain PyTorch (one "program": P = 1)."""

    name = "torch"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
               input_precision: str) -> torch.Tensor:
        return linear(x, weight, bias)

    def grad_partials(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        *,
        row_index: torch.Tensor | None,
        store_residual: bool,
        input_precision: str,
    ) -> GradPartials:
        if row_index is not None:
            x, target = x.index_select(0, row_index), target.index_select(0, row_index)
        acc = accumulator_dtype(weight.dtype)
        xa = x.to(acc)
        r = F.linear(xa, weight.to(acc), None if bias is None else bias.to(acc)) - target.to(acc)
        buffer = torch.cat([(r.t() @ xa).reshape(-1), r.sum(0), (r * r).sum().reshape(1)]).unsqueeze(0)
        out_features, in_features = weight.shape
        return GradPartials(buffer, r if store_residual else None, x.shape[0], out_features, in_features)

    def sum_loss(self, partials: GradPartials, scale: float, dtype: torch.dtype) -> torch.Tensor:
        return (partials.buffer[:, partials.loss_column].sum() * scale).to(dtype)

    @torch.no_grad()
    def reduce_update_(
        self,
        source: torch.Tensor,
        targets: list[ColumnTarget],
        *,
        scale: float,
        grad_output: torch.Tensor | None,
        loss_column: int | None = None,
        loss_scale: float = 1.0,
        loss_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        sums = source.sum(0) * scale
        if grad_output is not None:
            sums = sums * grad_output.to(sums.dtype)
        loss = None
        if loss_column is not None:
            loss = (source[:, loss_column].sum() * loss_scale).to(loss_dtype)
        for t in targets:
            grad = sums[t.col_start : t.col_start + t.out.numel()].view_as(t.out)
            if t.hyper is None:
                t.out.copy_(grad)
            else:
                sgd_update_(t.out, grad, t.momentum_buffer, t.hyper, init_buffer=t.init_buffer)
        return loss

    def fit_small_supported(self, batch_size: int, in_features: int, out_features: int) -> bool:
        return True

    @torch.no_grad()
    def fit_small(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_buffer: torch.Tensor | None,
        bias_buffer: torch.Tensor | None,
        permutations: torch.Tensor,
        history: torch.Tensor,
        *,
        batch_size: int,
        mean: bool,
        weight_hyper: SGDHyper | None,
        bias_hyper: SGDHyper | None,
        init_weight_buffer: bool,
        init_bias_buffer: bool,
    ) -> None:
        """The semantics of kernels.fused_fit.fit_small, one step at a time; a
        hyper of None leaves that parameter (and its buffer) untouched."""
        n_rows = x.shape[0]
        params = [(p, buf, hyper, init, col) for p, buf, hyper, init, col in (
            (weight, weight_buffer, weight_hyper, init_weight_buffer, 0),
            (bias, bias_buffer, bias_hyper, init_bias_buffer, weight.numel()))
            if p is not None and hyper is not None]
        good = [t.clone() for p in params for t in p[:2] if t is not None]
        all_finite = True
        for epoch in range(history.numel()):
            losses = []
            for batch, start in enumerate(range(0, n_rows, batch_size)):
                rows = permutations[epoch, start : start + batch_size]
                partials = self.grad_partials(x, weight, bias, target, row_index=rows, store_residual=False,
                                              input_precision="ieee")
                scale = 1.0 / (rows.numel() * weight.shape[0]) if mean else 1.0
                losses.append(partials.buffer[0, partials.loss_column] * scale)
                first = epoch == 0 and batch == 0
                targets = [ColumnTarget(col, param, hyper, buf, first and init)
                           for param, buf, hyper, init, col in params]
                if targets:
                    self.reduce_update_(partials.buffer, targets, scale=2.0 * scale, grad_output=None)
            history[epoch] = torch.stack(losses).mean()
            # The kernel keeps this flag on the device; the reference reads it once per epoch.
            all_finite = all_finite and bool(torch.isfinite(history[epoch]))
            if all_finite:
                good = [t.clone() for p in params for t in p[:2] if t is not None]
        live = [t for p in params for t in p[:2] if t is not None]
        for t, g in zip(live, good):
            t.copy_(g)


TORCH_OPS = TorchOps()
