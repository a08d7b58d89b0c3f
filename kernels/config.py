"""Block sizes and grid sizes, chosen per shape, dtype and device.

These are heuristics (cached per shape key), not autotuned yet: the GPU numbers are starting points
that wait for a measurement on an H100/H200 (bench/NOTES.md). On the CPU the
kernels run in Triton's interpreter, where small row blocks keep the test
shapes exercising several tiles and several programs.

Products use tl.dot where it pays: O >= 16, or tf32 asked for (tensor
cores; half-precision inputs are upcast to fp32 first, so they go through
the same choice). Below that, and always for fp64, they are exact FMAs over
a 3-D broadcast (kernels/tiles.py), whose BLOCK_N·BLOCK_D·BLOCK_O temporary
is kept within a register budget.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from triton import next_power_of_2 as p2


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_d: int
    block_o: int
    use_dot: bool
    max_programs: int = 0  # the gradient kernel's grid cap (persistent programs)
    num_warps: int = 4


@dataclass(frozen=True)
class ReduceConfig:
    block_p: int
    block_cols: int
    num_warps: int = 4


_FMA_BUDGET = 8192  # elements of the 3-D broadcast temporary: 64 per thread at 4 warps


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _use_dot(out_features: int, acc_dtype: torch.dtype, input_precision: str) -> bool:
    if acc_dtype == torch.float64:
        return False
    return input_precision == "tf32" or out_features >= 16


def _fma_blocks(in_features: int, block_o: int, block_n: int | None) -> tuple[int, int]:
    """(block_n, block_d) for the broadcast products, within the register budget."""
    block_d = min(p2(in_features), 128, max(1, _FMA_BUDGET // (16 * block_o)))
    if block_n is None:
        block_n = min(64, max(1, _FMA_BUDGET // (block_d * block_o)))
    return block_n, block_d


@functools.lru_cache(maxsize=1024)
def grad_config(in_features: int, out_features: int, device: torch.device, acc_dtype: torch.dtype,
                input_precision: str) -> TileConfig:
    """Blocks of the single-pass gradient kernel; BLOCK_O always covers O."""
    use_dot = _use_dot(out_features, acc_dtype, input_precision)
    on_gpu = device.type == "cuda"
    if use_dot:
        block_o = max(16, p2(out_features))
        block_d = max(16, min(p2(in_features), 8192 // block_o, 256 if on_gpu else 64))
        block_n = (64 if block_d * block_o <= 4096 else 32) if on_gpu else 16
    else:
        block_o = p2(out_features)
        block_n, block_d = _fma_blocks(in_features, block_o, None if on_gpu else 16)
    if not on_gpu:
        return TileConfig(block_n, block_d, block_o, use_dot, max_programs=4)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return TileConfig(block_n, block_d, block_o, use_dot, max_programs=2 * _multiprocessor_count(index),
                      num_warps=8 if block_d * block_o >= 4096 else 4)


@functools.lru_cache(maxsize=1024)
def forward_config(in_features: int, out_features: int, device: torch.device, acc_dtype: torch.dtype,
                   input_precision: str) -> TileConfig:
    """Blocks of the inference kernel (O is tiled by the grid, so BLOCK_O may be < O)."""
    use_dot = _use_dot(out_features, acc_dtype, input_precision)
    on_gpu = device.type == "cuda"
    if use_dot:
        return TileConfig(block_n=64 if on_gpu else 16, block_d=max(16, min(p2(in_features), 128 if on_gpu else 64)),
                          block_o=max(16, min(p2(out_features), 64)), use_dot=True)
    block_o = min(p2(out_features), 16)
    block_n, block_d = _fma_blocks(in_features, block_o, None if on_gpu else 16)
    return TileConfig(block_n, block_d, block_o, use_dot=False)


def reduce_config(n_partials: int, device: torch.device) -> ReduceConfig:
    block_p = min(p2(max(n_partials, 1)), 64 if device.type == "cuda" else 4)
    return ReduceConfig(block_p=block_p, block_cols=256 if device.type == "cuda" else 64)
