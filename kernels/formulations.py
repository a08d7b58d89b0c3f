"""The gradient pass and inference in whichever formulation config.choose_formulation decides.

Every gradient formulation writes the same partial buffer (specs.GradPartials: one row per
program, columns [dW (O·D, row-major) | db (O) | loss (1)]), so reduce_update.py finishes any of
them; every inference formulation returns Y (N, O). "mma" (bf16 X on tensor cores) is a gradient
formulation only. ``formulation="auto"`` is the default kernel until a formulation has been
checked on a GPU (config.GPU_CHECKED); tests and the GPU check name one ("rows", "chunks", "mma",
"default") to run it. Every path of the library plans its passes here (backend.py, kernels/step.py,
loss_cache.py), so what config decides is what runs.
"""

from __future__ import annotations

import torch

from .config import choose_formulation, device_profile
from .plan import LaunchPlan
from .specs import GradPartials, accumulator_dtype


def formulation_of(x: torch.Tensor, weight: torch.Tensor, input_precision: str, formulation: str = "auto",
                   profile=None, kind: str = "grad") -> str:
    """The formulation a pass ("grad" or "forward") over x with this weight runs in (one rule for both)."""
    acc = accumulator_dtype(weight.dtype)
    precision = "ieee" if acc == torch.float64 else input_precision
    return choose_formulation(weight.shape[1], weight.shape[0], profile or device_profile(x.device), acc, precision,
                              x.dtype, formulation, kind)


def plan_grad_partials(x, weight, bias, target, *, row_index=None, store_residual=False, input_precision="ieee",
                       formulation: str = "auto", profile=None) -> tuple[LaunchPlan, GradPartials]:
    """The launch of the gradient pass (see linear_mse_grad.linear_mse_partials) and its outputs."""
    name = formulation_of(x, weight, input_precision, formulation, profile)
    kw = dict(row_index=row_index, store_residual=store_residual, profile=profile)
    if name == "rows":
        from .grad_rows import plan_rows_partials

        return plan_rows_partials(x, weight, bias, target, **kw)
    if name == "chunks":
        from .grad_chunks import plan_chunks_partials

        return plan_chunks_partials(x, weight, bias, target, input_precision=input_precision, **kw)
    if name == "mma":
        from .grad_mma import plan_mma_partials

        return plan_mma_partials(x, weight, bias, target, **kw)
    from .linear_mse_grad import plan_linear_mse_partials

    return plan_linear_mse_partials(x, weight, bias, target, input_precision=input_precision, **kw)


def grad_partials(x, weight, bias, target, *, row_index=None, store_residual=False, input_precision="ieee",
                  formulation: str = "auto") -> GradPartials:
    """One pass over the rows of a batch: partial loss, db and dW sums, in the decided formulation."""
    plan, partials = plan_grad_partials(x, weight, bias, target, row_index=row_index, store_residual=store_residual,
                                        input_precision=input_precision, formulation=formulation)
    plan.launch()
    return partials


def plan_forward(x, weight, bias, *, out_dtype: torch.dtype, input_precision="ieee", formulation: str = "auto",
                 profile=None) -> tuple[LaunchPlan, torch.Tensor]:
    """The launch of inference (see linear_forward.linear_forward) and its output. The default
    formulation's routing of some IEEE shapes to PyTorch's GEMM is linear_forward's, not here."""
    name = formulation_of(x, weight, input_precision, formulation, profile, kind="forward")
    if name == "rows":
        from .forward_rows import plan_rows_forward

        return plan_rows_forward(x, weight, bias, out_dtype=out_dtype, profile=profile)
    if name == "chunks":
        from .forward_chunks import plan_chunks_forward

        return plan_chunks_forward(x, weight, bias, out_dtype=out_dtype, profile=profile)
    from .linear_forward import plan_linear_forward

    return plan_linear_forward(x, weight, bias, out_dtype=out_dtype, input_precision=input_precision,
                               profile=profile)


def forward(x, weight, bias, *, out_dtype: torch.dtype, input_precision="ieee",
            formulation: str = "auto") -> torch.Tensor:
    """Y = X·Wᵀ + b in the decided formulation (the default one as linear_forward runs it)."""
    name = formulation_of(x, weight, input_precision, formulation, kind="forward")  # decided once per call
    if name == "default":
        from .linear_forward import linear_forward

        return linear_forward(x, weight, bias, out_dtype=out_dtype, input_precision=input_precision)
    plan, y = plan_forward(x, weight, bias, out_dtype=out_dtype, input_precision=input_precision, formulation=name)
    plan.launch()
    return y
