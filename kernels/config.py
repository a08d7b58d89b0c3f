"""Block sizes and grid sizes, chosen per shape and device.

These are heuristics, not autotuned yet: the GPU numbers are starting points
that wait for a measurement on an H100/H200 (see bench/NOTES.md). On the CPU
the kernels run in Triton's interpreter, where small blocks keep the test
shapes exercising several tiles and several programs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class GradConfig:
    block_n: int
    block_d: int
    block_o: int
    max_programs: int
    num_warps: int = 4


@dataclass(frozen=True)
class ReduceConfig:
    block_p: int
    block_cols: int
    num_warps: int = 4


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dot_block(n: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, min(triton.next_power_of_2(n), cap))


def grad_config(n_rows: int, in_features: int, out_features: int, device: torch.device) -> GradConfig:
    block_o = _dot_block(out_features, 1 << 30)
    if device.type != "cuda":
        return GradConfig(block_n=16, block_d=_dot_block(in_features, 64), block_o=block_o, max_programs=4)
    # Keep the X tile plus the BLOCK_O × BLOCK_D dW accumulator within registers.
    block_d = _dot_block(in_features, max(16, 8192 // block_o))
    block_n = 64 if block_d * block_o <= 4096 else 32
    programs = 2 * _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
    return GradConfig(block_n=block_n, block_d=block_d, block_o=block_o, max_programs=programs,
                      num_warps=8 if block_d >= 256 else 4)


def reduce_config(n_partials: int, device: torch.device) -> ReduceConfig:
    block_p = min(triton.next_power_of_2(max(n_partials, 1)), 64 if device.type == "cuda" else 4)
    return ReduceConfig(block_p=block_p, block_cols=256 if device.type == "cuda" else 64)


def forward_config(in_features: int, out_features: int, device: torch.device) -> GradConfig:
    block_o = _dot_block(out_features, 64)
    if device.type != "cuda":
        return GradConfig(block_n=16, block_d=_dot_block(in_features, 64), block_o=block_o, max_programs=0)
    return GradConfig(block_n=64, block_d=_dot_block(in_features, 128), block_o=block_o, max_programs=0)
