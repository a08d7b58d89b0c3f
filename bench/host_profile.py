"""Where the host time of a mini-batch fused step goes: cProfile of train_step calls.

The GPU check times the mini-batch regime (65536×256→16, batch 1024) per step;
there the GPU work is ~35 µs (the CUDA-graphed eager step) and the rest is the
host. This prints the step's wall time per call (synced once at the end), the
same for the eager step, and the functions that take the fused step's host time.

    python3 bench/host_profile.py [--steps 300]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
from torch import nn

from linreg_fused import FusedLinearRegressor, FusedSGD


def per_step_us(step, batches, device) -> float:
    for xb, tb in batches[:10]:  # warm-up (compiles on the first call)
        step(xb, tb)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for xb, tb in batches:
        step(xb, tb)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / len(batches) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    device = torch.device("cuda")
    n, d, o, batch = 65536, 256, 16, 1024
    x, t = torch.randn(n, d, device=device), torch.randn(n, o, device=device)
    idx = torch.randint(0, n, (args.steps, batch), device=device)
    batches = [(x[i], t[i]) for i in idx]  # gathered beforehand: the step alone is timed

    model = FusedLinearRegressor(d, o, device=device)
    opt = FusedSGD(model.parameters(), lr=1e-3)
    fused = per_step_us(lambda xb, tb: model.train_step(xb, tb, opt), batches, device)

    ref = nn.Linear(d, o, device=device)
    sgd = torch.optim.SGD(ref.parameters(), lr=1e-3)

    def eager(xb, tb):
        sgd.zero_grad(set_to_none=True)
        loss = F.mse_loss(ref(xb), tb)
        loss.backward()
        sgd.step()
        return loss

    eager_us = per_step_us(eager, batches, device)
    print(f"host_profile: fused train_step {fused:.1f} us/step, eager step {eager_us:.1f} us/step "
          f"(batch {batch}, {d}->{o}, synced once per {args.steps} steps)")
    prof = cProfile.Profile()
    prof.enable()
    for xb, tb in batches:
        model.train_step(xb, tb, opt)
    torch.cuda.synchronize(device)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
