"""Compile the grouped statistics kernels (kernels/grouped_stats.py) for an H100/H200 (sm_90)
without a GPU and report registers, spills and shared memory, for fp32 and fp64 inputs at the
issue's shape (8 features -> 1 target: BLOCK_K = 16) and a wide one (56 + 8: BLOCK_K = 64).

    python bench/compile_grouped.py            # the table
    python bench/compile_grouped.py --check    # exit 1 on a spill or shared memory over the limit

Triton's interpreter must be off: this script clears TRITON_INTERPRET before Triton is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from compile_stats import SHARED_LIMIT, TARGET, _resources  # noqa: E402  (bench/ is on sys.path)
from triton.compiler import ASTSource  # noqa: E402

from linreg_fused.kernels import grouped_stats  # noqa: E402


def compile_items(dtype: str, block_k: int) -> dict:
    names = ["x_ptr", "t_ptr", "perm_ptr", "offsets_ptr", "item_group_ptr", "item_first_ptr", "shift_ptr",
             "s1_ptr", "s2_ptr", "n_groups", "D", "O", "stride_x", "stride_t"]
    types = [f"*{dtype}"] * 2 + ["*i64"] * 4 + ["*fp64"] * 3 + ["i64"] * 5
    constants = dict(ITEM_ROWS=grouped_stats.ITEM_ROWS, BLOCK_N=grouped_stats.BLOCK_N, BLOCK_K=block_k)
    signature = dict(zip(names, types)) | {k: "constexpr" for k in constants}
    compiled = triton.compile(ASTSource(grouped_stats._item_sums_kernel, signature, constants), target=TARGET,
                              options=dict(num_warps=grouped_stats.item_warps(block_k)))
    return _resources(compiled)


def compile_groups(block_k: int) -> dict:
    names = ["s1_part_ptr", "s2_part_ptr", "item_first_ptr", "parts_ptr", "s1_ptr", "s2_ptr"]
    types = ["*fp64", "*fp64", "*i64", "*i64", "*fp64", "*fp64"]
    signature = dict(zip(names, types)) | {"BLOCK_K": "constexpr"}
    compiled = triton.compile(ASTSource(grouped_stats._group_sums_kernel, signature, {"BLOCK_K": block_k}),
                              target=TARGET, options=dict(num_warps=4))
    return _resources(compiled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill or too much shared memory")
    args = parser.parse_args(argv)
    rows = [(f"items {dtype} BLOCK_K={k}", compile_items(dtype, k)) for dtype in ("fp32", "fp64") for k in (16, 64)]
    rows += [(f"groups BLOCK_K={k}", compile_groups(k)) for k in (16, 64)]
    bad = []
    for what, res in rows:
        ok = res["stack"] == 0 and res["local"] == 0 and res["shared"] <= SHARED_LIMIT
        bad += [] if ok else [what]
        print(f"{what:26s} regs {res['registers']:3d}  stack {res['stack']:5d} B  local {res['local']:5d} B  "
              f"shared {res['shared']:6d} B  {'ok' if ok else 'SPILLS/SMEM'}")
    print(f"{len(bad)} kernel(s) spill: {bad}" if bad else "no spills; shared memory within the limit")
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
