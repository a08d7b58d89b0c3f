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

from .kernels.specs import MOMENTUM, ColumnTarget, GradPartials, SGDHyper, accumulator_dtype


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
    param.copy_(p - (hyper.lr if hyper.lr_tensor is None else hyper.lr_tensor.to(g.dtype)) * g)


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
        all_finite = torch.ones((), dtype=torch.bool, device=weight.device)
        for epoch in range(history.shape[0]):
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
            history[epoch, 0] = torch.stack(losses).mean()
            history[epoch, 1] = losses[-1]
            # The flags stay on the device, as the kernel keeps them: no host sync per epoch (on a GPU
            # with backend="torch" this is fit's path, which reads the device at report points only).
            params_finite = torch.stack([torch.isfinite(p).all() for p in (weight, bias) if p is not None]).all()
            if history.shape[1] > 2:
                history[epoch, 2] = params_finite
            all_finite = all_finite & torch.isfinite(history[epoch, 0]) & params_finite
            current = [t for p in params for t in p[:2] if t is not None]
            good = [torch.where(all_finite, t, g) for t, g in zip(current, good)]
        live = [t for p in params for t in p[:2] if t is not None]
        for t, g in zip(live, good):
            t.copy_(g)

    # ------------------------------------------------------------ sufficient statistics
    def linear_moments(self, x: torch.Tensor, target: torch.Tensor, *, fp64: bool) -> Moments:
        """Count, means and centred co-moments of (x, target), in fp64 (whatever ``fp64`` says:
        this is the oracle), a chunk of rows at a time so temporaries stay bounded."""
        moments = None
        for start in range(0, x.shape[0], MOMENT_CHUNK_ROWS):
            chunk = centred_moments(x[start : start + MOMENT_CHUNK_ROWS], target[start : start + MOMENT_CHUNK_ROWS])
            moments = chunk if moments is None else merge_moments(moments, chunk)
        return moments

    def stats_epochs_in_one_launch(self, in_features: int, out_features: int) -> bool:
        """Whether stats_sgd_epochs runs all epochs in one launch; here each epoch is ~20 small ops."""
        return False

    @torch.no_grad()
    def stats_sgd_epochs(
        self,
        n_rows: int,
        moments: tuple[torch.Tensor, ...],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_buffer: torch.Tensor | None,
        bias_buffer: torch.Tensor | None,
        history: torch.Tensor,
        *,
        mean: bool,
        weight_hyper: SGDHyper | None,
        bias_hyper: SGDHyper | None,
        init_weight_buffer: bool,
        init_bias_buffer: bool,
    ) -> None:
        """The semantics of kernels.stats_sgd.stats_sgd_epochs as a loop of small fp64 ops on
        the statistics' device (no host sync): each epoch's loss before its step into history,
        parameters stored in their dtype after every step, and only steps taken while every
        loss so far was finite are kept."""
        mean_x, mean_t, m_xx, m_tx, m_tt = moments
        n = float(n_rows)
        loss_scale = 1.0 / (n * weight.shape[0]) if mean else 1.0
        params = [(weight, weight_buffer, weight_hyper, init_weight_buffer)]
        if bias is not None:
            params.append((bias, bias_buffer, bias_hyper, init_bias_buffer))
        # state: [param, buffer or None] per parameter, in the parameter's dtype
        state = [[p.detach().clone(), buf.clone() if _has_momentum(h) and not init else None]
                 for p, buf, h, init in params]
        m_tt_diag = m_tt.diagonal()
        all_finite = torch.ones((), dtype=torch.bool, device=weight.device)
        for epoch in range(history.numel()):
            w = state[0][0].double()
            b = state[1][0].double() if bias is not None else torch.zeros_like(mean_t)
            e = w @ mean_x + b - mean_t
            wm = w @ m_xx
            sse = n * e * e + (w * (wm - 2.0 * m_tx)).sum(1) + m_tt_diag
            history[epoch] = sse.sum() * loss_scale
            all_finite &= torch.isfinite(history[epoch])
            grads = [2.0 * loss_scale * (n * torch.outer(e, mean_x) + wm - m_tx), 2.0 * loss_scale * n * e]
            for (p, _, hyper, init), slot, value, grad in zip(params, state, (w, b), grads):
                if hyper is None:  # frozen
                    continue
                buf = slot[1].double() if slot[1] is not None else None
                new_p, new_buf = _sgd_step(value, grad, buf, hyper, first=init and epoch == 0)
                slot[0] = torch.where(all_finite, new_p.to(p.dtype), slot[0])
                if new_buf is not None:
                    old = slot[1] if slot[1] is not None else torch.zeros_like(p)
                    slot[1] = torch.where(all_finite, new_buf.to(p.dtype), old)
        for (p, buf, hyper, _), (new_p, new_buf) in zip(params, state):
            p.copy_(new_p)
            if buf is not None and new_buf is not None:
                buf.copy_(new_buf)


def _has_momentum(hyper: SGDHyper | None) -> bool:
    return hyper is not None and bool(hyper.flags & MOMENTUM)


def _sgd_step(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, hyper: SGDHyper, *,
              first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch.optim.SGD's update, out of place, in the inputs' dtype; returns (param, buffer)."""
    if hyper.maximize:
        grad = -grad
    if hyper.weight_decay != 0:
        grad = grad + hyper.weight_decay * param
    new_buf = None
    if hyper.momentum != 0:
        new_buf = grad.clone() if first or buf is None else hyper.momentum * buf + (1.0 - hyper.dampening) * grad
        grad = grad + hyper.momentum * new_buf if hyper.nesterov else new_buf
    return param - hyper.lr * grad, new_buf


# ---------------------------------------------------------------- sufficient statistics
# (count, mean_x (D), mean_t (O), M_xx (D, D), M_tx (O, D), M_tt (O, O)), fp64, with
# M_xx = Σ (x − x̄)(x − x̄)ᵀ, M_tx = Σ (t − t̄)(x − x̄)ᵀ, M_tt = Σ (t − t̄)(t − t̄)ᵀ.
Moments = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
MOMENT_CHUNK_ROWS = 1 << 16


def centred_moments(x: torch.Tensor, target: torch.Tensor) -> Moments:
    """The moments of one chunk, two-pass in fp64: means first, then the centred products."""
    x64, t64 = x.to(torch.float64), target.to(torch.float64)
    mean_x, mean_t = x64.mean(0), t64.mean(0)
    xc, tc = x64 - mean_x, t64 - mean_t
    return x.shape[0], mean_x, mean_t, xc.t() @ xc, tc.t() @ xc, tc.t() @ tc


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two row sets (Chan, Golub and LeVeque's pairwise update):
    means move by δ·n_b/n and co-moments gain n_a·n_b/n · δδᵀ, with δ the difference of means."""
    n_a, n_b = a[0], b[0]
    if n_a == 0:
        return b
    if n_b == 0:
        return a
    n = n_a + n_b
    dx, dt = b[1] - a[1], b[2] - a[2]
    w = n_a * n_b / n
    return (n, a[1] + dx * (n_b / n), a[2] + dt * (n_b / n), a[3] + b[3] + w * torch.outer(dx, dx),
            a[4] + b[4] + w * torch.outer(dt, dx), a[5] + b[5] + w * torch.outer(dt, dt))


TORCH_OPS = TorchOps()
