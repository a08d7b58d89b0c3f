"""The one prepared script for a GPU session: docs/gpu.md says how it is run and read.

From a clean checkout on the GPU machine (torch with CUDA and Triton installed, no network),
in the repository root:

    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ; \\
        PYTHONUNBUFFERED=1 python3 bench/gpu_check.py "$OUT" --commit <hash>

In one run, within --budget-s (default 330 s):

  1. the commit it runs (git rev-parse, --commit, a fingerprint of its sources), printed first;
  2. versions, GPU and driver; the ceilings measured in the same run: device copy, pinned
     host-to-device copy, IEEE fp32 / tf32 / bf16 matrix products (bench/check_env.py);
  3. every section bench/gpu_<topic>.py, found by name (bench/check_sections.py): those with
     ORDER < 50 (parity) and every section's warm() side by side in child processes, then
     the timing sections one at a time in this process, in ORDER, each within its share of
     the budget; a section that fails is recorded and the run goes on (a broken CUDA context:
     the run goes on in a fresh process);
  4. the targets evaluated next to each figure (bench/targets.py), OUTDIR/gpu_check.json
     (written after every section) and OUTDIR/gpu_check.log, and a short table last.

    python bench/gpu_check.py OUTDIR --cpu-smoke     # every section on the CPU, tiny shapes,
                                                     # Triton's interpreter; no performance claims
    python bench/gpu_check.py OUTDIR --compile-only  # no GPU: the launch shapes, for bench/compile_report.py

Exit status: 0 all passed, 1 something failed or errored, 2 no CUDA device (without --cpu-smoke).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_BUDGET_S = 330.0  # docs/gpu.md: a 6-minute run leaves a rerun inside 15 minutes of device time
SMOKE_BUDGET_S = 600.0
PARALLEL_PHASE_S = 60.0  # the parallel phase's share of a GPU run (its jobs end by then)
RESERVE_S = 8.0  # for the targets, the JSON and the table
MAX_RESTARTS = 2  # fresh processes after a broken CUDA context


def source_fingerprint() -> str:
    """A hash of the code this run executes (pyproject.toml and every .py file under linreg_fused/,
    kernels/, bench/ and tests/, by path and content): the same on the GPU machine as in the
    checkout it was sent from, whatever .git travelled with it."""
    digest = hashlib.sha256()
    files = [ROOT / "pyproject.toml", *(f for d in ("linreg_fused", "kernels", "bench", "tests")
                                        for f in (ROOT / d).rglob("*.py"))]
    for path in sorted(f for f in files if f.is_file() and "__pycache__" not in f.parts):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def commit_info(given: str | None) -> dict[str, str | None]:
    """The commit of this checkout (git rev-parse HEAD), the given one, uncommitted changes, and
    the source fingerprint."""
    info: dict[str, str | None] = {"commit_given": given, "source_fingerprint": source_fingerprint()}
    for key, cmd in (("git_commit", ["git", "rev-parse", "HEAD"]), ("git_status", ["git", "status", "--porcelain"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
            info[key] = out.stdout.strip() if out.returncode == 0 else f"unknown ({out.stderr.strip()[:120]})"
        except Exception as err:  # noqa: BLE001 -- git may be absent on the GPU machine
            info[key] = f"unknown ({err})"
    return info


def commit_line(info: dict[str, str | None]) -> str:
    git, given = info["git_commit"] or "", info["commit_given"]
    dirty = len((info.get("git_status") or "").splitlines()) if not git.startswith("unknown") else 0
    line = f"gpu_check: commit {git}" + (f" ({dirty} files changed)" if dirty else "")
    if given:
        line += f"; given {given}"
        if not git.startswith("unknown") and not git.startswith(given):
            line += " (git here differs: a stale .git can travel with the tree)"
    return line + f"; source {info['source_fingerprint']} (compare: python3 bench/gpu_check.py --fingerprint)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="linreg-fused GPU check: commit, versions, ceilings, every bench/gpu_*.py section.")
    p.add_argument("outdir", type=Path, nargs="?")
    p.add_argument("--fingerprint", action="store_true", help="print the source fingerprint and exit")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"the whole run's wall-clock budget (default {DEFAULT_BUDGET_S:.0f}; {SMOKE_BUDGET_S:.0f} with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="every section on the CPU (Triton's interpreter), tiny shapes")
    p.add_argument("--commit", help="the commit this tree is (printed beside git's, and recorded)")
    p.add_argument("--only", nargs="+", default=None, help="run only these sections (SECTION or module names)")
    p.add_argument("--skip", nargs="+", default=[], help="leave out these sections")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile peers")
    p.add_argument("--jobs", type=int, default=None,
                   help="child processes of the parallel phase (default 12 on a GPU; 0 with --cpu-smoke: all in this process)")
    p.add_argument("--compile-only", action="store_true", help="no GPU: write the launch shapes for bench/compile_report.py")
    p.add_argument("--sections-dir", type=Path, default=BENCH, help=argparse.SUPPRESS)  # tests: stub sections
    p.add_argument("--grace-s", type=float, default=None, help=argparse.SUPPRESS)  # tests: a section's overrun
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # after a broken CUDA context
    p.add_argument("--child", help=argparse.SUPPRESS)  # "module:run" or "module:warm:i/k"
    p.add_argument("--child-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline-epoch", type=float, help=argparse.SUPPRESS)
    p.add_argument("--start-epoch", type=float, help=argparse.SUPPRESS)
    p.add_argument("--ceilings", default="{}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup(args: argparse.Namespace):
    """Environment, torch and this checkout's linreg_fused; returns the device (None: no CUDA)."""
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before linreg_fused's kernels are imported
    import torch

    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny shapes; a shared CPU's thread pool only adds noise
        return torch.device("cpu")
    return torch.device("cuda") if torch.cuda.is_available() else None


def options(args: argparse.Namespace) -> dict:
    return {"skip_compile": args.skip_compile}


def grace(args: argparse.Namespace) -> dict:
    return {} if args.grace_s is None else {"grace_s": args.grace_s}


def child_main(args: argparse.Namespace) -> int:
    """One job of the parallel phase: a section's run() or one shard of its warm()."""
    from check_ctx import Ctx
    from check_env import import_project
    from check_sections import LineRecorder, as_section, load_module, run_here

    device = setup(args)
    import_project()
    module, what, *shard = args.child.split(":")
    i, k = (int(v) for v in shard[0].split("/")) if shard else (0, 1)
    rec = LineRecorder(time.monotonic() - (time.time() - args.start_epoch), rows_path=args.child_dir / "rows.jsonl")
    path = args.sections_dir / f"{module}.py"
    section = as_section(load_module(path), path)
    budget = args.deadline_epoch - time.time()
    ceilings = json.loads(args.ceilings)
    summary = run_here(section, lambda deadline: Ctx(rec, section.name, device=device, smoke=args.cpu_smoke,
                                                      deadline=deadline, ceilings=ceilings, alone=False, shard=(i, k),
                                                      options=options(args)),
                       budget, fn=section.warm if what == "warm" else section.run, **grace(args))
    rec.add({**summary, "measure": "summary", "name": "(summary)"})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fingerprint:
        print(source_fingerprint())
        return 0
    if args.outdir is None:
        print("gpu_check: an output folder is required", file=sys.stderr)
        return 2
    if args.child:
        return child_main(args)
    commit = commit_info(args.commit)
    print(commit_line(commit), flush=True)  # first: a wrong checkout shows in seconds
    if args.compile_only:
        from check_env import compile_only

        return compile_only(args.outdir)
    device = setup(args)
    if device is None:
        print("gpu_check: no CUDA device here; this script measures a GPU. Run it on an H100/H200 "
              "(or use --cpu-smoke to dry-run every section through Triton's interpreter).", file=sys.stderr)
        return 2
    from check_run import Run

    budget = args.budget_s or (SMOKE_BUDGET_S if args.cpu_smoke else DEFAULT_BUDGET_S)
    jobs = args.jobs if args.jobs is not None else (0 if args.cpu_smoke else 12)
    run = Run(args, device, budget, jobs, commit, parallel_s=PARALLEL_PHASE_S, reserve_s=RESERVE_S,
              max_restarts=MAX_RESTARTS)
    return run.main(argv if argv is not None else sys.argv[1:], child_argv(args))


def child_argv(args: argparse.Namespace):
    """The command of a child process of the parallel phase."""
    def command(job, budget_s: float, folder: Path, start_epoch: float, ceilings: dict) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), str(folder), "--child", job.label,
                "--child-dir", str(folder), "--deadline-epoch", f"{time.time() + budget_s:.3f}",
                "--start-epoch", f"{start_epoch:.3f}", "--ceilings", json.dumps(ceilings),
                "--sections-dir", str(args.sections_dir), *(["--cpu-smoke"] if args.cpu_smoke else []),
                *(["--grace-s", str(args.grace_s)] if args.grace_s is not None else []),
                *(["--skip-compile"] if args.skip_compile else [])]
    return command


if __name__ == "__main__":
    sys.exit(main())
