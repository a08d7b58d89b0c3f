"""The SASS of a compiled kernel: its main loop's instruction counts, and a time predicted from them.

    main_loop_counts(cubin)  the loop found by its back edge (a branch to an earlier address; the
                             one whose body holds the most instructions), counted by opcode
    predict(...)             an H200 time from those counts, the bytes and the resident warps

Disassembly: the cuobjdump bundled with Triton (``cuobjdump -sass``). Counts are static: a loop
body counts once, an inner loop's body once inside the outer one.

The prediction model (stated, not fitted to the new kernels; docs/kernels.md has its figures):

    memory_ms  = bytes / COPY_GBPS                     (the copy rate measured on the H200)
    issue_ms   = loop trips × warps per program × loop instructions / (SMs × 4 schedulers × clock)
    bound_ms   = max(memory_ms, issue_ms)               (perfect overlap, every issue slot used)
    predicted  = max(memory_ms / memory_share, issue_ms / issue_share)
    issue_share  = min(1, resident warps per SM / HIDING_WARPS)
    memory_share = min(1, bytes in flight per SM / IN_FLIGHT_BYTES)

HIDING_WARPS = 32 is calibrated on the default IEEE gradient kernels measured on the H200
(bench/results/H200-2026-11-26-sweep.json): at 8 resident warps per SM, tall, wide and deep ran at
0.24-0.27 of their issue rate (1.00 per SM and cycle of 4; the static counts of the Triton 3.6
compile). Whether barrier-free loops with more warps do better than this linear rule is what the
GPU check will tell; bound_ms is the other end of that range.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

# The H200 (132 SMs, 1,980 MHz boost clock, 4 schedulers each issuing one warp instruction per cycle).
SMS = 132
CLOCK_HZ = 1.98e9
SCHEDULERS = 4
COPY_GBPS = 4223.0  # device-to-device copy, measured on the H200 (bench/results, run 1)
FMA_PER_S = 51e12 / 2  # IEEE fp32 FMAs per second, cuBLAS's measured 51 TFLOP/s on the same card
HIDING_WARPS = 32
IN_FLIGHT_BYTES = 25 * 1024  # Little's law on an H200: ~4.8 TB/s × ~0.7 µs over 132 SMs

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")


def disassemble(cubin: bytes, cuobjdump: str) -> str:
    """``cuobjdump -sass`` of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout


def instructions(sass: str) -> list[tuple[int, str, str, str]]:
    """(address, opcode, modifiers, operands) of every instruction, in order."""
    return [(int(m.group(1), 16), m.group(2), m.group(3), m.group(4)) for m in _LINE.finditer(sass)]


def main_loop(instrs: list[tuple[int, str, str, str]]) -> list[tuple[int, str, str, str]]:
    """The body of the largest loop: from a backward branch's target to the branch. [] when the
    kernel has no loop (a branch to itself, the trap after EXIT, is not one)."""
    best: list = []
    for address, opcode, _, operands in instrs:
        target = _TARGET.search(operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [ins for ins in instrs if start <= ins[0] <= address]
            if len(body) > len(best):
                best = body
    return best


def counts(body: list[tuple[int, str, str, str]]) -> dict[str, int]:
    """The main-loop object of the compile report: total and the instructions that matter."""
    ops = Counter(opcode for _, opcode, _, _ in body)
    mma = [mods for _, opcode, mods, _ in body if opcode in ("HMMA", "HGMMA", "IMMA", "DMMA", "QGMMA")]
    return dict(
        total=len(body), ffma=ops["FFMA"], mma=len(mma), mma_tf32=sum(".TF32" in m for m in mma),
        lds=ops["LDS"] + ops["LDSM"], shfl=ops["SHFL"], bar=ops["BAR"],
        fmul=ops["FMUL"], fadd=ops["FADD"], ldg=ops["LDG"], ldgsts=ops["LDGSTS"], sts=ops["STS"] + ops["STSM"],
        spill=ops["LDL"] + ops["STL"],
    )


def main_loop_counts(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """counts() of the main loop, and ``kernel`` = every instruction of the kernel (what a program
    without a loop runs once)."""
    instrs = instructions(disassemble(cubin, cuobjdump))
    return dict(counts(main_loop(instrs)), kernel=len(instrs))


def predict(*, loop_total: int, loop_trips: int, num_warps: int, resident_warps: int, bytes_moved: int,
            inflight_per_sm: int) -> dict[str, float]:
    """The model above, in ms: memory, issue, bound (perfect overlap) and predicted (calibrated)."""
    memory_ms = bytes_moved / (COPY_GBPS * 1e9) * 1e3
    issue_ms = loop_trips * num_warps * loop_total / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3
    issue_share = min(1.0, resident_warps / HIDING_WARPS) if resident_warps else 0.0
    memory_share = min(1.0, inflight_per_sm / IN_FLIGHT_BYTES) if bytes_moved else 1.0
    predicted = max(memory_ms / memory_share if memory_share else float("inf"),
                    issue_ms / issue_share if issue_share else float("inf"))
    return dict(memory_ms=memory_ms, issue_ms=issue_ms, bound_ms=max(memory_ms, issue_ms), predicted_ms=predicted)


def fma_bound(fmas: int, bytes_moved: int) -> bool:
    """Whether a launch's FMAs at the measured IEEE rate take longer than its bytes at the copy rate."""
    return fmas / FMA_PER_S > bytes_moved / (COPY_GBPS * 1e9)
