"""A whole SGD step (or a loss) in one launch: the gradient pass, then the
reduce-and-update in the same kernel, by the program that finishes last.

Every program runs the single pass of linear_mse_grad.py over its row tiles
and writes its row of the partial buffer. Then it takes a ticket: an atomic
add on a counter (after a barrier, so that the whole row is written; the
add releases it at GPU scope, as CUTLASS's semaphore does). The program that
draws the last ticket has every row before it; it sums the rows with
reduce_update.column_sums (the same fixed order as the two-launch path, so
the results are bitwise those of linear_mse_partials + reduce_update_),
applies the SGD update to weight and bias (or writes their gradients),
writes the loss, and resets the counter for the next launch. No program
waits for another, so the scheme needs no co-residency; it pays off while the
last program's reduction is short next to a launch (``one_launch``).

Not yet run on a GPU: the interpreter runs it (tests), sm_90 compiles it
(registers, spills: bench/compile_report.py, docs/host-path.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import MAX_PROGRAMS_PER_SM, DeviceProfile, TileConfig
from .linear_mse_grad import partial_sums, plan_linear_mse_partials
from .plan import LaunchPlan
from .reduce_update import _TL_ACC, _acc_of, finish_columns, loss_sum, summation_lanes, target_args
from . import specs
from .specs import ColumnTarget, GradPartials
from .tiles import f64_scalar

# One launch while the last program reads at most this many partial values (P·K): 256 KiB of fp32
# from L2, predicted (not measured) at ~1-2 µs on an H100-class GPU, about what a second launch costs.
ONE_LAUNCH_MAX_VALUES = 65536


def one_launch(n_programs: int, n_columns: int, profile: DeviceProfile) -> bool:
    """The rule: one launch when the grid's programs can all be resident at once (at most
    MAX_PROGRAMS_PER_SM per SM: the gradient grid is capped there, config.grad_config) and the last
    program's reduction reads at most ONE_LAUNCH_MAX_VALUES partial values; two launches otherwise.
    On the interpreter (no device) only the second condition applies."""
    resident = profile.multiprocessors * MAX_PROGRAMS_PER_SM if profile.gpu else n_programs
    return n_programs <= resident and n_programs * n_columns <= ONE_LAUNCH_MAX_VALUES


@triton.jit
def _linear_mse_step_kernel(
    # What changes from one step to the next first (kernels/launch.py relaunches with new values of these).
    x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, a_out_ptr, a_buf_ptr, a_lr_ptr, b_out_ptr, b_buf_ptr, b_lr_ptr,
    loss_ptr, scale: tl.float64, loss_scale: tl.float64,
    a_lr: tl.float64, a_momentum: tl.float64, a_weight_decay: tl.float64, a_buf_decay: tl.float64,
    a_grad_weight: tl.float64,
    b_lr: tl.float64, b_momentum: tl.float64, b_weight_decay: tl.float64, b_buf_decay: tl.float64,
    b_grad_weight: tl.float64,
    partials_ptr, ticket_ptr, residual_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
    a_col_start, a_n_cols, b_col_start, b_n_cols, loss_column,
    HAS_BIAS: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr, ONE_D_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
    A_UPDATE: tl.constexpr, A_FLAGS: tl.constexpr, A_LR_FROM_PTR: tl.constexpr,
    B_UPDATE: tl.constexpr, B_FLAGS: tl.constexpr, B_LR_FROM_PTR: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    partial_sums(x_ptr, w_ptr, b_ptr, t_ptr, row_index_ptr, partials_ptr, residual_ptr,
                 n_rows, D, O, n_programs,
                 stride_xn, stride_xd, stride_wo, stride_wd, stride_tn, stride_to, stride_index, stride_partials,
                 HAS_BIAS, HAS_ROW_INDEX, STORE_RESIDUAL, INPUT_PRECISION, USE_DOT, ONE_D_BLOCK, NUM_STAGES,
                 BLOCK_N, BLOCK_D, BLOCK_O)
    # Every thread's part of this program's row is written before the ticket is taken; the
    # acq_rel add publishes the row to the last program and, there, orders its reads after all rows.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == n_programs - 1:
        for block in range(0, tl.cdiv(a_n_cols, BLOCK_COLS)):
            finish_columns(partials_ptr, n_programs, stride_partials, block, a_col_start, a_n_cols,
                           scale, partials_ptr, a_out_ptr, a_buf_ptr, a_lr_ptr,
                           a_lr, a_momentum, a_weight_decay, a_buf_decay, a_grad_weight,
                           False, A_UPDATE, A_FLAGS, A_LR_FROM_PTR, ACC_DTYPE, 1, BLOCK_P, BLOCK_COLS)
        for block in range(0, tl.cdiv(b_n_cols, BLOCK_COLS)):
            finish_columns(partials_ptr, n_programs, stride_partials, block, b_col_start, b_n_cols,
                           scale, partials_ptr, b_out_ptr, b_buf_ptr, b_lr_ptr,
                           b_lr, b_momentum, b_weight_decay, b_buf_decay, b_grad_weight,
                           False, B_UPDATE, B_FLAGS, B_LR_FROM_PTR, ACC_DTYPE, 1, BLOCK_P, BLOCK_COLS)
        total = loss_sum(partials_ptr, n_programs, stride_partials, loss_column, ACC_DTYPE, BLOCK_P)
        tl.store(loss_ptr, total * f64_scalar(loss_scale, ACC_DTYPE))
        tl.store(ticket_ptr, 0)  # ready for the next launch (stream order puts it after this one)


def plan_linear_mse_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    targets: list[ColumnTarget],
    *,
    scale: float,
    loss_out: torch.Tensor,
    loss_scale: float,
    row_index: torch.Tensor | None = None,
    store_residual: bool = False,
    input_precision: str = "ieee",
    partials: torch.Tensor | None = None,
    ticket: torch.Tensor | None = None,
    config: TileConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, GradPartials, torch.Tensor]:
    """The one-launch step and its outputs: (plan, partial sums, ticket counter).

    targets: up to two ColumnTargets of the partial buffer's columns (weight's
    at 0, bias's at O·D; see GradPartials), each updated in place by SGD
    (hyper set) or given its gradient: g = scale · Σ_p partials[p, cols]. The
    loss, loss_scale · Σ R², goes to loss_out (0-d). partials (P, K) and
    ticket (an int32 zero) may be given to reuse them (the repeat-call path);
    otherwise they are made here.
    """
    if len(targets) > 2:
        raise ValueError(f"one launch takes at most two targets, got {len(targets)}")
    grad, sums = plan_linear_mse_partials(x, weight, bias, target, row_index=row_index, store_residual=store_residual,
                                          input_precision=input_precision, config=config, profile=profile)
    if partials is not None:  # the caller's buffer (same shape and dtype) instead of the fresh one
        if partials.shape != sums.buffer.shape or partials.dtype != sums.buffer.dtype:
            raise ValueError(f"partials must be {tuple(sums.buffer.shape)} {sums.buffer.dtype}, got "
                             f"{tuple(partials.shape)} {partials.dtype}")
        sums = GradPartials(partials, sums.residual, sums.n_rows, sums.out_features, sums.in_features)
    buffer = sums.buffer
    if ticket is None:
        ticket = torch.zeros(1, device=buffer.device, dtype=torch.int32)
    args = dict(grad.args)
    args.update(partials_ptr=buffer, stride_partials=buffer.stride(0),
                row_index_ptr=args["row_index_ptr"] if row_index is not None else buffer,
                residual_ptr=args["residual_ptr"] if store_residual else buffer)
    a, a_constants = target_args("a", targets[0] if targets else None, buffer)
    b, b_constants = target_args("b", targets[1] if len(targets) == 2 else None, buffer)
    args.update(a, **b, ticket_ptr=ticket, loss_ptr=loss_out, scale=float(scale), loss_scale=float(loss_scale),
                loss_column=sums.loss_column)
    # Pointers the kernel never reads here are None (compile-time constants): fewer arguments for the
    # launcher to convert at every launch, and the same code.
    unused = [name for name, absent in (("row_index_ptr", row_index is None), ("residual_ptr", not store_residual),
                                        ("b_ptr", bias is None)) if absent]
    for slot, constants in (("a", a_constants), ("b", b_constants)):
        if not constants[f"{slot.upper()}_FLAGS"] & specs.MOMENTUM or not constants[f"{slot.upper()}_UPDATE"]:
            unused.append(f"{slot}_buf_ptr")
        if not constants[f"{slot.upper()}_LR_FROM_PTR"]:
            unused.append(f"{slot}_lr_ptr")
    args.update(dict.fromkeys(unused))
    lanes = summation_lanes(buffer.shape[0])
    acc = _acc_of(buffer, *(t.out for t in targets))
    constexprs = dict(grad.constexprs, **a_constants, **b_constants, ACC_DTYPE=_TL_ACC[acc], BLOCK_P=lanes,
                      BLOCK_COLS=max(16, min(256, 8192 // lanes)))
    plan = LaunchPlan(_linear_mse_step_kernel, grad.grid, args, constexprs, grad.num_warps, grad.num_stages)
    return plan, sums, ticket
