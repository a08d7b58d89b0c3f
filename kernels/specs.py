"""Plain data that the kernels take and return: the partial-sum layout and
the SGD hyper-parameters. No Triton here, so the pure-PyTorch reference
shares these definitions on machines without it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GradPartials:
    """Per-program sums from one pass over a batch.

    buffer:   (P, K) with K = O·D + O + 1, columns [dW (O·D, row-major) | db (O) | loss (1)]
    residual: (n_rows, O) R = X·Wᵀ + b − T, or None when it was not kept
    """

    buffer: torch.Tensor
    residual: torch.Tensor | None
    n_rows: int
    out_features: int
    in_features: int

    @property
    def weight_columns(self) -> tuple[int, int]:
        return 0, self.out_features * self.in_features

    @property
    def bias_columns(self) -> tuple[int, int]:
        return self.out_features * self.in_features, self.out_features

    @property
    def loss_column(self) -> int:
        return self.out_features * self.in_features + self.out_features


def gradient_pass(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                  row_index: torch.Tensor | None, n_programs: int, acc: torch.dtype,
                  store_residual: bool) -> tuple[dict, GradPartials]:
    """The runtime arguments every gradient-pass kernel takes (linear_mse_grad, grad_rows,
    grad_chunks: one signature) and its outputs, allocated, not yet written: a partial row per
    program and, where kept, the residual. A missing bias, row index or residual passes another
    pointer in its place (the kernel's constexpr flags keep it unread)."""
    n_rows = row_index.numel() if row_index is not None else x.shape[0]
    out_features, in_features = weight.shape
    partials = torch.empty((n_programs, out_features * in_features + out_features + 1), device=x.device, dtype=acc)
    residual = torch.empty((n_rows, out_features), device=x.device, dtype=acc) if store_residual else None
    args = dict(
        x_ptr=x, w_ptr=weight, b_ptr=bias if bias is not None else weight, t_ptr=target,
        row_index_ptr=row_index if row_index is not None else partials, partials_ptr=partials,
        residual_ptr=residual if residual is not None else partials,
        n_rows=n_rows, D=in_features, O=out_features, n_programs=n_programs,
        stride_xn=x.stride(0), stride_xd=x.stride(1), stride_wo=weight.stride(0), stride_wd=weight.stride(1),
        stride_tn=target.stride(0), stride_to=target.stride(1),
        stride_index=row_index.stride(0) if row_index is not None else 1, stride_partials=partials.stride(0),
    )
    return args, GradPartials(partials, residual, n_rows, out_features, in_features)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Bits of SGDHyper.flags: which branches of the update a kernel compiles.
MAXIMIZE = 1
WEIGHT_DECAY = 2
MOMENTUM = 4
NESTEROV = 8


@dataclass(frozen=True)
class SGDHyper:
    """One param group's SGD hyper-parameters. Floats are passed to kernels
    as runtime values, so changing them (an LR schedule) never recompiles.

    lr_tensor: the learning rate as a one-element tensor on the parameters'
    device, read there by the kernels (a schedule that changes it in place
    needs no host sync and no recompile); ``lr`` is then not used.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    lr_tensor: torch.Tensor | None = field(default=None, compare=False)

    @property
    def flags(self) -> int:
        """Which branches of the update exist; a constexpr of the kernels."""
        return (
            MAXIMIZE * self.maximize
            | WEIGHT_DECAY * (self.weight_decay != 0)
            | MOMENTUM * (self.momentum != 0)
            | NESTEROV * self.nesterov
        )


@dataclass(frozen=True)
class ColumnTarget:
    """Where a run of partial-buffer columns goes once summed and scaled.

    out: contiguous, n_cols = out.numel() elements; the gradient is written
    there (hyper None), or out is a parameter that SGD updates in place.
    momentum_buffer: like out, needed where hyper.momentum != 0;
    init_buffer: it is new (zero-filled) and the step sets it to the gradient.
    """

    col_start: int
    out: torch.Tensor
    hyper: SGDHyper | None = None
    momentum_buffer: torch.Tensor | None = None
    init_buffer: bool = False

    def __post_init__(self) -> None:
        if self.hyper is not None and self.hyper.momentum != 0 and self.momentum_buffer is None:
            raise ValueError("momentum != 0 needs a momentum buffer")
