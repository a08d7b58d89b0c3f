"""Blocks of the "rows", "chunks" and "mma" formulations (grad_rows.py, forward_rows.py, grad_chunks.py,
forward_chunks.py, grad_mma.py), and which problems each can serve. config.py decides whether they run.

rows: T lanes share a row, each owning C contiguous columns read V at a time (16 B, or all C when
that is less), and every output; W and the lane's dW (O·C values each) stay in registers for the
whole loop. C is chosen so that O·C <= 32 (the compile report: ~112 registers at O·C = 32, four
4-warp programs per SM, 16 resident warps), T = D/C lanes per row (at most 32: a row never leaves
its warp).

chunks: row tiles of BLOCK_N rows, D in NC chunks of K_CHUNK = 64 columns (the compile report:
at wide fp32's 32 rows, chunks of 32 spilled 8 B per thread and had 21 % more shared-memory loads;
64 did not), W's chunks staged once per program. One chunk (D <= 64): 32 rows, 4 warps, eight programs per SM. Wide data
(D <= 256): 32 rows, 4 warps, four programs per SM. Deep data: 16 rows, 8 warps, two programs per
SM (a 64 KB tile per pipeline stage). All two stages. Deep inference: 32 rows, 4 warps, unpipelined
(see chunks_forward_config).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from triton import cdiv
from triton import next_power_of_2 as p2

from .device import DeviceProfile

ROWS_MAX_OC = 32  # O·C of a lane: W and dW in registers (2·O·C values)
ROWS_MAX_LANES = 32
ROWS_MAX_O = 16
ROWS_PROGRAMS_PER_SM = 4  # ~112 registers per thread: four 4-warp programs fit an SM
ROWS_IN_FLIGHT = 32 * 1024  # bytes of loads per SM (>= ~25 KB, Little's law on an H100/H200)
ROWS_MAX_STAGES = 6
CHUNK_K = 64
CHUNKS_MAX_D = 1024  # 16 chunks: 16 dW accumulators of [O, 64], 8,192 values per program at O = 8
CHUNKS_MAX_O = 16


@dataclass(frozen=True)
class RowsConfig:
    """``lanes`` lanes share a row, each owning ``columns`` contiguous columns (``vec`` per load)."""

    lanes: int
    columns: int
    vec: int
    block_o: int
    num_warps: int = 4
    num_stages: int = 1
    max_programs: int = 1 << 30

    @property
    def rows(self) -> int:
        """Rows per tile: 32/lanes per warp."""
        return 32 // self.lanes * self.num_warps


@dataclass(frozen=True)
class ChunksConfig:
    """Row tiles of ``block_n`` rows, D in ``chunks`` separately loaded chunks of ``k_chunk`` columns."""

    block_n: int
    k_chunk: int
    chunks: int
    block_o: int
    num_warps: int = 4
    num_stages: int = 2
    max_programs: int = 1 << 30


def _rows_split(in_features: int, out_features: int, input_bytes: int) -> tuple[int, int, int] | None:
    """(lanes, columns, vec) of the rows layout, or None where it does not fit."""
    d = p2(in_features)
    columns = min(d, max(d // ROWS_MAX_LANES, ROWS_MAX_OC // p2(out_features), 1))
    if out_features > ROWS_MAX_O or p2(out_features) * columns > ROWS_MAX_OC:
        return None
    return d // columns, columns, min(max(1, 16 // input_bytes), columns)


def rows_fits(in_features: int, out_features: int, input_bytes: int) -> bool:
    return _rows_split(in_features, out_features, input_bytes) is not None


def chunks_fits(in_features: int, out_features: int) -> bool:
    return in_features <= CHUNKS_MAX_D and out_features <= CHUNKS_MAX_O


@functools.lru_cache(maxsize=1024)
def rows_config(in_features: int, out_features: int, profile: DeviceProfile, input_bytes: int) -> RowsConfig:
    """Blocks of the rows formulation (gradient and inference); ValueError where it does not fit."""
    split = _rows_split(in_features, out_features, input_bytes)
    if split is None:
        raise ValueError(f"the rows formulation does not fit D={in_features}, O={out_features}")
    lanes, columns, vec = split
    block_o = p2(out_features)
    if not profile.gpu:  # the interpreter: one warp, two programs, so small tests walk several tiles each
        return RowsConfig(lanes, columns, vec, block_o, num_warps=1, max_programs=2)
    # Four 4-warp programs per SM, each with enough tiles loading that the SM keeps ROWS_IN_FLIGHT bytes
    # of loads outstanding (tall fp32: 3 stages, two 4.3 KB tiles per program; bf16: 5 stages).
    tile_bytes = (32 // lanes * 4) * (in_features + out_features) * input_bytes
    stages = min(ROWS_MAX_STAGES, 1 + cdiv(ROWS_IN_FLIGHT, ROWS_PROGRAMS_PER_SM * tile_bytes))
    return RowsConfig(lanes, columns, vec, block_o, num_warps=4, num_stages=max(2, stages),
                      max_programs=ROWS_PROGRAMS_PER_SM * profile.multiprocessors)


rows_forward_config = rows_config


@functools.lru_cache(maxsize=1024)
def chunks_config(in_features: int, out_features: int, profile: DeviceProfile, input_bytes: int) -> ChunksConfig:
    """Blocks of the chunks gradient formulation; ValueError where it does not fit."""
    if not chunks_fits(in_features, out_features):
        raise ValueError(f"the chunks formulation does not fit D={in_features}, O={out_features}")
    block_o = p2(out_features)
    if not profile.gpu:  # chunks of 16 columns, two programs: small tests cross chunks and walk tiles
        k_chunk = min(16, max(1, p2(in_features)))
        return ChunksConfig(16, k_chunk, cdiv(in_features, k_chunk), block_o, num_warps=1, num_stages=1,
                            max_programs=2)
    k_chunk = min(CHUNK_K, max(16, p2(in_features)))
    chunks = cdiv(in_features, k_chunk)
    if in_features <= CHUNK_K:  # one chunk: ~40 registers, 10 KB per program; 8 programs keep 32 warps per SM
        return ChunksConfig(32, k_chunk, chunks, block_o, num_warps=4, num_stages=2,
                            max_programs=8 * profile.multiprocessors)
    if in_features <= 256:
        return ChunksConfig(32, k_chunk, chunks, block_o, num_warps=4, num_stages=2,
                            max_programs=4 * profile.multiprocessors)
    return ChunksConfig(16, k_chunk, chunks, block_o, num_warps=8, num_stages=2,
                        max_programs=2 * profile.multiprocessors)


@functools.lru_cache(maxsize=1024)
def chunks_forward_config(in_features: int, out_features: int, profile: DeviceProfile,
                          input_bytes: int) -> ChunksConfig:
    """Blocks of the chunks inference formulation: as the gradient's, with no dW to hold."""
    cfg = chunks_config(in_features, out_features, profile, input_bytes)
    if profile.gpu and in_features > 256:
        # Pipeline buffers of 64 KB tiles would leave room for one program per SM; unpipelined, each chunk
        # is staged only while its product runs (~40 KB per program): four 4-warp programs per SM, and
        # every chunk's load of a tile is issued before its products (128 KB of loads per program).
        return ChunksConfig(32, cfg.k_chunk, cfg.chunks, cfg.block_o, num_warps=4, num_stages=1,
                            max_programs=4 * profile.multiprocessors)
    return cfg



MMA_MIN_O = 8  # an MMA's smallest N (m16n8k16): O is padded to it
MMA_MIN = 16  # tl.dot's smallest other block on a GPU


@functools.lru_cache(maxsize=1024)
def mma_config(in_features: int, out_features: int, profile: DeviceProfile) -> ChunksConfig:
    """Blocks of the mma gradient formulation (bf16 X on tensor cores; grad_mma.py): the chunks walk.

    From the sm_90 compile report (Triton 3.9; 3.6 where it differs): one chunk (tall) takes 64-row
    tiles, 92 registers, five 4-warp programs fit an SM (3.6: 168, three); D <= 256 takes 16-row tiles
    (32 rows: 164 registers, three programs; 64: spills), 125 registers, four programs, 16 resident
    warps; deeper data hold NC chunks of X and dW in registers, 16-row tiles on 8 warps, 150 registers:
    one program per SM (3.6: 102, two; 4 warps spill).
    """
    if not chunks_fits(in_features, out_features):
        raise ValueError(f"the mma formulation does not fit D={in_features}, O={out_features}")
    if not profile.gpu:  # as the chunks formulation's: small tests cross chunks and walk tiles
        return chunks_config(in_features, out_features, profile, 2)
    block_o = max(MMA_MIN_O, p2(out_features))
    k_chunk = min(CHUNK_K, max(MMA_MIN, p2(in_features)))
    chunks = cdiv(in_features, k_chunk)
    if in_features <= CHUNK_K:
        return ChunksConfig(64, k_chunk, chunks, block_o, num_warps=4, num_stages=3,
                            max_programs=4 * profile.multiprocessors)
    if in_features <= 256:
        return ChunksConfig(16, k_chunk, chunks, block_o, num_warps=4, num_stages=3,
                            max_programs=4 * profile.multiprocessors)
    # Two programs per SM: Triton 3.6 compiles it in 102 registers (two fit, 16 warps); 3.9 in 150 (one
    # fits; the second program per SM runs after the first, the same tiles in all).
    return ChunksConfig(16, k_chunk, chunks, block_o, num_warps=8, num_stages=2,
                        max_programs=2 * profile.multiprocessors)
