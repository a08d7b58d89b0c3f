"""The sections of the GPU check: found, budgeted and run by bench/gpu_check.py.

A section is a file bench/gpu_<topic>.py that defines SECTION (its rows' "section"), ORDER
(sections run in ascending ORDER; parity sections below 50, timing sections above) and
run(ctx). Optional: BUDGET_S (seconds it may take on a GPU; default below); SHARDS (a parallel
section's run() in that many processes, each with ctx.shard = (i, k), each doing its share);
and warm(ctx), which the parallel phase runs in its own process(es) (WARM_SHARDS of them, with
ctx.shard likewise) to fill the on-disk compiler caches that the section's timings then read;
LEFTOVER = True (a timing section that gets whatever time is left when its turn comes, and is
left out when the others' budgets are shared).

Two phases. The parallel phase (ORDER < 50, and every warm()) runs each section in a child
process of its own, several at a time: a kernel that breaks one CUDA context cannot break the
others, and cold compilation proceeds in parallel. The timing phase (ORDER >= 50) runs in this
process, one section at a time, alone on the GPU. In both, a section that raises is an error
row and the run goes on; one that outlives its budget is stopped (SIGALRM here, a kill in a
child) and what it recorded stays.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from check_ctx import Ctx, Recorder, SectionTimeout

PARITY_ORDER_LIMIT = 50
DEFAULT_BUDGET_S = {"parallel": 60.0, "timing": 30.0}  # a section without BUDGET_S
GRACE_S = 10.0  # past its budget a section is stopped (it should have stopped itself at ctx.left_s() <= 0)
MIN_START_S = 3.0  # a section does not start with less than this left


@dataclass
class Section:
    module: str  # "gpu_regimes"
    path: Path
    name: str  # SECTION
    order: float
    budget_s: float
    run: Callable[[Ctx], None]
    warm: Callable[[Ctx], None] | None = None
    warm_shards: int = 1
    shards: int = 1
    leftover: bool = False  # runs with what is left of the run, outside the shared budgets

    @property
    def phase(self) -> str:
        return "parallel" if self.order < PARITY_ORDER_LIMIT else "timing"


def load_module(path: Path) -> ModuleType:
    """Import bench/gpu_<topic>.py under its file name (its folder's other modules importable)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    if path.stem in sys.modules and getattr(sys.modules[path.stem], "__file__", None) == str(path):
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def as_section(module: ModuleType, path: Path) -> Section:
    missing = [a for a in ("SECTION", "ORDER", "run") if not hasattr(module, a)]
    if missing:
        raise TypeError(f"{path.name} is not a section: it defines no {', '.join(missing)}")
    phase = "parallel" if module.ORDER < PARITY_ORDER_LIMIT else "timing"
    return Section(path.stem, path, str(module.SECTION), float(module.ORDER),
                   float(getattr(module, "BUDGET_S", DEFAULT_BUDGET_S[phase])), module.run,
                   getattr(module, "warm", None), int(getattr(module, "WARM_SHARDS", 1)),
                   int(getattr(module, "SHARDS", 1)) if phase == "parallel" else 1, bool(getattr(module, "LEFTOVER", False)))


def discover(folder: Path, runner: str = "gpu_check") -> tuple[list[Section], list[dict[str, Any]]]:
    """Every bench/gpu_*.py but the runner, in ORDER (then name). Returns (sections, problems):
    a file that fails to import or is not a section is a problem, not a stop."""
    sections, problems = [], []
    for path in sorted(folder.glob("gpu_*.py")):
        if path.stem == runner:
            continue
        try:
            sections.append(as_section(load_module(path), path))
        except Exception as err:  # noqa: BLE001 -- recorded as an error row by the runner
            problems.append({"module": path.stem, "error": f"{type(err).__name__}: {err}"})
    sections.sort(key=lambda s: (s.order, s.name))
    return sections, problems


def share_s(budget_s: float, remaining_budgets: float, left_s: float) -> float:
    """A section's time: its budget, or, when the budgets of the sections still to run (this one
    included) add up to more than the time left, the same fraction of it as every other gets."""
    if remaining_budgets <= left_s:
        return budget_s
    return max(0.0, left_s * budget_s / remaining_budgets)


# ------------------------------------------------------------------ in this process
def _on_alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout("the section outlived its time limit")


def run_here(section: Section, make_ctx: Callable[[float], Ctx], budget_s: float, fn: Callable[[Ctx], None] | None = None,
             grace_s: float = GRACE_S) -> dict[str, Any]:
    """Run section.run (or fn) here with a deadline budget_s from now; stopped by SIGALRM
    grace_s after it. Returns the section's summary (status ok / error / timeout, seconds)."""
    t0 = time.monotonic()
    ctx = make_ctx(t0 + budget_s)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.05, budget_s + grace_s))  # 0 would disarm it
    status, error = "ok", None
    try:
        (fn or section.run)(ctx)
    except SectionTimeout:
        status, error = "timeout", f"stopped {grace_s:.0f} s past its {budget_s:.0f} s budget"
        ctx.record("(section)", status="error", error=error)
    except Exception as err:  # noqa: BLE001 -- recorded; the run goes on
        status, error = "error", f"{type(err).__name__}: {err}"
        ctx.error("(section)", err)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return {"section": section.name, "module": section.module, "order": section.order, "phase": section.phase,
            "budget_s": round(budget_s, 1), "seconds": round(time.monotonic() - t0, 1), "status": status,
            "error": error}


# ------------------------------------------------------------------ child processes
@dataclass
class Job:
    """One child process of the parallel phase: a section's run, or one shard of its warm()."""

    section: Section
    what: str  # "run" | "warm"
    shard: tuple[int, int] = (0, 1)

    @property
    def label(self) -> str:
        return f"{self.section.module}:{self.what}" + (f":{self.shard[0]}/{self.shard[1]}" if self.shard[1] > 1 else "")


def parallel_jobs(sections: list[Section]) -> list[Job]:
    """Warm-ups first (they compile longest), then the parallel sections in ORDER, each shard a job."""
    warm = [Job(s, "warm", (i, s.warm_shards)) for s in sections if s.warm for i in range(s.warm_shards)]
    return warm + [Job(s, "run", (i, s.shards)) for s in sections if s.phase == "parallel" for i in range(s.shards)]


class ChildPool:
    """Runs jobs as child processes, at most `jobs` at a time, until the phase's deadline; merges
    each child's rows (a JSON-lines file it appends to as it goes) into the recorder, in the
    order the children end, and echoes its lines."""

    def __init__(self, rec: Recorder, command: Callable[[Job, float, Path], list[str]], tmp: Path, jobs: int) -> None:
        self.rec, self.command, self.tmp, self.jobs = rec, command, tmp, jobs
        self.summaries: list[dict[str, Any]] = []

    def run(self, pending: list[Job], deadline: float) -> None:
        running: list[tuple[Job, subprocess.Popen, Path, float, float]] = []
        pending = list(pending)
        while pending or running:
            while pending and len(running) < self.jobs:
                job = pending.pop(0)
                left = deadline - time.monotonic()
                if left < MIN_START_S:
                    self._skipped(job, f"the parallel phase's time is spent ({left:.0f} s left)")
                    continue
                budget = min(job.section.budget_s, left)
                folder = self.tmp / job.label.replace(":", "_").replace("/", "of")
                folder.mkdir(parents=True, exist_ok=True)
                out = open(folder / "stdout.txt", "w")
                proc = subprocess.Popen(self.command(job, budget, folder), stdout=out, stderr=subprocess.STDOUT)
                out.close()
                running.append((job, proc, folder, time.monotonic(), budget))
            for item in list(running):
                job, proc, folder, t0, budget = item
                late = time.monotonic() - t0 > budget + GRACE_S + 20.0  # + its imports and CUDA start
                if proc.poll() is None and not late:
                    continue
                if proc.poll() is None:
                    proc.kill()  # ours, by its handle
                    proc.wait()
                running.remove(item)
                self._merge(job, proc.returncode, folder, time.monotonic() - t0, budget, killed=late)
            time.sleep(0.1)

    def _skipped(self, job: Job, reason: str) -> None:
        self.rec.add({"section": job.section.name, "name": f"({job.what})", "status": "skip", "measure": "skip",
                      "reason": reason}, f"  skip  {job.label}: {reason}")
        self.summaries.append({"section": job.section.name, "module": job.label, "order": job.section.order,
                               "phase": "parallel", "budget_s": 0.0, "seconds": 0.0, "status": "skipped",
                               "error": reason})

    def _merge(self, job: Job, code: int, folder: Path, seconds: float, budget: float, killed: bool) -> None:
        rows_path = folder / "rows.jsonl"
        lines = rows_path.read_text().splitlines() if rows_path.is_file() else []
        rows = [json.loads(line) for line in lines if line.strip()]
        summary = next((r for r in rows if r.get("measure") == "summary"), None)
        self.rec.log(f"\n--- {job.label} (child process, exit {code}, {seconds:.1f} s)")
        for row in rows:
            if row.get("measure") == "summary":
                continue
            row["process"] = job.label
            self.rec.add(row, row.pop("_line", None))
        status = summary["status"] if summary else "error"
        error = summary.get("error") if summary else None
        if killed or summary is None or code != 0:
            tail = (folder / "stdout.txt").read_text()[-3000:] if (folder / "stdout.txt").is_file() else ""
            error = ("stopped at its time limit" if killed else f"exit code {code}") + "; rows after the last one shown did not run"
            status = "timeout" if killed else "error"
            self.rec.add({"section": job.section.name, "name": f"({job.what} process)", "status": "error",
                          "measure": "error", "error": error, "stdout_tail": tail, "process": job.label},
                         f"  ERROR {job.label}: {error}")
            for line in tail.splitlines()[-5:]:
                self.rec.log(f"    {line}")
        self.summaries.append({"section": job.section.name, "module": job.label, "order": job.section.order,
                               "phase": "parallel", "budget_s": round(budget, 1), "seconds": round(seconds, 1),
                               "status": status, "error": error})


class LineRecorder(Recorder):
    """A child's recorder: each row carries its printed line ("_line"), so that the parent echoes
    the same line when it merges the rows."""

    def add(self, row: dict[str, Any], line: str | None = None) -> dict[str, Any]:
        if line:
            row["_line"] = line
        return super().add(row, line)
