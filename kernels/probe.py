"""Whether Triton's interpreter can run these kernels here (a one-time check, at first use).

The interpreter hands integer kernel arguments over as one-element arrays. Releases
before 3.9 (3.6 seen) read a loop bound from them with ``int(array)``, which NumPy 2
refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
kernel with a loop over a runtime bound fails there. This runs one such loop.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(out_ptr, n):
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)


@functools.cache
def interpreter_runs_runtime_loops() -> bool:
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_kernel[(1,)](out, 3)
    except Exception:  # the interpreter's own failure, whatever it raises
        return False
    return int(out[0]) == 3
