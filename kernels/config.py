"""Block sizes, warps, pipeline stages and grid sizes, chosen per shape, dtype and device.

Which kernel runs each pass (its "formulation") is decided here too: see
grad_formulation() below. For the default kernels: measured choices first
(kernels/measured.py: the fastest blocks of bench/sweep.py on an H200 for the
shapes it swept, per Triton release), then the rules below (cached per shape
key); not autotuned at run time. bench/compile_report.py compiles what
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

from .device import INTERPRETER, DeviceProfile, device_profile  # noqa: F401  (re-exported)
from .measured import MEASURED_SHARED_PER_BLOCK, measured_forward_table, measured_grad_table


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
    entry = measured_grad_table().get((input_precision, input_bytes, d_class)) if out_features <= 16 else None
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
    table = measured_forward_table()
    entry = table.get((input_precision, _d_class(in_features), o_class)) if input_bytes == 4 else None
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


# ---------------------------------------------------------------- formulations
# Which kernel runs a pass. "default": linear_mse_grad.py / linear_forward.py (every dtype,
# precision and shape). "rows" (grad_rows.py, forward_rows.py): W and the lane's dW in registers,
# no shared memory in the loop, for small O·D. "chunks" (grad_chunks.py, forward_chunks.py): D in
# separately loaded chunks of 64, one FMA chain per output, for wide and deep data. Both compute
# IEEE products (FMAs); chunks accumulates in fp32 (not fp64). "mma" (grad_mma.py, gradient only):
# the chunks walk for a bf16 X on bf16 tensor cores, fp32 operands split in three bf16 terms:
# "tf32x3" accuracy (bf16's default precision), never "ieee". kernels/formulations.py launches
# whichever is decided here.
#
# The rule: a formulation other than "default" runs when it is named (tests, the GPU check), or,
# when "auto" asks, only where it serves the problem AND it is listed in GPU_CHECKED for this Triton
# release: its parity passed on a GPU (bench/gpu_kernels.py: against float64 and the default
# kernel) and it was measured faster there than the default kernel; where several serve, the first
# listed (the order the measurements prefer). Nothing is listed yet: none of them has run on a GPU,
# so "auto" is the default kernel everywhere.
GRAD_FORMULATIONS = ("default", "rows", "chunks", "mma")
FORWARD_FORMULATIONS = ("default", "rows", "chunks")
GPU_CHECKED: dict[str, tuple[str, ...]] = {}  # Triton release ("3.6") -> formulations checked on a GPU, preferred first


def formulation_serves(name: str, in_features: int, out_features: int, acc_dtype: torch.dtype,
                       input_precision: str, input_dtype: torch.dtype, kind: str = "grad") -> str | None:
    """None if formulation ``name`` can compute this pass ("grad" or "forward") of this problem, else why not."""
    from .blocks import chunks_fits, rows_fits

    names = GRAD_FORMULATIONS if kind == "grad" else FORWARD_FORMULATIONS
    if name == "default":
        return None
    if name not in names:
        return f"unknown {kind} formulation {name!r} (one of {', '.join(names)})"
    if name == "mma":
        if input_dtype != torch.bfloat16 or acc_dtype != torch.float32:
            return (f"the mma formulation takes a bfloat16 x and float32 weights (got {input_dtype} with "
                    f"{acc_dtype} accumulation)")
        if input_precision != "tf32x3":
            return ("the mma formulation computes tf32x3-accurate products only "
                    f"(got input_precision={input_precision!r})")
        if not chunks_fits(in_features, out_features):
            return f"the mma formulation takes D <= 1024 and O <= 16 (got D={in_features}, O={out_features})"
        return None
    if input_precision != "ieee" and acc_dtype != torch.float64:
        return f"the {name} formulation computes IEEE products only (got input_precision={input_precision!r})"
    if name == "rows" and not rows_fits(in_features, out_features, input_dtype.itemsize):
        return (f"the rows formulation holds O·D/lanes values of W per lane: D={in_features}, O={out_features} "
                "is too big")
    if name == "chunks" and acc_dtype != torch.float32:
        return "the chunks formulation accumulates in fp32 (tl.dot has no fp64 path on every release)"
    if name == "chunks" and not chunks_fits(in_features, out_features):
        return f"the chunks formulation takes D <= 1024 and O <= 16 (got D={in_features}, O={out_features})"
    return None


def _gpu_checked() -> tuple[str, ...]:
    """GPU_CHECKED's entry for this Triton release: a check with one release does not carry to another."""
    from .measured import release, triton_version

    major, minor = release(triton_version())
    return GPU_CHECKED.get(f"{major}.{minor}", ())


@functools.lru_cache(maxsize=1024)
def choose_formulation(in_features: int, out_features: int, profile: DeviceProfile, acc_dtype: torch.dtype,
                       input_precision: str, input_dtype: torch.dtype, requested: str = "auto",
                       kind: str = "grad") -> str:
    """The formulation that runs a pass ("grad" or "forward") of this problem: the one place that decides
    (see the rule above).

    requested: "auto", or a formulation name, which must serve the problem (ValueError says why not).
    """
    if requested != "auto":
        why = formulation_serves(requested, in_features, out_features, acc_dtype, input_precision, input_dtype, kind)
        if why:
            raise ValueError(why)
        return requested
    if not profile.gpu:
        return "default"
    for name in _gpu_checked():
        if formulation_serves(name, in_features, out_features, acc_dtype, input_precision, input_dtype, kind) is None:
            return name
    return "default"
