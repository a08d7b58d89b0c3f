"""Compile the one-launch SGD step (kernels/sgd_step.py) and the reduce kernels for sm_90 on the CPU,
at the plans the launch helpers make for the GPU step regimes (bench/regimes.py), and report
registers, spills and shared memory (bench/compile_report.py's compiler and reader).

    python bench/step_compile.py            # the table
    python bench/step_compile.py --check    # exit 1 on a spill or shared memory over the limit

TRITON_INTERPRET must be unset (this script clears it before Triton is imported).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import compile_report  # noqa: E402
from regimes import REGIMES  # noqa: E402

SHARED_LIMIT = 232_448  # bytes per block on sm_90


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def plans() -> list[tuple[str, object]]:
    """(label, plan) of each launch: the one-launch step of every GPU step regime (plain SGD, and
    momentum + weight decay with the learning rate read from a tensor), and its two-launch reduce."""
    from linreg_fused.kernels import config, reduce_update, sgd_step
    from linreg_fused.kernels.specs import ColumnTarget, SGDHyper

    arch = compile_report.ARCHS[90]
    profile = config.DeviceProfile(gpu=True, multiprocessors=arch.multiprocessors,
                                   shared_per_block=arch.shared_per_block, shared_per_sm=arch.shared_per_sm)
    out = []
    for regime in REGIMES:
        if not regime.gpu or regime.kind not in ("step", "fit"):
            continue
        n, d, o = regime.rows_per_step, regime.in_features, regime.out_features
        dt = regime.dtype
        pdt = torch.float32
        precision = "tf32x3" if dt == torch.bfloat16 else "ieee"
        x, t, w, b = _meta(n, d, dtype=dt), _meta(n, o, dtype=dt), _meta(o, d, dtype=pdt), _meta(o, dtype=pdt)
        lr = _meta(1, dtype=torch.float32)
        for name, hyper, buffers in (("sgd", SGDHyper(lr=regime.lr), (None, None)),
                                     ("momentum+wd, tensor lr",
                                      SGDHyper(lr=0.0, momentum=0.9, weight_decay=1e-4, lr_tensor=lr),
                                      (_meta(o, d, dtype=pdt), _meta(o, dtype=pdt)))):
            targets = [ColumnTarget(0, w, hyper, buffers[0]), ColumnTarget(o * d, b, hyper, buffers[1])]
            plan, sums, _ = sgd_step.plan_linear_mse_step(
                x, w, b, t, targets, scale=2.0 / (n * o), loss_out=_meta(dtype=pdt), loss_scale=1.0 / (n * o),
                input_precision=precision, profile=profile)
            p, k = sums.buffer.shape
            rule = "one launch" if sgd_step.one_launch(p, k, profile) else "two launches"
            label = f"{regime.name} {regime.dtype_name} {precision} {name} (P={p}, K={k}: {rule})"
            out.append((f"step   {label}", plan))
            update = reduce_update.plan_reduce_update(sums.buffer, targets, scale=2.0 / (n * o),
                                                      loss_out=_meta(dtype=pdt), loss_column=sums.loss_column,
                                                      loss_scale=1.0 / (n * o), profile=profile)
            out.append((f"reduce {label}", update))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill or too much shared memory")
    args = parser.parse_args(argv)
    reason = compile_report.tools_available()
    if reason:
        print(reason)
        return 0
    seen, problems = {}, 0
    print(f"{'launch':92} {'regs':>4} {'stack':>5} {'local':>5} {'shared':>7}")
    for label, plan in plans():
        spec, key = compile_report.compile_spec(plan, 90)
        if key not in seen:
            seen[key] = compile_report.compile_one(spec)
        r = seen[key]
        bad = r["stack"] > 0 or r["local"] > 0 or r["shared"] > SHARED_LIMIT
        problems += bad
        print(f"{label:92} {r['regs']:4} {r['stack']:5} {r['local']:5} {r['shared']:7}{'  <- problem' if bad else ''}")
    print(f"{len(seen)} specializations; {problems} launch(es) spill or exceed shared memory")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
