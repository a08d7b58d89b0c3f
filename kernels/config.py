"""Block sizes, warps, pipeline stages and grid sizes, chosen per shape, dtype and device.

Measured choices first (MEASURED_GRAD, MEASURED_FORWARD: the fastest blocks of
bench/sweep.py on an H200 for the shapes it swept), then the rules below (cached
per shape key); not autotuned at run time. bench/compile_report.py compiles what
they choose for every benchmark regime and awkward shapes and shows whether it
fits an sm_90/sm_80 (shared memory, registers, spills) and how many bytes each SM
keeps in flight; bench/NOTES.md has the timings. On the CPU the kernels run in
Triton's interpreter, where small blocks keep the test shapes exercising several
tiles and several programs.

GPU rules:

- Row tiles are sized by BYTES (a bf16 tile holds twice the rows of an fp32
  one), and the row-tile loop is software-pipelined (``num_stages``), so a
  program has ``num_stages − 1`` tiles loading while it computes one; with
  the programs sharing an SM that keeps ~32 KB of loads in flight per SM
  (by Little's law about 25 KB covers the memory latency of an H100/H200).
- Products of fp32 accumulation (fp32 and half-precision inputs) are tl.dot:
  on tensor cores for "tf32"/"tf32x3", on the FMA units for "ieee" (exact
  FMAs, each thread summing over K in registers, which the compile report
  shows is ~1 FMA per multiply-add). fp64 uses FMAs over a 3-D broadcast
  (kernels/tiles.py) whose BLOCK_N·BLOCK_D·BLOCK_O products are kept within
  a per-thread register budget.
- D is held in one block up to MAX_ONE_BLOCK_D (``one_d_block``: the
  kernels then have no chunk loop); beyond, the kernels walk D in chunks.
- Warps grow with the x tile and dW so that neither takes more than ~64
  registers per thread: no launch spills (tests/test_compile.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from triton import cdiv
from triton import next_power_of_2 as p2


@dataclass(frozen=True)
class DeviceProfile:
    """What the block choice needs to know about the device (shared memory in bytes)."""

    gpu: bool
    multiprocessors: int = 1
    shared_per_block: int = 166912  # the opt-in maximum of one program (an A100's, the smallest of sm_80/sm_90)
    shared_per_sm: int = 167936


INTERPRETER = DeviceProfile(gpu=False)


@functools.lru_cache(maxsize=None)
def device_profile(device: torch.device) -> DeviceProfile:
    """The profile of a torch device: a CUDA GPU, or the interpreter (anything else)."""
    if device.type != "cuda":
        return INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    per_block = getattr(props, "shared_memory_per_block_optin", DeviceProfile.shared_per_block)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", per_block + 1024)
    return DeviceProfile(gpu=True, multiprocessors=props.multi_processor_count, shared_per_block=per_block,
                         shared_per_sm=per_sm)


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_d: int
    block_o: int
    use_dot: bool
    max_programs: int = 0  # the gradient kernel's grid cap (persistent programs); 0: one per tile
    num_warps: int = 4
    num_stages: int = 1  # software-pipeline depth of the row-tile loop (inference: the D loop); 1: none


@dataclass(frozen=True)
class ReduceConfig:
    block_p: int
    block_cols: int
    num_warps: int = 4
    num_stages: int = 1


IN_FLIGHT_PER_SM = 32 * 1024  # bytes of loads each SM should have outstanding (>= ~25 KB, Little's law)
TILE_BYTES = 16 * 1024  # target bytes of X (+T) per row tile
MAX_STAGE_BYTES = 160 * 1024  # shared memory for one program's pipeline buffers
SHARED_MARGIN = 16 * 1024  # what the compiler adds besides the estimate (reductions, layout conversions)
MAX_PROGRAMS_PER_SM = 4
MAX_STAGES = 6
MAX_ONE_BLOCK_D = 1024  # larger D is walked in chunks of CHUNK_D
CHUNK_D = 256
W_ELEMENTS = 8192  # BLOCK_O·BLOCK_D of the gradient kernel's W (and dW) tile, held in registers
FORWARD_CHUNK_D = 64  # D chunk of the inference kernel beyond one block (32 for tf32x3)
FMA_PRODUCTS_PER_THREAD = 64  # fp64 broadcast products: BLOCK_N·BLOCK_D·BLOCK_O / threads


def _use_dot(acc_dtype: torch.dtype) -> bool:
    """tl.dot for fp32 accumulation: tensor cores in "tf32"/"tf32x3", FMA units in "ieee".
    fp64 uses the broadcast FMAs (tl.dot has no fp64 path on every Triton release)."""
    return acc_dtype != torch.float64


def _rows_for_bytes(row_bytes: int, lo: int, hi: int) -> int:
    """The power-of-two row count whose tile is about TILE_BYTES, within [lo, hi]."""
    return max(lo, min(hi, p2(max(1, TILE_BYTES // row_bytes))))


def _pipeline(tile_bytes: int, extra_bytes: int, profile: DeviceProfile) -> tuple[int, int]:
    """(num_stages, programs per SM) for a pipelined row-tile loop: each program keeps
    num_stages − 1 tiles loading (IN_FLIGHT_PER_SM bytes if its buffers allow), and two
    programs share an SM where their shared memory fits, so one computes while the other
    waits. extra_bytes: shared memory a program needs besides its pipeline buffers."""
    budget = profile.shared_per_block - SHARED_MARGIN
    stages = max(2, min(MAX_STAGES, 1 + cdiv(IN_FLIGHT_PER_SM, tile_bytes)))
    while stages > 2 and stages * tile_bytes + extra_bytes > min(budget, MAX_STAGE_BYTES):
        stages -= 1
    per_program = stages * tile_bytes + extra_bytes + 1024
    programs = max(2, cdiv(IN_FLIGHT_PER_SM, (stages - 1) * tile_bytes))
    programs = min(programs, MAX_PROGRAMS_PER_SM, max(1, profile.shared_per_sm // per_program))
    return stages, programs


def _shared_estimate(block_n: int, block_d: int, block_o: int, tile_bytes: int, stages: int, input_bytes: int,
                     input_precision: str) -> int:
    """Shared memory of a dot-path program (an upper bound of what the compile report measures):
    the pipeline buffers, the fp32 operand tiles of the dots as their layouts are converted (the
    x tile, twice when inputs are upcast; the W tile), both twice for tf32x3 (high and low parts),
    and SHARED_MARGIN for the reductions."""
    parts = 2 if input_precision == "tf32x3" else 1
    x_operand = (2 if input_bytes < 4 else 1) * block_n * block_d * 4
    # Measured (sm_90, sm_80): a W tile of BLOCK_O < 16 rows is not staged through shared memory.
    w_operand = block_o * block_d * 4 if block_o >= 16 else 0
    return stages * tile_bytes + parts * (x_operand + w_operand) + SHARED_MARGIN


# ---------------------------------------------------------------- measured choices
# The fastest blocks of bench/sweep.py on an H200 (torch 2.11.0, Triton 3.6.0, 2026-11-26; the
# data: bench/results/H200-2026-11-26-sweep.json), for the shapes it swept: D classes 64, 256,
# 1024 (D up to 64, up to 256, up to 1024) with O <= 16: the fastest of those that do not spill
# registers when compiled by the Triton these tests run (tests/test_compile.py; a few faster ones
# spill 8-64 B/thread with Triton 3.9 or 3.6) and whose row-tile loop is pipelined (D in one block: the
# sweep's faster D-chunked deep tf32 runs predate the unpipelined chunk loops). Elsewhere, and where a choice would not fit this card's
# shared memory, the rules below decide.
MEASURED_SHARED_PER_BLOCK = 232448
#   gradient: (precision, input bytes, D class) -> (BLOCK_N, D in chunks of CHUNK_D?, warps, stages, programs per SM)
MEASURED_GRAD: dict[tuple[str, int, int], tuple[int, bool, int, int, int]] = {
    ("ieee", 4, 64): (128, False, 4, 3, 2), ("tf32", 4, 64): (64, False, 4, 2, 4),
    ("tf32x3", 4, 64): (128, False, 4, 2, 2),
    ("ieee", 2, 64): (128, False, 4, 3, 2), ("tf32x3", 2, 64): (16, False, 4, 6, 4),
    ("ieee", 4, 256): (32, False, 4, 2, 2),
    ("tf32x3", 4, 256): (16, False, 4, 2, 2),
    ("ieee", 2, 256): (32, False, 4, 2, 2), ("tf32x3", 2, 256): (16, False, 4, 3, 2),
    ("ieee", 4, 1024): (16, False, 8, 3, 1), ("tf32", 4, 1024): (16, False, 8, 2, 1),
    ("tf32x3", 4, 1024): (16, False, 8, 2, 1),
    ("ieee", 2, 1024): (16, False, 8, 3, 1), ("tf32x3", 2, 1024): (16, False, 8, 3, 1),
}
#   inference, fp32: (precision, D class, O class 16 or 256) -> (BLOCK_N, BLOCK_D (0: one block), BLOCK_O cap, warps)
MEASURED_FORWARD: dict[tuple[str, int, int], tuple[int, int, int, int]] = {
    ("ieee", 64, 16): (128, 0, 16, 4), ("tf32", 64, 16): (64, 0, 16, 8), ("tf32x3", 64, 16): (64, 0, 16, 4),
    ("ieee", 256, 16): (64, 0, 16, 4), ("tf32", 256, 16): (64, 0, 16, 8), ("tf32x3", 256, 16): (16, 0, 16, 4),
    ("ieee", 1024, 16): (32, 256, 16, 4), ("tf32", 1024, 16): (64, 256, 16, 4),
    ("tf32x3", 1024, 16): (16, 256, 16, 4),
    ("tf32", 64, 256): (128, 0, 64, 8),
}


def forward_uses_library(in_features: int, out_features: int, profile: DeviceProfile, x_dtype: torch.dtype,
                         weight_dtype: torch.dtype, input_precision: str) -> bool:
    """Whether IEEE fp32 inference should run as PyTorch's own GEMM (cuBLAS) rather than the kernel.

    Measured on the H200 (bench/results/H200-2026-11-26*.json): the IEEE FMA dot of the inference
    kernel is 0.38-0.62x nn.Linear's GEMM once D > 64 or O > 16 (wide, deep, many outputs), and
    1.13x it on tall data (D = 64, O = 4). Only where the GEMM computes the same thing: fp32
    inputs and weights, and PyTorch's float32 matmuls set to IEEE ("highest").
    """
    return (profile.gpu and input_precision == "ieee" and x_dtype == weight_dtype == torch.float32
            and torch.get_float32_matmul_precision() == "highest" and (p2(in_features) > 64 or out_features > 16))


def _d_class(in_features: int) -> int | None:
    d = p2(in_features)
    return 64 if d <= 64 else 256 if d <= 256 else 1024 if d <= 1024 else None


def _measured_grad(in_features: int, out_features: int, profile: DeviceProfile, input_precision: str,
                   input_bytes: int) -> TileConfig | None:
    """MEASURED_GRAD's choice for this problem, if it has one that fits the card."""
    d_class = _d_class(in_features)
    entry = MEASURED_GRAD.get((input_precision, input_bytes, d_class)) if out_features <= 16 else None
    if entry is None:
        return None
    block_n, chunked, num_warps, num_stages, per_sm = entry
    block_o = p2(out_features)
    block_d = CHUNK_D if chunked and in_features > CHUNK_D else max(16, p2(in_features))
    one_block = block_d >= in_features
    tile_bytes = block_n * ((in_features if one_block else block_d) + out_features) * input_bytes
    # Each entry ran on the H200 (an sm_90 block's 232,448 B); a card with less shared memory per
    # block takes it only where the (conservative) estimate fits.
    if profile.shared_per_block < MEASURED_SHARED_PER_BLOCK and _shared_estimate(
            block_n, block_d, block_o, tile_bytes, num_stages, input_bytes, input_precision) > profile.shared_per_block:
        return None
    return TileConfig(block_n, block_d, block_o, True, max_programs=per_sm * profile.multiprocessors,
                      num_warps=num_warps, num_stages=num_stages)


def _measured_forward(in_features: int, out_features: int, input_precision: str,
                      input_bytes: int) -> TileConfig | None:
    """MEASURED_FORWARD's choice (fp32 inputs), if it has one."""
    o_class = 16 if out_features <= 16 else 256 if out_features <= 256 else None
    entry = MEASURED_FORWARD.get((input_precision, _d_class(in_features), o_class)) if input_bytes == 4 else None
    if entry is None:
        return None
    block_n, block_d, block_o_cap, num_warps = entry
    block_d = block_d if block_d and in_features > block_d else max(16, p2(in_features))
    block_o = min(p2(out_features), block_o_cap)
    return TileConfig(block_n, block_d, block_o, True, num_warps=num_warps,
                      num_stages=1 if block_d >= in_features else 3)


def _fp64_blocks(in_features: int, block_o: int, num_warps: int) -> tuple[int, int]:
    """(block_n, block_d) of the fp64 broadcast products on a GPU, within the register budget."""
    budget = FMA_PRODUCTS_PER_THREAD * 32 * num_warps
    block_d = min(p2(in_features), MAX_ONE_BLOCK_D, max(1, budget // (2 * block_o)))
    return max(1, min(budget // (block_d * block_o), 32)), block_d


@functools.lru_cache(maxsize=1024)
def grad_config(in_features: int, out_features: int, profile: DeviceProfile, acc_dtype: torch.dtype,
                input_precision: str, input_bytes: int) -> TileConfig:
    """Blocks of the single-pass gradient kernel; BLOCK_O always covers O.

    input_bytes: bytes per element of X and T (2 for bf16/fp16, 4, 8).
    """
    use_dot = _use_dot(acc_dtype)
    block_o = p2(out_features)
    if not profile.gpu:  # the interpreter: small blocks, several tiles and programs in the tests
        if use_dot:
            return TileConfig(16, max(16, min(p2(in_features), 64)), block_o, True, max_programs=4)
        return TileConfig(16, min(p2(in_features), 128, max(1, 8192 // (16 * block_o))), block_o, False,
                          max_programs=4)
    measured = _measured_grad(in_features, out_features, profile, input_precision, input_bytes) if use_dot else None
    if measured is not None:
        return measured
    if use_dot:
        # tf32x3 holds a high and a low part of each operand: chunks of CHUNK_D beyond that.
        # W and dW stay in registers: BLOCK_O·BLOCK_D <= W_ELEMENTS, chunks of D beyond that.
        one_block_d = min(CHUNK_D if input_precision == "tf32x3" else MAX_ONE_BLOCK_D, max(16, W_ELEMENTS // block_o))
        chunk_d = max(16, min(CHUNK_D, W_ELEMENTS // block_o))
        block_d = max(16, p2(in_features)) if p2(in_features) <= one_block_d else chunk_d

        def rows_for(bd: int) -> int:
            if input_precision == "tf32x3":
                return 16
            return _rows_for_bytes((min(bd, in_features) + out_features) * input_bytes, 16, 128)

        block_n = rows_for(block_d)
        budget = profile.shared_per_block
        if block_d >= in_features and _shared_estimate(
                block_n, block_d, block_o, block_n * (in_features + out_features) * input_bytes, 2, input_bytes,
                input_precision) > budget:
            block_d = chunk_d  # one block of D does not fit this card's shared memory: chunks
            block_n = rows_for(block_d)
        # More warps where the x tile or dW would take >= 64 registers per thread (tf32x3
        # holds two parts of each operand, the chunk loops a second x chunk).
        doubled = input_precision == "tf32x3" or block_d < in_features
        elements = max(block_n, block_o, 16) * block_d * (2 if doubled else 1)
        num_warps = 4 if elements < 8192 else (8 if elements < 32768 else 16)
        extra = _shared_estimate(block_n, block_d, block_o, 0, 0, input_bytes, input_precision)
    else:
        num_warps = 8 if p2(in_features) * block_o > 2048 else 4
        block_n, block_d = _fp64_blocks(in_features, block_o, num_warps)
        extra = 0
    one_block = block_d >= in_features
    tile_bytes = block_n * ((in_features if one_block else block_d) + out_features) * input_bytes
    num_stages, per_sm = _pipeline(tile_bytes, extra, profile)
    return TileConfig(block_n, block_d, block_o, use_dot, max_programs=per_sm * profile.multiprocessors,
                      num_warps=num_warps, num_stages=num_stages)


@functools.lru_cache(maxsize=1024)
def forward_config(in_features: int, out_features: int, profile: DeviceProfile, acc_dtype: torch.dtype,
                   input_precision: str, input_bytes: int) -> TileConfig:
    """Blocks of the inference kernel: one program per row tile and output block (O is tiled
    by the grid, so BLOCK_O may be < O); D longer than one block is walked in pipelined chunks."""
    use_dot = _use_dot(acc_dtype)
    block_o = min(p2(out_features), 64)
    if not profile.gpu:
        if use_dot:
            return TileConfig(16, max(16, min(p2(in_features), 64)), block_o, True)
        block_o = min(block_o, 16)
        return TileConfig(16, min(p2(in_features), 128, max(1, 8192 // (16 * block_o))), block_o, False)
    measured = _measured_forward(in_features, out_features, input_precision, input_bytes) if use_dot else None
    if measured is not None:
        return measured
    if use_dot and input_precision == "tf32x3":
        # High and low parts of both operands: 64 rows in chunks of 32 keep a 64-wide output
        # block unspilled (one 64×64×64 block spills on some Triton releases).
        block_d = max(16, min(p2(in_features), FORWARD_CHUNK_D // 2))
        block_n, num_warps = 64, 8
    elif use_dot:
        if p2(in_features) <= CHUNK_D:  # one block of D, its x tile about TILE_BYTES
            block_d = max(16, p2(in_features))
            block_n = _rows_for_bytes(block_d * input_bytes, 16, 128)
            num_warps = 8 if block_n * block_d >= 8192 else 4
        else:  # chunks: three stages of (64 rows + BLOCK_O) × 64 columns stay within ~100 KB
            # (IEEE FMA dots hold more per thread: 32 rows, or a 64-wide output block spills)
            block_d, block_n, num_warps = FORWARD_CHUNK_D, 32 if input_precision == "ieee" else 64, 8
    else:
        block_o = min(block_o, 16)
        num_warps = 8 if p2(in_features) * block_o > 2048 else 4
        block_n, block_d = _fp64_blocks(in_features, block_o, num_warps)
    num_stages = 1 if block_d >= in_features else 3  # one block needs no pipeline buffers
    return TileConfig(block_n, block_d, block_o, use_dot, num_warps=num_warps, num_stages=num_stages)


@functools.lru_cache(maxsize=1024)
def reduce_config(n_partials: int, n_columns: int, profile: DeviceProfile) -> ReduceConfig:
    """Blocks of the reduce-and-update kernel: a column block per program, partial rows BLOCK_P at a time."""
    if not profile.gpu:
        return ReduceConfig(block_p=min(p2(max(n_partials, 1)), 4), block_cols=64)
    # Enough column blocks to give every SM a program, 32..256 columns each.
    block_cols = max(32, min(256, p2(cdiv(n_columns, profile.multiprocessors))))
    block_p = max(1, min(p2(max(n_partials, 1)), 4096 // block_cols))
    return ReduceConfig(block_p=block_p, block_cols=block_cols, num_warps=4,
                        num_stages=3 if n_partials > block_p else 1)


def smaller_config(cfg: TileConfig | ReduceConfig) -> TileConfig | ReduceConfig | None:
    """The next config to try when a kernel does not fit shared memory: one pipeline stage
    fewer, then half the rows (tl.dot needs 16), then half the reduce block; None: nothing smaller."""
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if isinstance(cfg, ReduceConfig):
        return replace(cfg, block_p=cfg.block_p // 2) if cfg.block_p > 1 else None
    if cfg.block_n > (16 if cfg.use_dot else 1):
        return replace(cfg, block_n=cfg.block_n // 2)
    return None
