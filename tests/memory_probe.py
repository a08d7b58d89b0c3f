"""The peak resident memory of one statistics pass, measured in a fresh process.

    python tests/memory_probe.py streamed|in_memory X.npy T.npy CHUNK_ROWS OUT.pt

The peak is the kernel's high-water mark of the process's resident set
(VmHWM; Linux records it before any page is unmapped, so no allocation is
missed however short it lives), not a sampler's reading, which a loaded
machine can miss. Not getrusage's ru_maxrss: across exec it keeps the mark
of the image it replaced, which for a vfork'ed child is the parent's (a
pytest process that has just written the file reads as the child's peak).

Everything that is not the pass runs before the baseline is read: imports,
a warm-up pass over two chunks (buffers sized by the shapes are the
process's, not the pass's), and, for "streamed", reading every page of the
memory-mapped files once, so their page-cache pages are in the baseline and
the peak above it is the memory the pass allocated. The mark is reset at the
baseline (/proc/self/clear_refs); where a kernel refuses that, the probe
reports the mark it started from, and the caller checks it is near the
baseline.

Prints one JSON line: {"base", "start_peak", "peak"} in bytes (and RssAnon, RssFile at the end);
saves the statistics' moments to OUT.pt for the caller to compare.
``peak_memory`` runs it and returns the peak above the baseline.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory(mode: str, x_path, t_path, chunk_rows: int, out) -> tuple[int, int]:
    """(bytes the pass ("streamed" | "in_memory") allocated at its peak, how far above the baseline
    the high-water mark started), run in a fresh process; its moments are saved to ``out``."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, __file__, mode, str(x_path), str(t_path), str(chunk_rows), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{mode}: baseline {rss['base'] / 2**20:.1f} MiB, high-water mark at the start "
          f"{rss['start_peak'] / 2**20:.1f} MiB, peak {rss['peak'] / 2**20:.1f} MiB")
    return rss["peak"] - rss["base"], rss["start_peak"] - rss["base"]


def main(mode: str, x_path: str, t_path: str, chunk_rows: int, out: str) -> None:
    import numpy as np
    import torch

    from linreg_fused import LinearStats

    torch.set_num_threads(1)
    # Warm up on two chunks of the same width (allocators, BLAS buffers and thread pools sized
    # by the shapes are the process's, not the pass's).
    x, t = np.load(x_path, mmap_mode="r"), np.load(t_path, mmap_mode="r")
    xw, tw = np.array(x[: 2 * chunk_rows]), np.array(t[: 2 * chunk_rows])
    LinearStats.from_arrays(xw, tw, chunk_rows=chunk_rows, backend="torch")
    LinearStats.from_tensors(torch.from_numpy(xw), torch.from_numpy(tw), backend="torch")
    del xw, tw
    if mode == "streamed":
        for a in (x, t):
            float(a.sum())  # fault every page in now: file pages, not the pass's memory
    else:
        del x, t
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current resident set
    except OSError:
        pass
    base, start_peak = _status("VmRSS"), _status("VmHWM")

    if mode == "streamed":
        stats = LinearStats.from_arrays(x, t, chunk_rows=chunk_rows, backend="torch")
    else:
        stats = LinearStats.from_tensors(torch.from_numpy(np.load(x_path)), torch.from_numpy(np.load(t_path)),
                                         backend="torch")
    peak = _status("VmHWM")
    torch.save([stats.n_rows, stats.mean_x, stats.mean_t, stats.m_xx, stats.m_tx, stats.m_tt], out)
    print(json.dumps({"base": base, "start_peak": start_peak, "peak": peak, "anon": _status("RssAnon"),
                      "file": _status("RssFile")}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
