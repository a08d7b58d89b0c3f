"""Compile the TSQR factor kernel (kernels/linear_qr.py) for an H100/H200 (sm_90) without a
GPU, at the blocks its launch helpers pick on a 132-SM card, and report registers, spills and
shared memory (cubin via Triton's bundled cuobjdump).

    python bench/compile_qr.py            # the table
    python bench/compile_qr.py --check    # exit 1 on a spill or shared memory over the limit

Shapes: every power-of-two BLOCK_P from 4 to 64 (P = 1 + D + O up to the kernel's 64 columns),
fp32/bf16/fp64 inputs, fp64 and fp32 accumulation, and the merge launch. TRITON_INTERPRET
must be unset (this script clears it before Triton is imported).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from compile_report import ARCHS, compile_one, compile_spec  # noqa: E402

# (D, O, input dtype, fp64 accumulation): P = 3, 5, 11, 18, 33, 64 (BLOCK_P 4 .. 64).
SHAPES = ((1, 1, torch.float32, True), (3, 1, torch.float64, True), (8, 2, torch.float32, True),
          (16, 1, torch.bfloat16, True), (30, 2, torch.float32, True), (62, 1, torch.float32, True),
          (62, 1, torch.float32, False), (60, 3, torch.float64, True))


class _Cuda:  # what qr_config reads of a device
    type, index = "cuda", 0


def _meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def plans(arch):
    """(label, LaunchPlan) for each shape: the data launch and its first merge level."""
    from linreg_fused.kernels import linear_qr

    out = []
    for d, o, dtype, fp64 in SHAPES:
        p = 1 + d + o
        original = linear_qr._multiprocessor_count
        linear_qr._multiprocessor_count = lambda index: arch.multiprocessors  # noqa: E731  (no GPU to ask)
        try:
            cfg = linear_qr.qr_config(1 << 22, p, _Cuda())
        finally:
            linear_qr._multiprocessor_count = original
        acc = torch.float64 if fp64 else torch.float32
        x, t = _meta(1 << 22, d, dtype=dtype), _meta(1 << 22, o, dtype=dtype)
        plan, partials = linear_qr.plan_data_pass(x, t, _meta(cfg.block_p, dtype=acc), fp64=fp64, config=cfg)
        label = f"D={d} O={o} {str(dtype)[6:]} acc={'fp64' if fp64 else 'fp32'} {cfg.block_n}x{cfg.block_p}"
        out.append((f"{label} data", plan))
        merge, _ = linear_qr.plan_merge(_meta(*partials.shape, dtype=torch.float64), p, block_n=cfg.block_n)
        out.append((f"{label} merge", merge))
    return out


def report(capability: int = 90) -> list[dict]:
    arch = ARCHS[capability]
    rows = []
    for label, plan in plans(arch):
        spec, _ = compile_spec(plan, capability)
        res = compile_one(spec)
        spill = res["stack"] + res["local"]
        ok = spill == 0 and res["shared"] <= arch.shared_per_block
        rows.append(dict(label=label, regs=res["regs"], spill=spill, shared=res["shared"], warps=plan.num_warps,
                         grid=plan.grid[0], ok=ok))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill or too much shared memory")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS))
    args = parser.parse_args(argv)
    rows = report(args.arch)
    for r in rows:
        print(f"sm_{args.arch} {r['label']:44s} grid {r['grid']:4d}  warps {r['warps']}  regs {r['regs']:3d}  "
              f"spill {r['spill']:4d} B  shared {r['shared']:6d} B  {'ok' if r['ok'] else 'SPILLS/SMEM'}")
    bad = [r["label"] for r in rows if not r["ok"]]
    print(f"{len(bad)} launch(es) spill or exceed shared memory" if bad
          else "no spills; shared memory within the limit")
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
