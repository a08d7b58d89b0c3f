"""Persistent training kernel for small problems: many SGD steps in one launch.

When a whole mini-batch, W and b fit in one program's registers (the
tutorial's 15 rows × 3 features → 2 targets, batch 5), launch overhead is the
entire cost of a step. This kernel runs every epoch and every batch of a fit
in a single program: W, b and the momentum buffers stay in registers, each
batch's rows are gathered through a per-epoch permutation, and the update is
torch.optim.SGD's (the same ``sgd_update`` as reduce_update.py).

Divergence is handled on the device: after each epoch the kernel records the
mean batch loss, the last batch's loss (which the tutorial prints) and, given
a third history column, whether W and b are finite at the epoch's end; it
keeps a copy of the parameters from the end of the last epoch whose loss and
end parameters were finite (the loss is taken before each step, so a last
step that overflows shows in the parameters alone). That copy is what it
writes back, so a run that blew up leaves the parameters (and buffers) as
they were at the last finite epoch; the host reads the history once per
launch to report it.

A parameter can be left alone (UPDATE_WEIGHT / UPDATE_BIAS, compile-time):
a frozen one, or one the optimizer does not hold, keeps its exact bits.
Hyper-parameters are fp64 arguments (tiles.f64_scalar) and the loss scale
1/(rows·O) is formed in the kernel from integers, so fp64 fits are exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import DeviceProfile
from .plan import LaunchPlan
from .reduce_update import MOMENTUM, buffer_coefficients, sgd_update
from .specs import SGDHyper
from .tiles import f64_scalar

_MAX_BLOCK_ELEMENTS = 8192  # BLOCK_N·BLOCK_O·BLOCK_D, the largest temporary


def fit_small_supported(batch_size: int, in_features: int, out_features: int) -> bool:
    """Whether one program can hold a batch, W and the per-step temporaries (plain Python: fit
    asks on every call)."""
    n, d, o = (1 << (v - 1).bit_length() for v in (batch_size, in_features, out_features))  # next powers of 2
    return n * d * o <= _MAX_BLOCK_ELEMENTS


@triton.jit
def _fit_small_kernel(
    x_ptr, t_ptr, w_ptr, b_ptr, w_buf_ptr, b_buf_ptr, perm_ptr, history_ptr,
    N, D, O, stride_xn, stride_xd, stride_tn, stride_to, stride_perm, stride_history,
    n_epochs, batch_size,
    w_lr: tl.float64, w_momentum: tl.float64, w_dampening: tl.float64, w_weight_decay: tl.float64,
    b_lr: tl.float64, b_momentum: tl.float64, b_dampening: tl.float64, b_weight_decay: tl.float64,
    HAS_BIAS: tl.constexpr, MEAN: tl.constexpr, UPDATE_WEIGHT: tl.constexpr, UPDATE_BIAS: tl.constexpr,
    FINITE_COLUMN: tl.constexpr, INIT_W_BUFFER: tl.constexpr, INIT_B_BUFFER: tl.constexpr,
    W_FLAGS: tl.constexpr, B_FLAGS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = tl.arange(0, BLOCK_O)
    mask_d = offs_d < D
    mask_o = offs_o < O
    mask_od = mask_o[:, None] & mask_d[None, :]
    w_offsets = offs_o[:, None] * D + offs_d[None, :]

    w = tl.load(w_ptr + w_offsets, mask=mask_od, other=0.0).to(ACC_DTYPE)
    b = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DTYPE)
    w_buf = tl.zeros([BLOCK_O, BLOCK_D], dtype=ACC_DTYPE)
    b_buf = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    if UPDATE_WEIGHT:
        if MOMENTUM & W_FLAGS:
            if not INIT_W_BUFFER:
                w_buf = tl.load(w_buf_ptr + w_offsets, mask=mask_od, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        if UPDATE_BIAS:
            if MOMENTUM & B_FLAGS:
                if not INIT_B_BUFFER:
                    b_buf = tl.load(b_buf_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DTYPE)
    w_lr_, w_momentum_ = f64_scalar(w_lr, ACC_DTYPE), f64_scalar(w_momentum, ACC_DTYPE)
    w_weight_, w_decay_ = f64_scalar(1.0 - w_dampening, ACC_DTYPE), f64_scalar(w_weight_decay, ACC_DTYPE)
    b_lr_, b_momentum_ = f64_scalar(b_lr, ACC_DTYPE), f64_scalar(b_momentum, ACC_DTYPE)
    b_weight_, b_decay_ = f64_scalar(1.0 - b_dampening, ACC_DTYPE), f64_scalar(b_weight_decay, ACC_DTYPE)
    good_w, good_b, good_w_buf, good_b_buf = w, b, w_buf, b_buf
    all_finite = tl.program_id(0) == 0  # a boolean scalar tensor: True (one program)
    n_batches = tl.cdiv(N, batch_size)

    perm_row = perm_ptr  # this epoch's row order; advanced by stride_perm (64-bit pointer arithmetic)
    for epoch in range(n_epochs):
        epoch_loss = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
        batch_loss = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
        for batch in range(n_batches):
            start = batch * batch_size
            rows_in_batch = tl.minimum(batch_size, N - start)
            mask_n = offs_n < rows_in_batch
            rows = tl.load(perm_row + start + offs_n, mask=mask_n, other=0).to(tl.int64)
            x = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
            mask_no = mask_n[:, None] & mask_o[None, :]
            target = tl.load(t_ptr + rows[:, None] * stride_tn + offs_o[None, :] * stride_to,
                             mask=mask_no, other=0.0).to(ACC_DTYPE)
            # Tiny blocks: broadcast-multiply-reduce instead of tl.dot (no 16-wide minimum, exact FMAs).
            pred = tl.sum(x[:, None, :] * w[None, :, :], axis=2) + b[None, :]
            r = tl.where(mask_no, pred - target, 0.0)
            loss_scale = 1.0
            if MEAN:  # 1/(rows·O) from integers, in the accumulator dtype
                loss_scale = 1.0 / (rows_in_batch * O).to(ACC_DTYPE)
            batch_loss = tl.sum(r * r, axis=0) * loss_scale
            epoch_loss += batch_loss

            # SGD's first step sets a new buffer to the gradient: buf = 0·buf + 1·g.
            first_step = (epoch == 0) & (batch == 0)
            if UPDATE_WEIGHT:
                grad_w = tl.sum(r[:, :, None] * x[:, None, :], axis=0) * (2.0 * loss_scale)
                w_decay, w_weight = buffer_coefficients(w_momentum_, w_weight_, first_step, INIT_W_BUFFER)
                w, w_buf = sgd_update(w, grad_w, w_buf, w_decay, w_weight, w_lr_, w_momentum_, w_decay_, W_FLAGS)
            if HAS_BIAS:
                if UPDATE_BIAS:
                    grad_b = tl.sum(r, axis=0) * (2.0 * loss_scale)
                    b_decay, b_weight = buffer_coefficients(b_momentum_, b_weight_, first_step, INIT_B_BUFFER)
                    b, b_buf = sgd_update(b, grad_b, b_buf, b_decay, b_weight, b_lr_, b_momentum_, b_decay_, B_FLAGS)

        mean_loss = tl.sum(epoch_loss, axis=0) / n_batches
        # Non-finite entries of W and b (abs(v) < inf is False for NaN too); padding counts as finite.
        bad = tl.sum(tl.sum(tl.where(mask_od & ~(tl.abs(w) < float("inf")), 1, 0), axis=1), axis=0)
        bad += tl.sum(tl.where(mask_o & ~(tl.abs(b) < float("inf")), 1, 0), axis=0)
        params_finite = bad == 0
        history_row = history_ptr + epoch * stride_history
        tl.store(history_row, mean_loss)
        tl.store(history_row + 1, tl.sum(batch_loss, axis=0))
        if FINITE_COLUMN:
            tl.store(history_row + 2, params_finite.to(ACC_DTYPE))
        perm_row += stride_perm
        all_finite = all_finite & (tl.abs(mean_loss) < float("inf")) & params_finite
        good_w = tl.where(all_finite, w, good_w)
        good_b = tl.where(all_finite, b, good_b)
        good_w_buf = tl.where(all_finite, w_buf, good_w_buf)
        good_b_buf = tl.where(all_finite, b_buf, good_b_buf)

    if UPDATE_WEIGHT:
        tl.store(w_ptr + w_offsets, good_w, mask=mask_od)
        if MOMENTUM & W_FLAGS:
            tl.store(w_buf_ptr + w_offsets, good_w_buf, mask=mask_od)
    if HAS_BIAS:
        if UPDATE_BIAS:
            tl.store(b_ptr + offs_o, good_b, mask=mask_o)
            if MOMENTUM & B_FLAGS:
                tl.store(b_buf_ptr + offs_o, good_b_buf, mask=mask_o)


_NO_UPDATE = SGDHyper(lr=0.0)


def plan_fit_small(
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
    profile: DeviceProfile | None = None,
) -> LaunchPlan:
    """The launch of fit_small (see there). profile is accepted for symmetry with
    the other plan_* helpers: one program, whatever the device."""
    n_rows, in_features = x.shape
    out_features = weight.shape[0]
    # The kernel writes 2 or 3 values per epoch row: any other shape would be written out of bounds.
    if history.dim() != 2 or history.shape[1] not in (2, 3) or history.stride(1) != 1:
        raise ValueError(f"history must be (epochs, 2) or (epochs, 3) with contiguous rows, got shape "
                         f"{tuple(history.shape)} and strides {history.stride()}")
    if permutations.dim() != 2 or permutations.shape[0] != history.shape[0]:
        raise ValueError(f"permutations must be (epochs, N) with one row per history row, got "
                         f"{tuple(permutations.shape)} for {history.shape[0]} epochs")
    acc = history.dtype
    block_n, block_d, block_o = (triton.next_power_of_2(v) for v in (batch_size, in_features, out_features))
    elements = block_n * block_d * block_o  # the largest per-step temporary: 1 warp for the tutorial, up to 8
    num_warps = 1 if elements <= 1024 else (4 if elements <= 4096 else 8)
    w_hyper, b_hyper = weight_hyper or _NO_UPDATE, bias_hyper or _NO_UPDATE
    w_buf = weight_buffer if weight_buffer is not None else weight
    b_buf = bias_buffer if bias_buffer is not None else w_buf
    args = dict(
        x_ptr=x, t_ptr=target, w_ptr=weight, b_ptr=bias if bias is not None else weight, w_buf_ptr=w_buf,
        b_buf_ptr=b_buf, perm_ptr=permutations, history_ptr=history,
        N=n_rows, D=in_features, O=out_features, stride_xn=x.stride(0), stride_xd=x.stride(1),
        stride_tn=target.stride(0), stride_to=target.stride(1), stride_perm=permutations.stride(0),
        stride_history=history.stride(0), n_epochs=history.shape[0], batch_size=batch_size,
        w_lr=w_hyper.lr, w_momentum=w_hyper.momentum, w_dampening=w_hyper.dampening,
        w_weight_decay=w_hyper.weight_decay,
        b_lr=b_hyper.lr, b_momentum=b_hyper.momentum, b_dampening=b_hyper.dampening,
        b_weight_decay=b_hyper.weight_decay,
    )
    constexprs = dict(
        HAS_BIAS=bias is not None, MEAN=mean, UPDATE_WEIGHT=weight_hyper is not None,
        UPDATE_BIAS=bias_hyper is not None, FINITE_COLUMN=history.shape[1] > 2,
        INIT_W_BUFFER=init_weight_buffer, INIT_B_BUFFER=init_bias_buffer,
        W_FLAGS=w_hyper.flags, B_FLAGS=b_hyper.flags, ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_O=block_o,
    )
    return LaunchPlan(_fit_small_kernel, (1,), args, constexprs, num_warps=num_warps, num_stages=1)


def fit_small(
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
    """Run history.shape[0] epochs of mini-batch SGD in one launch, in place.

    x: (N, D), target: (N, O), any strides; weight: (O, D) and bias: (O,)
    contiguous, updated in place, as are the momentum buffers (same shapes;
    needed where that parameter's momentum != 0). permutations: (epochs, N)
    int, the row order of each epoch (rows contiguous). history: (epochs, 2)
    or (epochs, 3) fp32/fp64, rows contiguous, receives each epoch's mean batch
    loss, its last batch's loss and (a third column) 1.0 if W and b are
    finite at its end, else 0.0. weight_hyper /
    bias_hyper: None leaves that parameter (and its buffer) untouched, e.g.
    a frozen parameter; it still takes part in the predictions.
    init_*_buffer: that buffer is new (zeroed), so the first step sets it
    to the gradient.
    """
    plan_fit_small(x, target, weight, bias, weight_buffer, bias_buffer, permutations, history,
                   batch_size=batch_size, mean=mean, weight_hyper=weight_hyper, bias_hyper=bias_hyper,
                   init_weight_buffer=init_weight_buffer, init_bias_buffer=init_bias_buffer).launch()
