"""The short table the GPU check prints last (the device tool returns the end of the output):
commit and versions, the ceilings, each section's status and time, what failed, and every
target with its value, view and verdict. Built from the run's JSON document alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_FAILURES = 25


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "us":
        return f"{value:,.2f} us"
    return f"{value:.2f}x"


def _why(row: dict[str, Any]) -> str:
    if row.get("error"):
        return str(row["error"]).splitlines()[0][:160]
    if row.get("failed"):
        errs = row.get("errors", {})
        return ", ".join(f"{k} {errs[k]['error']:.2e} > {errs[k]['tol']:.0e}" for k in row["failed"] if k in errs)[:160]
    if "tol" in row:
        return f"error {row.get('error')} > tol {row['tol']}" + (f" ({row['shape_mismatch']})" if row.get("shape_mismatch") else "")
    return ""


def summary_lines(doc: dict[str, Any], path: Path) -> list[str]:
    meta, rows = doc["meta"], doc["rows"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("status", "?")] = counts.get(row.get("status", "?"), 0) + 1
    c = meta.get("ceilings") or {}
    lines = [f"\n=== summary ({doc['elapsed_s']:.0f} s of {meta.get('budget_s', 0):.0f}; rows {counts}; {path})",
             f"commit {meta.get('git_commit')}" + (f" (given {meta['commit_given']})" if meta.get("commit_given") else "")
             + f" | {meta.get('gpu') or 'CPU SMOKE RUN: interpreter figures, not GPU performance'}"
             + f" | torch {meta.get('torch')} | triton {meta.get('triton')} | CUDA {meta.get('cuda_runtime')}"
             + (f" | driver {meta['driver']}" if meta.get("driver") else "")]

    def num(key: str, unit: str) -> str:
        return f"{c[key]:,.1f} {unit}" if c.get(key) else "—"

    lines.append(f"ceilings: copy {num('copy_gbps', 'GB/s')} | H2D pinned {num('h2d_gbps', 'GB/s')} "
                 f"(pageable {num('h2d_pageable_gbps', 'GB/s')}) | SGEMM {num('sgemm_tflops', 'TFLOP/s')} "
                 f"| tf32 {num('tf32_tflops', 'TFLOP/s')} | bf16 {num('bf16_tflops', 'TFLOP/s')}")
    lines.append("sections:")
    for s in doc.get("sections", []):
        compiled = s.get("triton_kernels_compiled")
        lines.append(f"  {s['module'][:30]:30s} {s['phase']:8s} {s['status']:8s} {s['seconds']:6.1f} / {s['budget_s']:5.0f} s"
                     + (f"  {compiled} kernels compiled" if compiled else "")
                     + (f"  {s['error'][:60]}" if s.get("error") else ""))
    skipped = [r for r in rows if r.get("status") == "skip" and "budget" in str(r.get("reason", ""))]
    if skipped:
        lines.append(f"NOT RUN for the time budget: {len(skipped)} rows (status 'skip')")
    bad = [r for r in rows if r.get("status") in ("fail", "error")]
    if bad:
        lines.append(f"failed or errored ({len(bad)}):")
        for row in bad[:MAX_FAILURES]:
            lines.append(f"  {row['status'].upper():5s} [{row.get('section')}] {str(row.get('name'))[:70]}: {_why(row)}")
        if len(bad) > MAX_FAILURES:
            lines.append(f"  ... {len(bad) - MAX_FAILURES} more in the JSON")
    targets = doc.get("targets", [])
    if targets:
        verdicts = {True: "PASS", False: "FAIL", None: "n/a"}
        tally = {v: sum(1 for t in targets if t["pass"] is k) for k, v in verdicts.items()}
        lines.append(f"targets ({tally['PASS']} pass, {tally['FAIL']} fail, {tally['n/a']} not evaluated):")
        for t in targets:
            lines.append(f"  {verdicts[t['pass']]:4s} {str(t.get('view') or ''):6s} {str(t['name'])[:64]:64s} "
                         f"{fmt_value(t['value'], t['unit']):>11s}  {t['goal']}")
    return lines
