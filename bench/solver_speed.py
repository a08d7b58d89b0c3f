"""The one-pass R factor (LinearStats.from_tensors) against the co-moments pass it replaced
(ops.linear_moments, which fit's statistics path still runs), on the same data in one run:
the minimum of a few repeats each, per backend (the PyTorch reference and, without a GPU,
Triton's interpreter), and their ratio.

    python bench/solver_speed.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from linreg_fused import LinearStats  # noqa: E402
from linreg_fused.backend import select_ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (rows, D, O, backends): the interpreter only at sizes it finishes in seconds.
SHAPES = ((1 << 20, 8, 2, ("torch",)), (1 << 18, 64, 4, ("torch",)), (1 << 16, 256, 4, ("torch",)),
          (1 << 20, 1, 1, ("torch",)), (4096, 8, 2, ("torch", "triton")), (16384, 13, 2, ("torch", "triton")),
          (2048, 40, 3, ("torch", "triton")))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import triton

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s); "
          f"torch {torch.__version__}, triton {triton.__version__}; min of {args.repeats}")
    print(f"{'shape':>22s} {'backend':>8s} {'moments ms':>11s} {'factor ms':>10s} {'ratio':>6s}")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for n, d, o, backends in SHAPES:
        x = torch.randn(n, d, generator=g, device=DEVICE) + 3
        t = torch.randn(n, o, generator=g, device=DEVICE)
        for backend in backends:
            if backend == "triton" and DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            ops = select_ops(backend, DEVICE)
            ops.linear_moments(x[:64], t[:64], fp64=False)  # warm-up (JIT, first-use imports)
            LinearStats.from_tensors(x[:64], t[:64], backend=backend)
            moments = best_of(lambda: ops.linear_moments(x, t, fp64=False), args.repeats)
            factor = best_of(lambda: LinearStats.from_tensors(x, t, backend=backend), args.repeats)
            print(f"{f'{n}x{d}->{o}':>22s} {backend:>8s} {moments * 1e3:11.1f} {factor * 1e3:10.1f} "
                  f"{factor / moments:6.2f}", flush=True)


if __name__ == "__main__":
    main()
