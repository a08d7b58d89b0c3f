"""Inference, "chunks" formulation: Y = X·Wᵀ + b with D in separately loaded chunks, for wide and deep data.

The forward half of grad_chunks.py: a persistent program loads W's chunks once
(Wᵀ, so the compiler keeps them in shared memory for the whole loop), and for
each row tile chains the NC chunk products into one accumulator, X₀·W₀ᵀ + X₁·W₁ᵀ
+ …: one FMA chain per output and no cross-warp sum. "ieee" products run on the
FMA units (exact, like cuBLAS's IEEE GEMM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .blocks import ChunksConfig, chunks_forward_config
from .device import DeviceProfile, device_profile
from .grad_chunks import load_wt_chunks, load_x_chunk
from .plan import LaunchPlan
from .specs import accumulator_dtype


@triton.jit
def _chunks_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    n_rows, D, O, n_programs,
    stride_xn, stride_xd, stride_wo, stride_wd, stride_yn, stride_yo,
    HAS_BIAS: tl.constexpr, MASK_D: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, K_CHUNK: tl.constexpr, NC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    wt = load_wt_chunks(w_ptr, offs_o, mask_o, D, stride_wo, stride_wd, tl.float32, NC, K_CHUNK)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    for tile in tl.range(pid, n_tiles, n_programs, num_stages=NUM_STAGES):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        rows = offs_n.to(tl.int64)
        for c in tl.static_range(NC):
            xc = load_x_chunk(x_ptr, rows, mask_n, c, D, stride_xn, stride_xd, tl.float32, MASK_D, K_CHUNK)
            if c == 0:
                y = tl.dot(xc, wt[c], input_precision="ieee", out_dtype=tl.float32)
            else:
                y = tl.dot(xc, wt[c], y, input_precision="ieee", out_dtype=tl.float32)
        if HAS_BIAS:
            y += bias[None, :]
        tl.store(y_ptr + rows[:, None] * stride_yn + offs_o[None, :] * stride_yo, y,
                 mask=mask_n[:, None] & mask_o[None, :])


def plan_chunks_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
    config: ChunksConfig | None = None,
    profile: DeviceProfile | None = None,
) -> tuple[LaunchPlan, torch.Tensor]:
    """The launch of chunks_forward and its (not yet written) output (fp32 accumulation, IEEE FMAs)."""
    n_rows, in_features = x.shape
    out_features = weight.shape[0]
    if accumulator_dtype(weight.dtype) != torch.float32:
        raise ValueError("the chunks formulation accumulates in fp32 (tl.dot); fp64 runs the default kernel")
    profile = profile or device_profile(x.device)
    cfg = config or chunks_forward_config(in_features, out_features, profile, x.element_size())
    if cfg.k_chunk * cfg.chunks < in_features or cfg.block_o < out_features:
        raise ValueError(f"{cfg} does not cover D={in_features}, O={out_features}")
    y = torch.empty((n_rows, out_features), device=x.device, dtype=out_dtype)
    n_programs = max(1, min(triton.cdiv(n_rows, cfg.block_n), cfg.max_programs))
    args = dict(x_ptr=x, w_ptr=weight, b_ptr=bias if bias is not None else weight, y_ptr=y,
                n_rows=n_rows, D=in_features, O=out_features, n_programs=n_programs,
                stride_xn=x.stride(0), stride_xd=x.stride(1), stride_wo=weight.stride(0), stride_wd=weight.stride(1),
                stride_yn=y.stride(0), stride_yo=y.stride(1))
    constexprs = dict(HAS_BIAS=bias is not None, MASK_D=cfg.k_chunk * cfg.chunks != in_features,
                      NUM_STAGES=cfg.num_stages, BLOCK_N=cfg.block_n, BLOCK_O=cfg.block_o, K_CHUNK=cfg.k_chunk,
                      NC=cfg.chunks)
    return LaunchPlan(_chunks_forward_kernel, (n_programs,), args, constexprs, cfg.num_warps, cfg.num_stages), y


def chunks_forward(x, weight, bias, *, out_dtype: torch.dtype, config: ChunksConfig | None = None) -> torch.Tensor:
    """linear_forward.linear_forward (IEEE), in the chunks formulation."""
    plan, y = plan_chunks_forward(x, weight, bias, out_dtype=out_dtype, config=config)
    plan.launch()
    return y
