"""Mutation testing: plant each hand-written bug of mutants.py in a scratch
copy of the repository, run the tests that should catch it, and report which
bugs the suite kills.

    python tests/mutation/run.py                 # every mutant, a table and the score
    python tests/mutation/run.py --list          # the mutants, and which no longer apply (STALE)
    python tests/mutation/run.py --only fit-reused-row-order --only cli-momentum-ignored
    python tests/mutation/run.py --jobs 1 --confirm   # one at a time; survivors rerun against the whole suite
    python tests/mutation/run.py --ref main --files   # another git ref's code and tests, whole test files

A scratch copy is the repository's files (tracked and untracked, not
ignored) in a temporary folder, with linreg_fused/kernels linked to
kernels/ (the package-dir mapping of pyproject.toml). pytest runs there with
the scratch root first on sys.path, so the mutated copy is what the tests
import; byte-code is not written, so a mutant is never hidden by a stale
cache. Each job forks its pytest runs from a process that has imported torch
and Triton once (zygote.py; --no-fork starts a fresh interpreter per run).
GPUs are hidden: the mutants are CPU-visible bugs, run through Triton's
interpreter everywhere.

A mutant whose original snippet is no longer in its file is STALE (the code
moved on): refresh its snippet in mutants.py; it is not scored. The score is
killed / (killed + survived); a mutant that times out or crashes the tests
counts as killed. Before the mutants, the union of their tests runs once
unmutated (the baseline): a failing test would otherwise "kill" everything.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mutants import MUTANTS, Mutant  # noqa: E402

ROOT = HERE.parents[1]
# test_packaging.py checks the installed layout (no top-level `kernels`), which a scratch copy on PYTHONPATH lacks.
PYTEST_ARGS = ["-x", "-q", "--no-header", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
               "--ignore=tests/test_packaging.py"]


def scratch_copy(ref: str | None) -> Path:
    """A copy of the repository (the working tree, or git ref ``ref``) in a new temporary folder."""
    dest = Path(tempfile.mkdtemp(prefix="linreg-mutant-"))
    if ref is None:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                check=True, capture_output=True).stdout.decode().split("\0")
        for name in filter(None, listed):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    link = dest / "linreg_fused" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    return dest


def test_env(scratch: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
    env.update(PYTHONDONTWRITEBYTECODE="1", CUDA_VISIBLE_DEVICES="")
    if scratch is not None:
        env["PYTHONPATH"] = str(scratch)
    return env


class Launcher:
    """Runs pytest in one scratch copy: forked from a zygote, or as a fresh process."""

    def __init__(self, scratch: Path, fork: bool) -> None:
        self.scratch, self.out = scratch, scratch.with_name(scratch.name + ".out")
        self.zygote = self.proc = None
        if fork:
            self.zygote = subprocess.Popen([sys.executable, str(HERE / "zygote.py")], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=test_env())

    def run(self, tests: list[str], timeout: float) -> tuple[int | None, float, str]:
        """(pytest's exit code, negative for a signal, None on timeout; seconds; its output)."""
        start = time.perf_counter()
        if self.zygote is not None:
            request = dict(cwd=str(self.scratch), args=PYTEST_ARGS + tests, timeout=timeout, out=str(self.out))
            self.zygote.stdin.write(json.dumps(request) + "\n")
            self.zygote.stdin.flush()
            reply = self.zygote.stdout.readline()
            if not reply:
                raise RuntimeError("the pytest launcher (zygote.py) died; try --no-fork")
            rc = json.loads(reply)["rc"]
            output = self.out.read_text(errors="replace")
        else:
            self.proc = proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=self.scratch, env=test_env(self.scratch),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                output, _ = proc.communicate(timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                rc = None
        return rc, time.perf_counter() - start, output

    def kill(self) -> None:
        """Stop a run in progress (the zygote kills its child's process group)."""
        if self.zygote is not None:
            self.zygote.terminate()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.stdin.close()
            self.zygote.wait()
        self.out.unlink(missing_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


def outcome(rc: int | None, output: str, timeout: float) -> tuple[str, str]:
    """("pass" | "fail" | "timeout" | "error", detail) of one pytest run."""
    if rc is None:
        return "timeout", f"over {timeout:.0f} s"
    if rc == 0:
        return "pass", ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if rc == 1 and failed:
        return "fail", failed[0]
    if rc < 0:  # the mutant crashed the test process (e.g. an out-of-bounds access): caught
        return "fail", f"the tests crashed ({signal.Signals(-rc).name})"
    tail = [line for line in output.splitlines() if line.strip()][-3:]
    return "error", f"pytest exit {rc}: " + " | ".join(tail)


def widened(root: Path, tests: tuple[str, ...]) -> tuple[str, ...]:
    """The files of ``tests`` that exist under ``root``, in order; the whole suite if none does."""
    files = [f for f in dict.fromkeys(t.split("::")[0] for t in tests) if (root / f).is_file()]
    return tuple(files) or ("tests",)


def snippet_count(root: Path, m: Mutant) -> int:
    path = root / m.file
    return path.read_text().count(m.original) if path.is_file() else 0


def closest_line(root: Path, m: Mutant) -> str:
    """For a stale mutant: the line of its file most like the snippet's first line."""
    path = root / m.file
    if not path.is_file():
        return f"{m.file} is gone"
    first = m.original.strip().splitlines()[0].strip()
    lines = [line.strip() for line in path.read_text().splitlines()]
    near = difflib.get_close_matches(first, lines, n=1, cutoff=0.5)
    return f"closest line: {near[0]!r}" if near else "no similar line"


def run_mutant(m: Mutant, launchers: "queue.Queue[Launcher]", timeout: float) -> tuple[str, float, str]:
    launcher = launchers.get()
    try:
        path = launcher.scratch / m.file
        original = path.read_text()
        count = original.count(m.original)
        if count != 1:
            return ("STALE", 0.0, closest_line(launcher.scratch, m)) if count == 0 else (
                "ERROR", 0.0, f"snippet found {count} times; make it unique")
        path.write_text(original.replace(m.original, m.replacement))
        try:
            if "tests" in m.tests:  # the whole suite takes longer than a selection
                timeout *= 8
            rc, seconds, output = launcher.run(list(m.tests), timeout)
        finally:
            path.write_text(original)
        result, detail = outcome(rc, output, timeout)
        status = {"pass": "SURVIVED", "fail": "KILLED", "timeout": "TIMEOUT", "error": "ERROR"}[result]
        return status, seconds, detail
    finally:
        launchers.put(launcher)


def list_mutants(chosen: list[Mutant], ref: str | None) -> None:
    root = ROOT if ref is None else scratch_copy(ref)
    try:
        for m in chosen:
            count = snippet_count(root, m)
            state = "ok" if count == 1 else ("STALE" if count == 0 else f"AMBIGUOUS ({count}x)")
            print(f"{m.id:38} {state:9} {m.file}: {m.what}")
            if count == 0:
                print(f"{'':38} {'':9} {closest_line(root, m)}")
    finally:
        if ref is not None:
            shutil.rmtree(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="list the mutants and whether each still applies")
    p.add_argument("--only", action="append", default=[], metavar="ID", help="run only these mutants (repeatable)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="mutants run at once")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant before it counts as killed")
    p.add_argument("--ref", default=None, help="test this git ref's code and tests instead of the working tree")
    p.add_argument("--files", action="store_true",
                   help="widen each mutant's tests to their whole files (those the tree has; else the whole suite), "
                        "e.g. to score an older ref whose tests have other names")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    p.add_argument("--confirm", action="store_true", help="rerun each survivor against the whole suite")
    p.add_argument("--no-fork", action="store_true", help="a fresh interpreter per pytest run (slower)")
    p.add_argument("--deselect", action="append", default=[], metavar="NODE",
                   help="leave out a test that fails without any mutant (repeatable; passed to pytest)")
    args = p.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    duplicated = {i for i in ids if ids.count(i) > 1}
    if duplicated:
        p.error(f"duplicate mutant ids: {sorted(duplicated)}")
    unknown = set(args.only) - set(ids)
    if unknown:
        p.error(f"unknown mutant ids: {sorted(unknown)}")
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    PYTEST_ARGS.extend(arg for node in args.deselect for arg in ("--deselect", node))
    if args.list:
        list_mutants(chosen, args.ref)
        return 0

    start = time.perf_counter()
    jobs = max(1, min(args.jobs, len(chosen)))
    made = [Launcher(scratch_copy(args.ref), fork=not args.no_fork) for _ in range(jobs)]
    launchers: "queue.Queue[Launcher]" = queue.Queue()
    for launcher in made:
        launchers.put(launcher)
    results: dict[str, tuple[str, float, str]] = {}

    def abort(signum, frame):  # stop the runs now, then clean up below
        for launcher in made:
            launcher.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, abort)
    signal.signal(signal.SIGINT, abort)
    try:
        scratch = made[0].scratch
        where = subprocess.run([sys.executable, "-c", "import linreg_fused.kernels.fused_fit as f; print(f.__file__)"],
                               cwd=scratch, env=test_env(scratch), capture_output=True, text=True,
                               check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(scratch.resolve()):
            print(f"the scratch copy imports the package from {where}, not from itself", file=sys.stderr)
            return 2
        if args.files:
            chosen = [m._replace(tests=widened(scratch, m.tests)) for m in chosen]
        live = [m for m in chosen if snippet_count(scratch, m) == 1]
        if not args.no_baseline and live:
            selection = list(dict.fromkeys(t for m in live for t in m.tests))
            print(f"baseline: {len(selection)} test selections, unmutated ...", flush=True)
            rc, seconds, output = made[0].run(selection, args.timeout * 8)
            result, detail = outcome(rc, output, args.timeout * 8)
            if result != "pass":
                print(f"baseline {result} after {seconds:.0f} s: {detail}; fix the tests first", file=sys.stderr)
                return 2
            print(f"baseline passed in {seconds:.0f} s", flush=True)

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = {pool.submit(run_mutant, m, launchers, args.timeout): m for m in chosen}
            for fut in concurrent.futures.as_completed(futures):
                m = futures[fut]
                results[m.id] = fut.result()
                status, seconds, detail = results[m.id]
                print(f"  {status:8} {m.id} ({seconds:.0f} s)", flush=True)

        if args.confirm:
            for m in chosen:
                if results[m.id][0] == "SURVIVED":
                    print(f"confirming {m.id} against the whole suite ...", flush=True)
                    one: "queue.Queue[Launcher]" = queue.Queue()
                    one.put(made[0])
                    status, seconds, detail = run_mutant(m._replace(tests=("tests",)), one, args.timeout)
                    results[m.id] = (status, results[m.id][1] + seconds, detail or "(whole suite)")
    finally:
        for launcher in made:
            launcher.close()
    elapsed = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime

    print()
    print(f"| {'mutant':38} | {'area':10} | {'status':8} | {'s':>4} | what; killed by |")
    print(f"|{'-' * 40}|{'-' * 12}|{'-' * 10}|{'-' * 6}|{'-' * 17}|")
    for m in chosen:
        status, seconds, detail = results[m.id]
        print(f"| {m.id:38} | {m.area:10} | {status:8} | {seconds:4.0f} | {m.what}; {detail} |")
    counts = {s: sum(r[0] == s for r in results.values()) for s in ("KILLED", "TIMEOUT", "SURVIVED", "STALE", "ERROR")}
    scored = counts["KILLED"] + counts["TIMEOUT"] + counts["SURVIVED"]
    killed = counts["KILLED"] + counts["TIMEOUT"]
    print()
    print(f"mutation score: {killed}/{scored} killed = {100 * killed / max(scored, 1):.0f}% "
          f"({counts['TIMEOUT']} by timeout; {counts['STALE']} stale and {counts['ERROR']} errors not scored); "
          f"{elapsed / 60:.1f} min with {jobs} job(s), {cpu / 60:.1f} CPU-min")
    survivors = [i for i, r in results.items() if r[0] == "SURVIVED"]
    if survivors:
        print("survivors: " + ", ".join(survivors))
    return 1 if counts["ERROR"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
