"""Inference kernel: Y = X·Wᵀ + b, one read of X, one write of Y.

One program per tile of BLOCK_N rows and BLOCK_O outputs (a 2-D grid). When
D fits one block (ONE_D_BLOCK, compile-time) a program loads its tile once;
otherwise it walks D in pipelined chunks of BLOCK_D. Half-precision inputs
are upcast on chip; products and sums run in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import DeviceProfile, TileConfig, device_profile, forward_config, forward_uses_library
from .plan import LaunchPlan, fitted
from .specs import accumulator_dtype
from .tiles import load_rows, x_times_wt


@triton.jit
def _linear_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    n_rows, D, O,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_yn, stride_yo,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_rows
    mask_o = offs_o < O
    rows = offs_n.to(tl.int64)
    if ONE_D_BLOCK:
        mask_d = offs_d < D
        x = load_rows(x_ptr, rows, offs_d, mask_n, mask_d, stride_xn, stride_xd, ACC_DTYPE)
        w = load_rows(w_ptr, offs_o, offs_d, mask_o, mask_d, stride_wo, stride_wd, ACC_DTYPE)
        acc = x_times_wt(x, w, INPUT_PRECISION, USE_DOT)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=ACC_DTYPE)
        for d0 in tl.range(0, D, BLOCK_D, num_stages=NUM_STAGES):
            dd = d0 + offs_d
            md = dd < D
            x = load_rows(x_ptr, rows, dd, mask_n, md, stride_xn, stride_xd, ACC_DTYPE)
            w = load_rows(w_ptr, offs_o, dd, mask_o, md, stride_wo, stride_wd, ACC_DTYPE)
            acc += x_times_wt(x, w, INPUT_PRECISION, USE_DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yn + offs_o[None, :] * stride_yo, acc,
             mask=mask_n[:, None] & mask_o[None, :])


def plan_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    input_precision: str = "ieee",
    config: TileConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, torch.Tensor]:
    """The launch of linear_forward and its (not yet written) output; profile: the device
    to plan for (default: x's device; the compile report plans for a GPU on the meta device)."""
    n_rows, in_features = x.shape
    out_features = weight.shape[0]
    acc = accumulator_dtype(weight.dtype)
    if acc == torch.float64:
        input_precision = "ieee"  # tf32 is a float32 mode
    profile = profile or device_profile(x.device)
    cfg = config or forward_config(in_features, out_features, profile, acc, input_precision, x.element_size())
    y = torch.empty((n_rows, out_features), device=x.device, dtype=out_dtype)

    def make(cfg: TileConfig) -> tuple[LaunchPlan, torch.Tensor]:
        grid = (triton.cdiv(n_rows, cfg.block_n), triton.cdiv(out_features, cfg.block_o))
        args = dict(x_ptr=x, w_ptr=weight, b_ptr=bias if bias is not None else weight, y_ptr=y,
                    n_rows=n_rows, D=in_features, O=out_features,
                    stride_xn=x.stride(0), stride_xd=x.stride(1), stride_wo=weight.stride(0),
                    stride_wd=weight.stride(1), stride_yn=y.stride(0), stride_yo=y.stride(1))
        constexprs = dict(HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision, USE_DOT=cfg.use_dot,
                          ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
                          ONE_D_BLOCK=cfg.block_d >= in_features, NUM_STAGES=cfg.num_stages,
                          BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_O=cfg.block_o)
        return LaunchPlan(_linear_forward_kernel, grid, args, constexprs, cfg.num_warps, cfg.num_stages), y

    if config is not None:  # the caller's config, as given
        return make(cfg)
    key = ("forward", cfg, profile, x.device, x.dtype, weight.dtype, out_dtype, bias is not None, input_precision)
    return fitted(make, cfg, profile, x.device, key)


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    input_precision: str = "ieee",
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x: (N, D) any strides, weight: (O, D), bias: (O,) or None -> (N, O) contiguous, out_dtype.

    IEEE fp32 inference of wide, deep or many-output problems runs PyTorch's GEMM instead
    (config.forward_uses_library: there the kernel's FMA dot was measured slower)."""
    if config is None and forward_uses_library(x.shape[1], weight.shape[0], device_profile(x.device), x.dtype,
                                               weight.dtype, input_precision):
        y = torch.nn.functional.linear(x, weight, bias)
        return y if y.dtype == out_dtype and y.is_contiguous() else y.to(out_dtype).contiguous()
    plan, y = plan_linear_forward(x, weight, bias, out_dtype=out_dtype, input_precision=input_precision,
                                  config=config)
    plan.launch()
    return y
