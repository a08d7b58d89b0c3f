"""Measured block choices of the default kernels, per Triton release.

The fastest blocks of bench/sweep.py on an H200 (torch 2.11.0, Triton 3.6.0, 2026-11-26; the data:
bench/results/H200-2026-11-26-sweep.json), for the shapes it swept: D classes 64, 256, 1024 (D up
to 64, up to 256, up to 1024) with O <= 16: the fastest of those that do not spill registers when
compiled (tests/test_compile.py; a few faster ones spill 8-64 B/thread with Triton 3.9 or 3.6) and
whose row-tile loop is pipelined. Elsewhere, and where a choice would not fit the card's shared
memory, config.py's rules decide.

Tables are keyed by Triton release ("major.minor"), because the same blocks compile differently
from one release to the next (the sweep's fastest spill with one and not the other). A release
without its own table takes the newest one before it; a release older than every table has none
(the rules decide). Today both known releases keep the choices of the Triton 3.6 sweep, which also
compile without spills with Triton 3.9, except deep tf32x3 (bf16's default precision there: 32 B per
thread with 3.9, none with 3.6; fp32 tf32x3, opt-in, spills 40-72 B with both; 2 stages change
nothing): a sweep run under another release adds its own table.
"""

from __future__ import annotations

import functools

MEASURED_SHARED_PER_BLOCK = 232448  # the card the tables were measured on (an sm_90 block's limit)

#   gradient: (precision, input bytes, D class) -> (BLOCK_N, D in chunks of CHUNK_D?, warps, stages, programs per SM)
GradTable = dict[tuple[str, int, int], tuple[int, bool, int, int, int]]
#   inference, fp32: (precision, D class, O class 16 or 256) -> (BLOCK_N, BLOCK_D (0: one block), BLOCK_O cap, warps)
ForwardTable = dict[tuple[str, int, int], tuple[int, int, int, int]]

_H200_SWEEP_GRAD: GradTable = {
    ("ieee", 4, 64): (128, False, 4, 3, 2), ("tf32", 4, 64): (64, False, 4, 2, 4),
    ("tf32x3", 4, 64): (128, False, 4, 2, 2),
    ("ieee", 2, 64): (128, False, 4, 3, 2), ("tf32x3", 2, 64): (16, False, 4, 6, 4),
    ("ieee", 4, 256): (32, False, 4, 2, 2),
    ("tf32x3", 4, 256): (16, False, 4, 2, 2),
    ("ieee", 2, 256): (32, False, 4, 2, 2), ("tf32x3", 2, 256): (16, False, 4, 3, 2),
    ("ieee", 4, 1024): (16, False, 8, 3, 1), ("tf32", 4, 1024): (16, False, 8, 2, 1),
    ("tf32x3", 4, 1024): (16, False, 8, 2, 1),
    ("ieee", 2, 1024): (16, False, 8, 3, 1), ("tf32x3", 2, 1024): (16, False, 8, 3, 1),
}
_H200_SWEEP_FORWARD: ForwardTable = {
    ("ieee", 64, 16): (128, 0, 16, 4), ("tf32", 64, 16): (64, 0, 16, 8), ("tf32x3", 64, 16): (64, 0, 16, 4),
    ("ieee", 256, 16): (64, 0, 16, 4), ("tf32", 256, 16): (64, 0, 16, 8), ("tf32x3", 256, 16): (16, 0, 16, 4),
    ("ieee", 1024, 16): (32, 256, 16, 4), ("tf32", 1024, 16): (64, 256, 16, 4),
    ("tf32x3", 1024, 16): (16, 256, 16, 4),
    ("tf32", 64, 256): (128, 0, 64, 8),
}

# Triton release -> table. 3.6: measured with it; 3.9: the same choices, checked to compile unspilled.
MEASURED_GRAD: dict[str, GradTable] = {"3.6": _H200_SWEEP_GRAD, "3.9": _H200_SWEEP_GRAD}
MEASURED_FORWARD: dict[str, ForwardTable] = {"3.6": _H200_SWEEP_FORWARD, "3.9": _H200_SWEEP_FORWARD}


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a Triton version string such as "3.6.0" or "3.9.0+git1234"."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def table_for(tables: dict[str, dict], version: str) -> dict:
    """The table of ``version``'s release, else of the newest release before it, else {}."""
    wanted = release(version)
    known = sorted((release(key), key) for key in tables)
    older = [key for rel, key in known if rel <= wanted]
    return tables[older[-1]] if older else {}


@functools.cache
def triton_version() -> str:
    import triton

    return triton.__version__


def measured_grad_table() -> GradTable:
    return table_for(MEASURED_GRAD, triton_version())


def measured_forward_table() -> ForwardTable:
    return table_for(MEASURED_FORWARD, triton_version())
