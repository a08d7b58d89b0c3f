"""Per-group statistics pass: shifted sums of (x, t) rows for every group, in fp64.

With z = [x t] (K = D + O columns) and s_g the group's shift (its first row), the
pass computes for every group g

    n_g,   S1_g = Σ_{rows of g} (z − s_g)  (K),   S2_g = Σ_{rows of g} (z − s_g)(z − s_g)ᵀ  (K × K)

from which the caller forms the means and centred co-moments (mean = s + S1/n,
M = S2 − S1·S1ᵀ/n). Shifting by a row of the group keeps the sums from cancelling
when a group's data sit far from 0.

Rows arrive in any order. The caller sorts the group ids once (a stable sort: the
permutation is the same every run) and splits each group's rows into *items* of at
most ITEM_ROWS consecutive sorted rows, so a group of 10⁵ rows is spread over many
programs instead of holding one up. Two launches:

- ``_item_sums_kernel``: one program per item; it gathers its rows through the
  permutation in tiles of BLOCK_N, subtracts the shift in fp64 and adds Σ z and
  zᵀz (an fp64 ``tl.dot``) into registers; it writes one partial row.
- ``_group_sums_kernel``: one program per group adds its items' partial rows in
  item order.

Every sum is taken in a fixed order (no atomics), so the result is bitwise the same
run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ITEM_ROWS = 4096  # rows of one group per program of the first launch
BLOCK_N = 64
MAX_COLUMNS = 64  # K = D + O beyond this: the K × K fp64 accumulator does not fit in registers


def item_warps(block_k: int) -> int:
    """Warps of the item program: its K × K fp64 accumulator spread thin enough not to spill
    (compiled for sm_90: 4 warps hold BLOCK_K = 16 in 128 registers, 64 needs 8; bench/compile_grouped.py)."""
    return 4 if block_k <= 32 else 8


@triton.jit
def _item_sums_kernel(x_ptr, t_ptr, perm_ptr, offsets_ptr, item_group_ptr, item_first_ptr, shift_ptr,
                      s1_ptr, s2_ptr, n_groups, D, O, stride_x, stride_t,
                      ITEM_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    item = tl.program_id(0)
    g = tl.load(item_group_ptr + item)
    if g < n_groups:  # the grid is an upper bound on the number of items
        part = item - tl.load(item_first_ptr + g)
        lo = tl.load(offsets_ptr + g) + part * ITEM_ROWS
        hi = tl.minimum(lo + ITEM_ROWS, tl.load(offsets_ptr + g + 1))
        cols = tl.arange(0, BLOCK_K)
        k = D + O
        shift = tl.load(shift_ptr + g * k + cols, mask=cols < k, other=0.0)
        is_x = cols < D
        is_t = (cols >= D) & (cols < k)
        s1 = tl.zeros((BLOCK_K,), dtype=tl.float64)
        s2 = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float64)
        for start in range(lo, hi, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            live = rows < hi
            idx = tl.load(perm_ptr + rows, mask=live, other=0)
            # One tile of z: x's columns then t's, gathered through the permutation.
            xv = tl.load(x_ptr + idx[:, None] * stride_x + cols[None, :], mask=live[:, None] & is_x[None, :],
                         other=0.0)
            tv = tl.load(t_ptr + idx[:, None] * stride_t + (cols[None, :] - D),
                         mask=live[:, None] & is_t[None, :], other=0.0)
            z = xv.to(tl.float64) + tv.to(tl.float64)
            z = tl.where(live[:, None], z - shift[None, :], 0.0)
            s1 += tl.sum(z, axis=0)
            s2 += tl.dot(tl.trans(z), z, input_precision="ieee")
        tl.store(s1_ptr + item * BLOCK_K + cols, s1)
        out = s2_ptr + item * BLOCK_K * BLOCK_K + cols[:, None] * BLOCK_K + cols[None, :]
        tl.store(out, s2)


@triton.jit
def _group_sums_kernel(s1_part_ptr, s2_part_ptr, item_first_ptr, parts_ptr, s1_ptr, s2_ptr,
                       BLOCK_K: tl.constexpr):
    g = tl.program_id(0)
    first = tl.load(item_first_ptr + g)
    parts = tl.load(parts_ptr + g)
    cols = tl.arange(0, BLOCK_K)
    square = cols[:, None] * BLOCK_K + cols[None, :]
    s1 = tl.zeros((BLOCK_K,), dtype=tl.float64)
    s2 = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float64)
    for item in range(first, first + parts):  # in item order: a fixed order of the sums
        s1 += tl.load(s1_part_ptr + item * BLOCK_K + cols)
        s2 += tl.load(s2_part_ptr + item * BLOCK_K * BLOCK_K + square)
    tl.store(s1_ptr + g * BLOCK_K + cols, s1)
    tl.store(s2_ptr + g * BLOCK_K * BLOCK_K + square, s2)


def grouped_shifted_sums(x: torch.Tensor, t: torch.Tensor, groups: torch.Tensor, n_groups: int,
                         counts: torch.Tensor, shift_rows: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift (G, K), S1 (G, K), S2 (G, K, K)), fp64, of rows x (N, D), t (N, O) with group ids
    ``groups`` (N,) in [0, n_groups) and ``counts`` = bincount(groups). ``shift_rows`` (G, K) fp64:
    a shift per group to use instead of each group's first row. No host sync."""
    n, d = x.shape
    o = t.shape[1]
    k = d + o
    if k > MAX_COLUMNS:
        raise ValueError(f"the grouped kernels take up to {MAX_COLUMNS} features and targets together, got {k}")
    block_k = max(16, triton.next_power_of_2(k))  # tl.dot takes dimensions of 16 or more
    x, t = x.contiguous() if x.stride(1) != 1 else x, t.contiguous() if t.stride(1) != 1 else t
    # Stable: the same permutation every run. Ids below 2³¹ sort as int32 keys: half the radix passes.
    keys = groups.to(torch.int32) if n_groups <= 2**31 - 1 else groups
    perm = torch.sort(keys, stable=True).indices
    offsets = torch.zeros(n_groups + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    if shift_rows is None:
        first = perm[offsets[:-1].clamp_max(n - 1)]  # each group's first row (its smallest index)
        shift = torch.cat([x[first], t[first]], 1).to(torch.float64)
    else:
        shift = shift_rows.contiguous()
    parts = (counts + ITEM_ROWS - 1) // ITEM_ROWS
    ends = torch.cumsum(parts, 0)
    item_first = ends - parts
    max_items = n_groups + n // ITEM_ROWS + 1  # Σ ceil(n_g / ITEM_ROWS) never exceeds this
    item_group = torch.searchsorted(ends, torch.arange(max_items, device=x.device), right=True)
    s1_part = torch.empty((max_items, block_k), dtype=torch.float64, device=x.device)
    s2_part = torch.empty((max_items, block_k, block_k), dtype=torch.float64, device=x.device)
    _item_sums_kernel[(max_items,)](x, t, perm, offsets, item_group, item_first, shift, s1_part, s2_part,
                                    n_groups, d, o, x.stride(0), t.stride(0),
                                    ITEM_ROWS=ITEM_ROWS, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
                                    num_warps=item_warps(block_k))
    s1 = torch.empty((n_groups, block_k), dtype=torch.float64, device=x.device)
    s2 = torch.empty((n_groups, block_k, block_k), dtype=torch.float64, device=x.device)
    _group_sums_kernel[(n_groups,)](s1_part, s2_part, item_first, parts, s1, s2, BLOCK_K=block_k)
    return shift, s1[:, :k], s2[:, :k, :k]
