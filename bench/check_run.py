"""One run of the GPU check (bench/gpu_check.py): setup, the two phases of sections, the JSON and
the table. bench/check_sections.py says how sections are found, budgeted and isolated."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from check_ctx import Ctx, Recorder
from check_env import LaunchSignatures, compiled_kernel_count, import_project, measure_ceilings, now_utc, versions
from check_sections import MIN_START_S, ChildPool, Job, Section, discover, parallel_jobs, run_here, share_s
from check_summary import summary_lines
from targets import annotate, derive


class Run:
    def __init__(self, args: argparse.Namespace, device: torch.device, budget_s: float, jobs: int,
                 commit: dict[str, Any], parallel_s: float, reserve_s: float, max_restarts: int) -> None:
        self.args, self.device, self.budget_s, self.jobs, self.commit = args, device, budget_s, jobs, commit
        self.parallel_s, self.reserve_s, self.max_restarts = parallel_s, reserve_s, max_restarts
        self.outdir: Path = args.outdir
        self.meta: dict[str, Any] = {}
        self.summaries: list[dict[str, Any]] = []
        self.signatures: LaunchSignatures | None = None

    # ------------------------------------------------------------ bookkeeping
    def left_s(self) -> float:
        return self.budget_s - self.rec.elapsed() - self.reserve_s

    def json_path(self) -> Path:
        return self.outdir / "gpu_check.json"

    def write(self, finished: bool = False, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        rows = self.rec.rows
        derive(rows)
        targets = annotate(rows, self.meta.get("ceilings") or {}, claims=not self.args.cpu_smoke)
        if self.signatures is not None:
            self.meta["launch_signatures"] = len(self.signatures.seen)
            self.meta["triton_launches"] = self.signatures.launches
        doc = {"meta": self.meta, "elapsed_s": round(self.rec.elapsed(), 1), "finished": finished,
               "sections": self.summaries, "targets": targets, "rows": rows}
        if resume is not None:
            doc["resume"] = resume
        tmp = self.json_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.json_path())  # a run stopped mid-write leaves the previous complete file
        return doc

    def ctx(self, section: Section, deadline: float, shard: tuple[int, int] = (0, 1)) -> Ctx:
        return Ctx(self.rec, section.name, device=self.device, smoke=self.args.cpu_smoke, deadline=deadline,
                   ceilings=self.meta.get("ceilings"), shard=shard, options={"skip_compile": self.args.skip_compile})

    def run_section(self, section: Section, budget_s: float, job: Job | None = None) -> dict[str, Any]:
        label = job.label if job else section.module
        self.rec.log(f"\n=== {section.name} ({label}, ORDER {section.order:g}; "
                     f"t={self.rec.elapsed():.0f} s, budget {budget_s:.0f} s)")
        compiled = compiled_kernel_count()
        fn = section.warm if job and job.what == "warm" else section.run
        summary = run_here(section, lambda deadline: self.ctx(section, deadline, job.shard if job else (0, 1)),
                           budget_s, fn=fn, **({} if self.args.grace_s is None else {"grace_s": self.args.grace_s}))
        if job:
            summary.update(module=label, phase="parallel")
        if compiled is not None:
            summary["triton_kernels_compiled"] = (compiled_kernel_count() or 0) - compiled
        self.summaries.append(summary)
        self.write()
        return summary

    # ------------------------------------------------------------ the run
    def main(self, argv: list[str], child_command: Callable[..., list[str]]) -> int:
        self.outdir.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.json_path().read_text()) if self.args.resume else None
        start_epoch = state["meta"]["start_epoch"] if state else time.time()
        self.rec = Recorder(time.monotonic() - (time.time() - start_epoch), log_path=self.outdir / "gpu_check.log")
        import_how = import_project()
        if self.args.cpu_smoke:
            self.signatures = LaunchSignatures()
            self.signatures.install()
        if state:
            self.meta, self.summaries, self.rec.rows = state["meta"], state["sections"], state["rows"]
            self.meta["restarts"] = self.meta.get("restarts", 0) + 1
            self.rec.log(f"\n=== resumed in a fresh process (restart {self.meta['restarts']}; "
                         f"t={self.rec.elapsed():.0f} s): the CUDA context had broken")
        else:
            self.start(import_how, start_epoch)
        sections = self.select(report_problems=not state)
        done = {s["module"] for s in self.summaries}
        if not state:
            self.parallel_phase(sections, child_command, start_epoch)
        for section in [s for s in sections if s.phase == "timing" and s.module not in done]:
            self.timing_section(section, sections, argv)
        return self.finish()

    def start(self, import_how: str, start_epoch: float) -> None:
        mode = "CPU SMOKE RUN" if self.args.cpu_smoke else "GPU"
        self.rec.log(f"linreg-fused gpu_check ({mode}) -> {self.outdir}, budget {self.budget_s:.0f} s")
        self.meta = {**self.commit, **versions(self.device, import_how), "budget_s": self.budget_s,
                     "start_epoch": start_epoch, "date_utc": now_utc(), "argv": sys.argv[1:]}
        for k, v in self.meta.items():
            if k not in ("git_status", "argv"):
                self.rec.log(f"  {k}: {v}")

        def record(key: str, result: dict[str, Any] | None, error: str | None) -> None:
            if result is None:
                self.rec.add({"section": "ceilings", "name": key, "status": "error", "measure": "error", "error": error},
                             f"  ERROR ceiling {key}: {error}")
            else:
                value = result.get("gbps", result.get("tflops"))
                unit = "GB/s" if "gbps" in result else "TFLOP/s"
                self.rec.add({"section": "ceilings", "name": result["name"], "status": "ok", "measure": "ceiling",
                              "key": key, **result}, f"  {result['name']}: {result['ms']:.4f} ms -> {value:,.1f} {unit}")

        self.rec.log("\n=== ceilings (measured in this run)")
        self.meta["ceilings"] = measure_ceilings(self.device, record)
        self.write()

    def select(self, report_problems: bool = True) -> list[Section]:
        sections, problems = discover(self.args.sections_dir)
        for problem in problems if report_problems else []:
            self.rec.add({"section": problem["module"], "name": "(import)", "status": "error", "measure": "error",
                          "error": problem["error"]}, f"  ERROR {problem['module']}: {problem['error']}")
        wanted = set(self.args.only or [])
        chosen = [s for s in sections if (not wanted or s.name in wanted or s.module in wanted)
                  and s.name not in self.args.skip and s.module not in self.args.skip]
        self.meta["sections_found"] = [f"{s.module} ({s.name}, ORDER {s.order:g}, {s.budget_s:g} s)" for s in sections]
        self.rec.log("\n=== sections: " + ", ".join(f"{s.module}[{s.order:g}]" for s in chosen))
        return chosen

    def parallel_phase(self, sections: list[Section], child_command: Callable[..., list[str]], start_epoch: float) -> None:
        jobs = parallel_jobs(sections)
        if not jobs:
            return
        phase_s = min(self.parallel_s, self.left_s()) if not self.args.cpu_smoke else self.left_s()
        if self.jobs > 0:
            self.rec.log(f"\n=== parallel phase: {len(jobs)} jobs in up to {self.jobs} processes, {phase_s:.0f} s")
            tmp = Path(tempfile.mkdtemp(prefix="gpu_check_children_"))
            pool = ChildPool(self.rec, lambda job, budget, folder: child_command(
                job, budget, folder, start_epoch, self.meta.get("ceilings") or {}), tmp, self.jobs)
            pool.run(jobs, time.monotonic() + phase_s)
            self.summaries += pool.summaries
            shutil.rmtree(tmp, ignore_errors=True)  # what mattered is merged into this run's rows and log
            self.write()
            return
        deadline = time.monotonic() + phase_s  # in this process, one after the other (the CPU smoke run)
        for job in jobs:
            left = deadline - time.monotonic()
            if left < MIN_START_S:
                self.rec.add({"section": job.section.name, "name": f"({job.what})", "status": "skip",
                              "measure": "skip", "reason": "the parallel phase's time is spent"})
                continue
            self.run_section(job.section, min(job.section.budget_s, left), job)

    def timing_section(self, section: Section, sections: list[Section], argv: list[str]) -> None:
        done = {s["module"] for s in self.summaries}
        remaining = sum(s.budget_s for s in sections if s.phase == "timing" and s.module not in done and not s.leftover)
        if section.leftover:
            budget = min(section.budget_s, self.left_s())
        else:
            budget = share_s(section.budget_s, remaining, self.left_s())
        if budget < min(MIN_START_S, section.budget_s):
            reason = f"time budget ({self.left_s():.0f} s left of the run)"
            self.rec.add({"section": section.name, "name": "(section)", "status": "skip", "measure": "skip",
                          "reason": reason}, f"\n=== {section.name}: skipped, {reason}")
            self.summaries.append({"section": section.name, "module": section.module, "order": section.order,
                                   "phase": "timing", "budget_s": 0.0, "seconds": 0.0, "status": "skipped",
                                   "error": reason})
            self.write()
            return
        self.run_section(section, budget)
        broken = self.rec.cuda_broken
        if self.device.type == "cuda" and not broken:
            try:
                torch.cuda.synchronize()
            except RuntimeError as err:
                broken = str(err).splitlines()[0][:200]
        if broken and self.meta.get("restarts", 0) < self.max_restarts:
            self.rec.log(f"  the CUDA context is broken ({broken}): going on in a fresh process")
            self.write(resume={"after": section.module, "why": broken})
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve().parent / "gpu_check.py"), *argv,
                                      "--resume"])

    def finish(self) -> int:
        doc = self.write(finished=True)
        for line in summary_lines(doc, self.json_path()):
            self.rec.log(line)
        bad = [r for r in doc["rows"] if r.get("status") in ("fail", "error")]
        return 1 if bad else 0
