"""Full-batch SGD epochs on the sufficient statistics, many epochs in one launch.

``_stats_sgd_kernel`` runs in one program from the centred statistics that
linear_stats.py's pass produced (fp64): with M_xx = Σ (x − x̄)(x − x̄)ᵀ,
M_tx and M_tt, an epoch's gradient is W·M_xx − M_tx plus the means' terms,
O·D² multiply-adds and no read of X. The update is reduce_update.py's
sgd_update, so an epoch here equals a full-batch fused step on the rows up
to the rounding of the statistics. The weights live in a two-slot state
(the current and the candidate epoch), so an epoch that diverges leaves the
last finite weights in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import next_power_of_2 as p2

from .reduce_update import MOMENTUM, buffer_coefficients, sgd_update
from .specs import SGDHyper


@triton.jit
def _copy_state(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    for k0 in range(0, n, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _stats_sgd_kernel(
    mean_x_ptr, mean_t_ptr, m_xx_ptr, m_tx_ptr, m_tt_ptr, hyper_ptr, history_ptr,
    w_ptr, b_ptr, w_buf_ptr, b_buf_ptr, w_state_ptr, b_state_ptr, w_buf_state_ptr, b_buf_state_ptr,
    n_rows, D, O, n_epochs,
    HAS_BIAS: tl.constexpr, UPDATE_W: tl.constexpr, UPDATE_B: tl.constexpr, MEAN: tl.constexpr,
    W_FLAGS: tl.constexpr, B_FLAGS: tl.constexpr, INIT_W_BUFFER: tl.constexpr, INIT_B_BUFFER: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_COPY: tl.constexpr,
):
    """Full-batch SGD epochs from the centred statistics, in one program.

    Σ r² and Σ r·xᵀ over the rows, for r = W·x + b − t and e = W·x̄ + b − t̄, are
        Σ_rows r_o² = n·e_o² + w_o·M_xx·w_oᵀ − 2·w_o·M_tx[o]ᵀ + M_tt[o, o]
        Σ_rows r·xᵀ = n·e·x̄ᵀ + W·M_xx − M_tx,   Σ_rows r = n·e.
    The state ping-pongs between two slots (in the parameters' dtype, so each epoch's
    parameters are rounded as a stored parameter is); an epoch's update is kept only if its
    loss, and every earlier one, was finite, so a diverged run ends at the last finite epoch.
    """
    f64: tl.constexpr = tl.float64
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_J)
    n_w = O * D
    # Integer arguments equal to 1 arrive as Python ints on a GPU (Triton specialises them):
    # tl.cast takes both, where int.to would not.
    n = tl.cast(n_rows, f64)
    if MEAN:
        loss_scale = 1.0 / (n * tl.cast(O, f64))
    else:
        loss_scale = n * 0.0 + 1.0
    grad_scale = 2.0 * loss_scale
    w_lr, w_momentum = tl.load(hyper_ptr + 0), tl.load(hyper_ptr + 1)
    w_dampening, w_weight_decay = tl.load(hyper_ptr + 2), tl.load(hyper_ptr + 3)
    b_lr, b_momentum = tl.load(hyper_ptr + 4), tl.load(hyper_ptr + 5)
    b_dampening, b_weight_decay = tl.load(hyper_ptr + 6), tl.load(hyper_ptr + 7)
    mean_t = tl.load(mean_t_ptr + offs_o, mask=mask_o, other=0.0)
    m_tt = tl.load(m_tt_ptr + offs_o * O + offs_o, mask=mask_o, other=0.0)

    # Slot 0 starts as the parameters (and buffers).
    _copy_state(w_ptr, w_state_ptr, n_w, BLOCK_COPY)
    if HAS_BIAS:
        _copy_state(b_ptr, b_state_ptr, O, BLOCK_COPY)
    if MOMENTUM & W_FLAGS:
        if not INIT_W_BUFFER:
            _copy_state(w_buf_ptr, w_buf_state_ptr, n_w, BLOCK_COPY)
    if MOMENTUM & B_FLAGS:
        if not INIT_B_BUFFER:
            _copy_state(b_buf_ptr, b_buf_state_ptr, O, BLOCK_COPY)
    tl.debug_barrier()

    cur = tl.full([], 0, tl.int32)  # the slot holding the current state
    all_finite = tl.full([], 1, tl.int1)  # True
    for epoch in range(n_epochs):
        src = cur * n_w
        dst = (1 - cur) * n_w
        src_b = cur * O
        dst_b = (1 - cur) * O
        # e = W·x̄ + b − t̄
        e = tl.zeros([BLOCK_O], dtype=f64) - mean_t
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            mask_ok = mask_o[:, None] & (kk < D)[None, :]
            w_k = tl.load(w_state_ptr + src + offs_o[:, None] * D + kk[None, :], mask=mask_ok, other=0.0).to(f64)
            e += tl.sum(w_k * tl.load(mean_x_ptr + kk, mask=kk < D, other=0.0)[None, :], axis=1)
        b = tl.zeros([BLOCK_O], dtype=f64)
        if HAS_BIAS:
            b = tl.load(b_state_ptr + src_b + offs_o, mask=mask_o, other=0.0).to(f64)
            e += b

        # W·M_xx a block of columns at a time; the loss and the update of those columns with it.
        quad = tl.zeros([BLOCK_O], dtype=f64)
        first_step = epoch == 0
        for j0 in range(0, D, BLOCK_J):
            jj = j0 + offs_j
            mask_j = jj < D
            mask_oj = mask_o[:, None] & mask_j[None, :]
            wm = tl.zeros([BLOCK_O, BLOCK_J], dtype=f64)
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + offs_k
                w_k = tl.load(w_state_ptr + src + offs_o[:, None] * D + kk[None, :],
                              mask=mask_o[:, None] & (kk < D)[None, :], other=0.0).to(f64)
                m_kj = tl.load(m_xx_ptr + kk[:, None].to(tl.int64) * D + jj[None, :],
                               mask=(kk < D)[:, None] & mask_j[None, :], other=0.0)
                wm += tl.sum(w_k[:, :, None] * m_kj[None, :, :], axis=1)
            w_offs = offs_o[:, None] * D + jj[None, :]
            w_j = tl.load(w_state_ptr + src + w_offs, mask=mask_oj, other=0.0).to(f64)
            m_tx = tl.load(m_tx_ptr + w_offs, mask=mask_oj, other=0.0)
            quad += tl.sum(w_j * (wm - 2.0 * m_tx), axis=1)
            new_w = w_j
            if UPDATE_W:
                x_j = tl.load(mean_x_ptr + jj, mask=mask_j, other=0.0)
                grad = grad_scale * (n * e[:, None] * x_j[None, :] + wm - m_tx)
                buf = grad
                if MOMENTUM & W_FLAGS:
                    buf = tl.load(w_buf_state_ptr + src + w_offs, mask=mask_oj, other=0.0).to(f64)
                decay, weight = buffer_coefficients(w_momentum, 1.0 - w_dampening, first_step, INIT_W_BUFFER)
                new_w, buf = sgd_update(w_j, grad, buf, decay, weight, w_lr, w_momentum, w_weight_decay, W_FLAGS)
                if MOMENTUM & W_FLAGS:
                    tl.store(w_buf_state_ptr + dst + w_offs, buf, mask=mask_oj)
            tl.store(w_state_ptr + dst + w_offs, new_w, mask=mask_oj)

        if HAS_BIAS:
            new_b = b
            if UPDATE_B:
                grad_b = grad_scale * n * e
                buf_b = grad_b
                if MOMENTUM & B_FLAGS:
                    buf_b = tl.load(b_buf_state_ptr + src_b + offs_o, mask=mask_o, other=0.0).to(f64)
                decay, weight = buffer_coefficients(b_momentum, 1.0 - b_dampening, first_step, INIT_B_BUFFER)
                new_b, buf_b = sgd_update(b, grad_b, buf_b, decay, weight, b_lr, b_momentum, b_weight_decay, B_FLAGS)
                if MOMENTUM & B_FLAGS:
                    tl.store(b_buf_state_ptr + dst_b + offs_o, buf_b, mask=mask_o)
            tl.store(b_state_ptr + dst_b + offs_o, new_b, mask=mask_o)

        sse = tl.where(mask_o, n * e * e + quad + m_tt, 0.0)
        # Judged as stored: a loss that overflows history's dtype is a divergence, as it is for a pass per epoch.
        loss = (tl.sum(sse, axis=0) * loss_scale).to(history_ptr.dtype.element_ty)
        tl.store(history_ptr + epoch, loss)
        all_finite = all_finite & (tl.abs(loss) < float("inf"))  # False for NaN too
        cur = tl.where(all_finite, 1 - cur, cur)  # keep this epoch's update only while finite
        tl.debug_barrier()  # this epoch's stores land before the next epoch reads them

    # Write the kept slot back.
    _copy_state(w_state_ptr + cur * n_w, w_ptr, n_w, BLOCK_COPY)
    if HAS_BIAS:
        _copy_state(b_state_ptr + cur * O, b_ptr, O, BLOCK_COPY)
    if MOMENTUM & W_FLAGS:
        _copy_state(w_buf_state_ptr + cur * n_w, w_buf_ptr, n_w, BLOCK_COPY)
    if MOMENTUM & B_FLAGS:
        _copy_state(b_buf_state_ptr + cur * O, b_buf_ptr, O, BLOCK_COPY)


_EPOCH_BUDGET = 4096  # fp64 elements of the W·M_xx broadcast temporary
EPOCH_WARPS = 4


def epoch_blocks(in_features: int, out_features: int) -> dict[str, int]:
    """Blocks of the epochs kernel: BLOCK_O covers O; W·M_xx in BLOCK_K × BLOCK_J tiles."""
    block_o = p2(out_features)
    block_k = max(1, min(p2(in_features), 32))
    block_j = max(1, min(p2(in_features), _EPOCH_BUDGET // (block_o * block_k)))
    return dict(BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_J=block_j, BLOCK_COPY=1024)


def stats_sgd_supported(in_features: int, out_features: int) -> bool:
    """Whether one program runs the epochs well: W·M_xx in a few blocks (a wide D is better served
    by a matrix product per epoch)."""
    return in_features <= 256 and out_features <= 64


def stats_sgd_epochs(
    n_rows: int,
    moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
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
    """len(history) full-batch SGD epochs on the statistics, in one launch, in place.

    moments: (mean_x (D), mean_t (O), M_xx (D, D), M_tx (O, D), M_tt (O, O)), fp64,
    contiguous. weight (O, D), bias (O,) or None: contiguous, updated in place, as are the
    momentum buffers (needed where that parameter's momentum != 0). A hyper of None:
    that parameter is frozen. history: (epochs,) fp32/fp64, each epoch's loss before its step
    (computed in fp64; an epoch whose loss overflows history's dtype counts as diverged).
    The hyper-parameters travel as an fp64 tensor, so the kernel sees their exact values.
    """
    mean_x, mean_t, m_xx, m_tx, m_tt = moments
    out_features, in_features = weight.shape
    w_hyper = weight_hyper or SGDHyper(lr=0.0)
    b_hyper = bias_hyper or SGDHyper(lr=0.0)
    w_flags = w_hyper.flags if weight_hyper is not None else 0
    b_flags = b_hyper.flags if bias_hyper is not None and bias is not None else 0
    hyper = torch.tensor([w_hyper.lr, w_hyper.momentum, w_hyper.dampening, w_hyper.weight_decay,
                          b_hyper.lr, b_hyper.momentum, b_hyper.dampening, b_hyper.weight_decay],
                         dtype=torch.float64).to(weight.device, non_blocking=True)
    w_state = torch.empty((2, out_features, in_features), device=weight.device, dtype=weight.dtype)
    b_state = torch.empty((2, out_features), device=weight.device, dtype=weight.dtype)
    w_buf_state = torch.empty_like(w_state) if MOMENTUM & w_flags else w_state
    b_buf_state = torch.empty_like(b_state) if MOMENTUM & b_flags else b_state
    if MOMENTUM & w_flags and init_weight_buffer:
        w_buf_state[0].zero_()
    if MOMENTUM & b_flags and init_bias_buffer:
        b_buf_state[0].zero_()
    _stats_sgd_kernel[(1,)](
        mean_x, mean_t, m_xx, m_tx, m_tt, hyper, history,
        weight, bias if bias is not None else weight,
        weight_buffer if weight_buffer is not None else weight,
        bias_buffer if bias_buffer is not None else weight,
        w_state, b_state, w_buf_state, b_buf_state,
        n_rows, in_features, out_features, history.numel(),
        HAS_BIAS=bias is not None, UPDATE_W=weight_hyper is not None,
        UPDATE_B=bias is not None and bias_hyper is not None, MEAN=mean,
        W_FLAGS=w_flags, B_FLAGS=b_flags, INIT_W_BUFFER=init_weight_buffer, INIT_B_BUFFER=init_bias_buffer,
        **epoch_blocks(in_features, out_features), num_warps=EPOCH_WARPS,
    )
