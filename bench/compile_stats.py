"""Compile the statistics kernels (kernels/linear_stats.py, kernels/stats_sgd.py) for an H100 (sm_90)
without a GPU, at the block configs the launch helpers pick for the statistics
regimes (bench/regimes.py), and report registers, spills and shared memory.

    python bench/compile_stats.py            # the table
    python bench/compile_stats.py --check    # exit 1 on a spill or shared memory over the limit
    python bench/compile_stats.py --regime stats-tall --dtype fp32

Triton's interpreter must be off (compiling needs the real jit): this script
clears TRITON_INTERPRET before Triton is imported. Registers and spills come from
the cubin through Triton's bundled cuobjdump (-res-usage): STACK > 0 or LOCAL > 0
means spills to local memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from linreg_fused.kernels import linear_stats, stats_sgd  # noqa: E402
from regimes import STATS_REGIMES  # noqa: E402

SHARED_LIMIT = 232_448  # bytes of shared memory per block on sm_90
TARGET = GPUTarget("cuda", 90, 32)
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class _Cuda:  # what the config helpers read of a device
    type, index = "cuda", 0


def _resources(compiled) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "shared": compiled.metadata.shared}


def compile_pass(in_features: int, out_features: int, dtype: torch.dtype, diagonal: bool,
                 fp64: bool = False) -> tuple[object, dict]:
    half = dtype != torch.float32
    cfg = linear_stats.stats_config(in_features, out_features, _Cuda(), fp64, half)
    names = ["x_ptr", "t_ptr", "shift_x_ptr", "shift_t_ptr", "pairs_ptr", "partials_ptr", "n_rows",
             "rows_per_split", "D", "O", "stride_xn", "stride_xd", "stride_tn", "stride_to", "stride_split",
             "stride_pair"]
    acc = "fp64" if fp64 else "fp32"
    types = [f"*{_TL[dtype]}"] * 2 + [f"*{acc}"] * 2 + ["*i32", "*fp64"] + ["i64"] * 10
    constants = dict(DIAGONAL=diagonal, PRODUCT=linear_stats.PRODUCTS[cfg.product],
                     ACC=tl.float64 if fp64 else tl.float32,
                     GROUP_ROWS=cfg.group_rows, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_O=cfg.block_o)
    signature = dict(zip(names, types)) | {k: "constexpr" for k in constants}
    compiled = triton.compile(ASTSource(linear_stats._linear_stats_kernel, signature, constants), target=TARGET,
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return cfg, _resources(compiled)


def compile_epochs(in_features: int, out_features: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """The epochs kernel with every SGD branch on (momentum, weight decay, nesterov, maximize)."""
    blocks = stats_sgd.epoch_blocks(in_features, out_features)
    names = ["mean_x_ptr", "mean_t_ptr", "m_xx_ptr", "m_tx_ptr", "m_tt_ptr", "hyper_ptr", "history_ptr",
             "w_ptr", "b_ptr", "w_buf_ptr", "b_buf_ptr", "w_state_ptr", "b_state_ptr", "w_buf_state_ptr",
             "b_buf_state_ptr", "n_rows", "D", "O", "n_epochs"]
    types = ["*fp64"] * 7 + ["*fp32"] * 8 + ["i64"] * 4
    constants = dict(HAS_BIAS=True, UPDATE_W=True, UPDATE_B=True, MEAN=True, W_FLAGS=15, B_FLAGS=15,
                     INIT_W_BUFFER=True, INIT_B_BUFFER=True, **blocks)
    signature = dict(zip(names, types)) | {k: "constexpr" for k in constants}
    compiled = triton.compile(ASTSource(stats_sgd._stats_sgd_kernel, signature, constants), target=TARGET,
                              options=dict(num_warps=stats_sgd.EPOCH_WARPS))
    return blocks, _resources(compiled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill or too much shared memory")
    parser.add_argument("--regime", help="only this regime name (e.g. stats-tall)")
    parser.add_argument("--dtype", choices=sorted(_TL.values()), help="only this input dtype")
    args = parser.parse_args(argv)
    bad = []
    for regime in STATS_REGIMES:
        if not regime.gpu or (args.regime and regime.name != args.regime) \
                or (args.dtype and _TL[regime.dtype] != args.dtype):
            continue
        d, o = regime.in_features, regime.out_features
        block_d = linear_stats.stats_config(d, o, _Cuda(), False, regime.dtype != torch.float32).block_d
        launches = [("diagonal", True)] + ([("off-diagonal", False)] if d > block_d else [])
        rows = [(f"pass, {what}", *compile_pass(d, o, regime.dtype, diag)) for what, diag in launches]
        if regime.dtype == torch.float32:  # precision="fp64": fp64 products of fp32 data
            block_d64 = linear_stats.stats_config(d, o, _Cuda(), True).block_d
            rows += [(f"pass fp64, {what}", *compile_pass(d, o, regime.dtype, diag, fp64=True))
                     for what, diag in [("diagonal", True)] + ([("off-diagonal", False)] if d > block_d64 else [])]
        if stats_sgd.stats_sgd_supported(d, o):
            rows.append(("epochs", *compile_epochs(d, o, regime.dtype)))
        for what, cfg, res in rows:
            ok = res["stack"] == 0 and res["local"] == 0 and res["shared"] <= SHARED_LIMIT
            bad += [] if ok else [(regime.group, what)]
            print(f"{regime.group:42s} {what:22s} regs {res['registers']:3d}  stack {res['stack']:4d} B  "
                  f"local {res['local']} B  shared {res['shared']:6d} B  {'ok' if ok else 'SPILLS/SMEM'}  {cfg}")
    if bad:
        print(f"{len(bad)} kernel(s) spill or exceed {SHARED_LIMIT} B of shared memory: {bad}")
    else:
        print("no spills; shared memory within the limit")
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
