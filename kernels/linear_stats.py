"""The sufficient-statistics pass: one pass over X and T gives the shifted
co-moments, from which stats_sgd.py runs any number of full-batch SGD epochs.

The pass. With A = X − s and B = T − s_t (s, s_t: a shift, the mean of up
to SHIFT_ROWS leading rows, so the sums below do not cancel when the data
sit far from 0), a program sums over its rows

    AᵀA (D × D)    BᵀA (O × D)    BᵀB (O × O)    Σ A (D)    Σ B (O)

Columns of X are split in blocks of BLOCK_D; AᵀA is tiled in block pairs
(i, j), i ≤ j. Two launches of one kernel: the diagonal launch, one program
per (block i, split of the rows), computes AᵀA[i, i], BᵀA[:, i], BᵀB and the
column sums, reading its X block and T once; the off-diagonal launch (only
when D > BLOCK_D) computes AᵀA[i, j] for i < j, its programs of one split
adjacent in the grid so that their shared rows come from L2. Each program
owns one row of a partial buffer; the rows are summed afterwards in a fixed
order: no float atomics, bitwise reproducible.

Accuracy (fp32 / bf16 / fp16 inputs): the shifted values are fp32 (one
rounding) and each tile product is taken in one of three ways (PRODUCT):

- TF32X3: a = hi + lo exactly, hi = a rounded to tf32 (11 significant bits),
  then aᵀb ≈ hiᵀhi' + hiᵀlo' + loᵀhi' as three tensor-core dots (two on the
  diagonal: AᵀA = Σ hiᵀhi + S + Sᵀ with S = Σ hiᵀlo). The hardware truncates
  lo to tf32 too, so each product is within 2.5·2⁻²¹ ≈ 1.2e-6 of exact
  (relative to |a|·|b|), against 2⁻¹¹ for a single tf32 dot.
- IEEE: one fp32 dot with IEEE products (CUDA-core FMAs): products exact to
  2⁻²⁴, 3-6× slower than TF32X3 where both are compute-bound.
- FMA: the broadcast product of tiles.py (any dtype, tiny blocks; fp64).

The dots accumulate in fp32 over at most GROUP_ROWS rows (1024 on a GPU);
each group is then added to the program's fp64 partial row, and the rows
are summed in fp64. So an entry of the statistics is within the product
error plus 1024·2⁻²⁴ ≈ 6e-5 (worst case; √1024·2⁻²⁴ ≈ 2e-6 typical) of
Σ |a|·|b|, whatever N. fp64 inputs (or precision "fp64") take exact fp64
products and fp64 sums.

Cost model per row, with D the columns of X and O of T (O padded to 16):
about 3·(D²/2 + O·D + O²) tensor-core multiply-adds against (D + O)
elements read. An H100 SXM does ~247 T dense TF32 MAC/s against ~3.35 TB/s,
~74 MACs per byte: for fp32 rows the pass is memory-bound at D = 64
(~0.5 of the read time in MACs) and compute-bound beyond D ≈ 200 (D = 1024:
~5× the read time, ~1.7 ms at peak for 262,144 rows) -- still one pass
instead of one per epoch. These are data-sheet figures, not measurements.

The epochs that run on these statistics are in stats_sgd.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import next_power_of_2 as p2

from .tiles import load_rows

# How a tile product is taken (PRODUCT, a constexpr of the pass).
TF32X3 = tl.constexpr(0)
IEEE = tl.constexpr(1)
FMA = tl.constexpr(2)
PRODUCTS = {"tf32x3": 0, "ieee": 1, "fma": 2}

SHIFT_ROWS = 1024  # the shift is the mean of this many leading rows


@dataclass(frozen=True)
class StatsConfig:
    block_n: int
    block_d: int
    block_o: int
    product: str  # "tf32x3" | "ieee" | "fma"
    group_rows: int = 1024  # rows summed in ACC before the fp64 partial row takes them
    n_splits: int = 0  # splits of the rows; 0: chosen from the device
    num_warps: int = 4
    num_stages: int = 2


_FMA_BUDGET = 8192  # elements of a broadcast product's temporary


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def stats_config(in_features: int, out_features: int, device: torch.device, fp64: bool, half: bool = False) -> StatsConfig:
    """Blocks of the statistics pass. BLOCK_O covers O; X is split in BLOCK_D blocks."""
    on_gpu = device.type == "cuda"
    if fp64:  # exact fp64 FMAs, broadcast (no fp64 tl.dot on every Triton release)
        block_o = p2(out_features)
        block_d = max(1, min(p2(in_features), 32, _FMA_BUDGET // (8 * block_o)))
        block_n = max(1, min(32, _FMA_BUDGET // (block_d * max(block_d, block_o))))
        if not on_gpu:
            return StatsConfig(block_n, block_d, block_o, "fma", group_rows=4 * block_n)
        # sm_90: 8 warps keep the fp64 broadcast temporaries of the diagonal program unspilled.
        return StatsConfig(block_n, block_d, block_o, "fma", num_warps=8)
    block_o = max(16, p2(out_features))
    if not on_gpu:  # the interpreter: small blocks, several of them in the test shapes
        return StatsConfig(16, 16, block_o, "tf32x3", group_rows=32)
    # Compiled for sm_90 (cuobjdump -res-usage), 8 warps: these blocks need at most 255
    # registers and spill none; a 64-row fp32 tile with two pipeline stages, or BLOCK_O = 128,
    # would spill. fp32 tiles are twice the bytes of half ones.
    if block_o <= 16:
        return StatsConfig(64 if half else 32, 64, block_o, "tf32x3", num_warps=8, num_stages=2)
    return StatsConfig(32, 32, block_o, "tf32x3", num_warps=8, num_stages=1)


MAX_OUT_FEATURES = 64  # the pass holds BᵀB (O × O) in one program


# ---------------------------------------------------------------- the pass
@triton.jit
def _split_tf32(a):
    """a = hi + lo exactly, hi = a rounded to the nearest tf32 (ties away from 0)."""
    bits = a.to(tl.int32, bitcast=True)
    hi = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return hi, a - hi


@triton.jit
def _split(a, PRODUCT: tl.constexpr):
    if PRODUCT == TF32X3:
        hi, lo = _split_tf32(a)
    else:
        hi, lo = a, a  # lo unused
    return hi, lo


@triton.jit
def _at_b(a_hi, a_lo, b_hi, b_lo, acc, PRODUCT: tl.constexpr):
    """acc + aᵀ·b for (BLOCK_N, P), (BLOCK_N, Q) tiles: acc is (P, Q), accumulated in place by the dots."""
    if PRODUCT == TF32X3:
        acc = tl.dot(tl.trans(a_lo), b_hi, acc, input_precision="tf32")
        acc = tl.dot(tl.trans(a_hi), b_lo, acc, input_precision="tf32")
        acc = tl.dot(tl.trans(a_hi), b_hi, acc, input_precision="tf32")
    elif PRODUCT == IEEE:
        acc = tl.dot(tl.trans(a_hi), b_hi, acc, input_precision="ieee")
    else:
        acc += tl.sum(a_hi[:, :, None] * b_hi[:, None, :], axis=0)
    return acc


@triton.jit
def _load_centred(ptr, rows, mask_n, cols, mask_c, stride_r, stride_c, shift, ACC: tl.constexpr):
    """(BLOCK_N, len(cols)) tile minus the shift; 0 outside the masks."""
    v = load_rows(ptr, rows, cols, mask_n, mask_c, stride_r, stride_c, ACC)
    return tl.where(mask_n[:, None] & mask_c[None, :], v - shift[None, :], 0.0)


@triton.jit
def _flush(ptr, acc, mask):
    """*ptr += acc, in fp64, on this program's own (zero-initialised) partial row."""
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + acc.to(tl.float64), mask=mask)


@triton.jit
def _linear_stats_kernel(
    x_ptr, t_ptr, shift_x_ptr, shift_t_ptr, pairs_ptr, partials_ptr,
    n_rows, rows_per_split, D, O, stride_xn, stride_xd, stride_tn, stride_to, stride_split, stride_pair,
    DIAGONAL: tl.constexpr, PRODUCT: tl.constexpr, ACC: tl.constexpr, GROUP_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pair = tl.program_id(0)
    split = tl.program_id(1)
    if DIAGONAL:
        bi = pair
        bj = pair
    else:
        bi = tl.load(pairs_ptr + 2 * pair)
        bj = tl.load(pairs_ptr + 2 * pair + 1)
    offs_i = bi * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = bj * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_o = tl.arange(0, BLOCK_O)
    mask_i, mask_j, mask_o = offs_i < D, offs_j < D, offs_o < O
    shift_i = tl.load(shift_x_ptr + offs_i, mask=mask_i, other=0.0).to(ACC)
    shift_j = tl.load(shift_x_ptr + offs_j, mask=mask_j, other=0.0).to(ACC)
    shift_t = tl.load(shift_t_ptr + offs_o, mask=mask_o, other=0.0).to(ACC)

    # This program's partial row: [AᵀA (or its hiᵀhi part) | hiᵀlo | BᵀA | BᵀB | Σ A | Σ B], fp64.
    rd = tl.arange(0, BLOCK_D)
    out = partials_ptr + split.to(tl.int64) * stride_split + pair.to(tl.int64) * stride_pair
    xx_ptrs = out + rd[:, None] * BLOCK_D + rd[None, :]
    xs_ptrs = xx_ptrs + BLOCK_D * BLOCK_D
    tx_ptrs = out + 2 * BLOCK_D * BLOCK_D + rd[:, None] + offs_o[None, :] * BLOCK_D  # AᵀB, stored as BᵀA
    tt_ptrs = out + 2 * BLOCK_D * BLOCK_D + BLOCK_O * BLOCK_D + offs_o[:, None] * BLOCK_O + offs_o[None, :]
    sums = out + 2 * BLOCK_D * BLOCK_D + BLOCK_O * BLOCK_D + BLOCK_O * BLOCK_O
    sx_ptrs = sums + rd
    st_ptrs = sums + BLOCK_D + offs_o

    # The rows of this split, in groups: the dots accumulate a group in ACC, then it is added
    # to the fp64 partial row, so fp32 sums never run over more than GROUP_ROWS rows.
    row_start = split.to(tl.int64) * rows_per_split  # 64-bit row offsets: N·stride may exceed 2³¹
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    for group in range(row_start, row_end, GROUP_ROWS):
        xx = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC)
        xs = tl.zeros([BLOCK_D, BLOCK_D], dtype=ACC)
        tx = tl.zeros([BLOCK_D, BLOCK_O], dtype=ACC)
        tt = tl.zeros([BLOCK_O, BLOCK_O], dtype=ACC)
        sx = tl.zeros([BLOCK_D], dtype=ACC)
        st = tl.zeros([BLOCK_O], dtype=ACC)
        for r in range(0, GROUP_ROWS, BLOCK_N):
            rows = group + r + tl.arange(0, BLOCK_N)
            mask_n = rows < row_end
            a_i = _load_centred(x_ptr, rows, mask_n, offs_i, mask_i, stride_xn, stride_xd, shift_i, ACC)
            a_i_hi, a_i_lo = _split(a_i, PRODUCT)
            if DIAGONAL:
                b = _load_centred(t_ptr, rows, mask_n, offs_o, mask_o, stride_tn, stride_to, shift_t, ACC)
                b_hi, b_lo = _split(b, PRODUCT)
                if PRODUCT == TF32X3:  # AᵀA = Σ hiᵀhi + S + Sᵀ with S = Σ hiᵀlo: two dots, not three
                    xx = tl.dot(tl.trans(a_i_hi), a_i_hi, xx, input_precision="tf32")
                    xs = tl.dot(tl.trans(a_i_hi), a_i_lo, xs, input_precision="tf32")
                else:
                    xx = _at_b(a_i_hi, a_i_lo, a_i_hi, a_i_lo, xx, PRODUCT)
                tx = _at_b(a_i_hi, a_i_lo, b_hi, b_lo, tx, PRODUCT)  # M = BLOCK_D rows: wide MMA tiles
                tt = _at_b(b_hi, b_lo, b_hi, b_lo, tt, PRODUCT)
                sx += tl.sum(a_i, axis=0)
                st += tl.sum(b, axis=0)
            else:
                a_j = _load_centred(x_ptr, rows, mask_n, offs_j, mask_j, stride_xn, stride_xd, shift_j, ACC)
                a_j_hi, a_j_lo = _split(a_j, PRODUCT)
                xx = _at_b(a_i_hi, a_i_lo, a_j_hi, a_j_lo, xx, PRODUCT)
        tl.debug_barrier()  # the previous group's adds land before this one reads them
        _flush(xx_ptrs, xx, mask_i[:, None] & mask_j[None, :])
        if DIAGONAL:
            if PRODUCT == TF32X3:
                _flush(xs_ptrs, xs, mask_i[:, None] & mask_i[None, :])
            _flush(tx_ptrs, tx, mask_i[:, None] & mask_o[None, :])
            _flush(tt_ptrs, tt, mask_o[:, None] & mask_o[None, :])
            _flush(sx_ptrs, sx, mask_i)
            _flush(st_ptrs, st, mask_o)


def _diagonal_width(cfg: StatsConfig) -> int:
    bd, bo = cfg.block_d, cfg.block_o
    return 2 * bd * bd + bo * bd + bo * bo + bd + bo


@functools.lru_cache(maxsize=256)
def _block_pairs(n_blocks: int, device: torch.device) -> torch.Tensor:
    """(n_off, 2) int32: the block pairs (i, j), i < j, of the off-diagonal launch."""
    pairs = [(i, j) for i in range(n_blocks) for j in range(i + 1, n_blocks)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1, 2)


def _n_splits(cfg: StatsConfig, n_rows: int, n_programs_per_split: int, device: torch.device) -> int:
    n_groups = triton.cdiv(n_rows, cfg.group_rows)
    if cfg.n_splits:
        return max(1, min(cfg.n_splits, n_groups))
    if device.type != "cuda":
        return max(1, min(3, n_groups))
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = 2 * _multiprocessor_count(index)  # programs in flight: two per SM
    return max(1, min(n_groups, triton.cdiv(target, n_programs_per_split)))


def linear_moments(
    x: torch.Tensor, target: torch.Tensor, *, fp64: bool = False, config: StatsConfig | None = None,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over (x, target): count, means and centred co-moments, fp64.

    x: (N, D), target: (N, O), any strides, fp32/bf16/fp16/fp64 (the same dtype), N ≥ 1.
    fp64: exact fp64 products and sums (always so for fp64 inputs).
    Returns (N, mean_x (D), mean_t (O), M_xx (D, D), M_tx (O, D), M_tt (O, O))
    with M_xx = Σ (x − x̄)(x − x̄)ᵀ, M_tx = Σ (t − t̄)(x − x̄)ᵀ, M_tt = Σ (t − t̄)(t − t̄)ᵀ.
    Two launches at most, then a few small fp64 ops; no host sync.
    """
    n_rows, in_features = x.shape
    out_features = target.shape[1]
    if in_features == 0:  # no feature block to carry the target's sums: its moments directly, in fp64
        t = target.to(torch.float64)
        mean_t = t.mean(0)
        centred = t - mean_t
        none = t.new_zeros((out_features, 0))
        return n_rows, t.new_zeros(0), mean_t, t.new_zeros((0, 0)), none, centred.T @ centred
    fp64 = fp64 or x.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    half = x.element_size() == 2
    cfg = config or stats_config(in_features, out_features, x.device, fp64, half)
    if cfg.block_o < out_features:
        raise ValueError(f"block_o={cfg.block_o} < out_features={out_features}: one program holds every output")
    if fp64 and cfg.product != "fma":
        raise ValueError("fp64 statistics take FMA products")
    bd = cfg.block_d
    n_blocks = triton.cdiv(in_features, bd)
    pairs = _block_pairs(n_blocks, x.device)
    n_splits = _n_splits(cfg, n_rows, n_blocks + pairs.shape[0], x.device)
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, n_splits), cfg.group_rows) * cfg.group_rows

    # The shift: the mean of the leading rows, rounded to the accumulator dtype (the kernel
    # subtracts exactly this value, and the means below add it back exactly).
    lead = slice(0, min(n_rows, SHIFT_ROWS))
    shift_x = x[lead].to(torch.float64).mean(0).to(acc)
    shift_t = target[lead].to(torch.float64).mean(0).to(acc)

    diag = torch.zeros((n_splits, n_blocks, _diagonal_width(cfg)), device=x.device, dtype=torch.float64)
    off = torch.zeros((n_splits, pairs.shape[0], bd * bd), device=x.device, dtype=torch.float64)
    common = dict(PRODUCT=PRODUCTS[cfg.product], ACC=tl.float64 if fp64 else tl.float32, GROUP_ROWS=cfg.group_rows,
                  BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_O=cfg.block_o, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    args = (n_rows, rows_per_split, in_features, out_features, x.stride(0), x.stride(1),
            target.stride(0), target.stride(1))
    pairs_arg = pairs if pairs.numel() else shift_x  # never read by the diagonal launch
    _linear_stats_kernel[(n_blocks, n_splits)](x, target, shift_x, shift_t, pairs_arg, diag, *args,
                                               diag.stride(0), diag.stride(1), DIAGONAL=True, **common)
    if pairs.shape[0]:
        _linear_stats_kernel[(pairs.shape[0], n_splits)](x, target, shift_x, shift_t, pairs, off, *args,
                                                         off.stride(0), off.stride(1), DIAGONAL=False, **common)
    return _assemble(n_rows, diag.sum(0), off.sum(0), pairs, shift_x, shift_t, in_features, out_features, cfg)


def _assemble(n_rows, diag, off, pairs, shift_x, shift_t, in_features, out_features, cfg):
    """Shifted sums -> means and centred co-moments (fp64)."""
    bd, bo = cfg.block_d, cfg.block_o
    n_blocks = diag.shape[0]
    hh, rest = diag[:, : bd * bd].view(n_blocks, bd, bd), diag[:, bd * bd :]
    hl, rest = rest[:, : bd * bd].view(n_blocks, bd, bd), rest[:, bd * bd :]
    xx_d = hh + hl + hl.transpose(1, 2)  # hl is 0 unless the products were split
    tx, rest = rest[:, : bo * bd].view(n_blocks, bo, bd), rest[:, bo * bd :]
    tt, rest = rest[0, : bo * bo].view(bo, bo), rest[:, bo * bo :]
    sx, st = rest[:, :bd], rest[0, bd : bd + bo]

    blocks = diag.new_zeros((n_blocks, n_blocks, bd, bd))
    index = torch.arange(n_blocks, device=diag.device)
    blocks[index, index] = xx_d
    if off.shape[0]:
        i, j = pairs[:, 0].long(), pairs[:, 1].long()
        tiles = off.view(-1, bd, bd)
        blocks[i, j] = tiles
        blocks[j, i] = tiles.transpose(1, 2)
    d, o = in_features, out_features
    s2_xx = blocks.permute(0, 2, 1, 3).reshape(n_blocks * bd, n_blocks * bd)[:d, :d]
    s2_tx = tx.permute(1, 0, 2).reshape(bo, n_blocks * bd)[:o, :d]
    s2_tt = tt[:o, :o]
    s1_x = sx.reshape(-1)[:d]
    s1_t = st[:o]
    # Centre: M = S2 − S1·S1ᵀ/n; mean = shift + S1/n. The shift keeps |S1/n| of the order of
    # the spread, so the subtraction loses little.
    mean_x = shift_x.double() + s1_x / n_rows
    mean_t = shift_t.double() + s1_t / n_rows
    m_xx = s2_xx - torch.outer(s1_x, s1_x) / n_rows
    m_tx = s2_tx - torch.outer(s1_t, s1_x) / n_rows
    m_tt = s2_tt - torch.outer(s1_t, s1_t) / n_rows
    m_xx = (m_xx + m_xx.t()) / 2  # exactly symmetric
    return n_rows, mean_x, mean_t, m_xx, m_tx.contiguous(), m_tt.contiguous()
